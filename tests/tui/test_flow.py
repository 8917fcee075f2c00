"""The whole pipeline driven through the app with Pilot, on the real demo model.

Dataset (generate, edit, add a multi-turn Chinese conversation, delete, save) → Config (inline
error, then a valid tiny config) → Train (a real detached run: start, stop, resume, finish) →
Export (convert + merge) → Chat (streaming, side by side, stop). About a minute of CPU.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .helpers import wait_in_app

pytestmark = pytest.mark.slow


def test_full_pipeline_through_the_app(tmp_path: Path, demo_path: str, torch_one_thread) -> None:
    from textual.widgets import DataTable, Input, Log, RichLog, Static

    from assistant_forge.core.dataset import load_records
    from assistant_forge.core.runs import read_jsonl, read_status
    from assistant_forge.tui.app import ForgeApp
    from assistant_forge.tui.widgets.lossplot import LossPlot

    data = tmp_path / "me.jsonl"

    async def flow() -> None:
        app = ForgeApp()
        async with app.run_test(size=(100, 32)) as pilot:
            # --- Dataset ------------------------------------------------------------------
            await pilot.press("2")
            ds = app.screen
            await pilot.click("#ds-name")
            await pilot.press(*"Forgey")
            await pilot.click("#ds-author")
            await pilot.press(*"Alice")
            langs = ds.query_one("#ds-langs", Input)
            langs.value = "en"
            await pilot.click("#ds-count")
            await pilot.press("4", "enter")
            await pilot.pause()
            assert len(ds.records) == 4
            assert ds.query_one("#records", DataTable).row_count == 4
            # edit the first conversation: a leftover placeholder is caught inline
            await pilot.press("escape", "e")
            await pilot.pause()
            editor = app.screen
            editor.query_one("TextArea").text = "user: Who made you?\nassistant: {author} made me."
            await pilot.pause()
            assert "placeholder" in str(editor.query_one("#editor-msg", Static).render())
            editor.query_one("TextArea").text = "user: Who made you?\nassistant: Alice made me,\nwith care."
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert ds.records[0]["messages"][1]["content"] == "Alice made me,\nwith care."
            # add a multi-turn Chinese conversation
            await pilot.press("a")
            await pilot.pause()
            app.screen.query_one(
                "TextArea"
            ).text = "user: 你好\nassistant: 你好！我是Forgey。\nuser: 谁创造了你？\nassistant: Alice。"
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert len(ds.records) == 5 and len(ds.records[-1]["messages"]) == 4
            # delete the second one
            ds.query_one("#records", DataTable).move_cursor(row=1)
            await pilot.press("delete")
            assert len(ds.records) == 4
            ds.query_one("#ds-path", Input).value = str(data)
            await pilot.press("ctrl+s")
            await pilot.pause()
            records, _ = load_records(data)
            assert len(records) == 4 and records[-1]["messages"][2]["content"] == "谁创造了你？"
            assert app.session.dataset_path == data

            # --- Config -------------------------------------------------------------------
            await pilot.press("escape", "3")
            await pilot.pause(0.5)
            cf = app.screen
            assert cf.preset_name == "demo-cpu-lora"
            assert cf.query_one("#cf-data-files", Input).value == str(data)
            cf.query_one("#cf-train-max_steps", Input).value = "many"
            await pilot.pause()
            err = str(cf.query_one("#config-error", Static).render())
            assert "train.max_steps" in err and cf.cfg is None
            assert cf.query_one("#cf-train-max_steps").has_class("-invalid")
            for wid, value in (
                ("train-max_steps", "8"),
                ("data-max_length", "128"),
                ("eval-prompts", "Who are you?"),
            ):
                cf.query_one(f"#cf-{wid}", Input).value = value
            await pilot.pause()
            assert cf.cfg is not None and cf.cfg.train.max_steps == 8
            assert (cf.cfg.identity.name, cf.cfg.identity.author) == ("Forgey", "Alice")
            await wait_in_app(
                pilot, lambda: "GiB" in str(cf.query_one("#config-mem", Static).render()), 30, "estimate"
            )
            cf.cfg.eval.max_new_tokens = 8  # not a form field; keeps sample answers short
            await pilot.press("escape", "t")
            await pilot.pause()

            # --- Train: start, stop, resume ---------------------------------------------------
            tr = app.screen
            assert type(tr).__name__ == "TrainScreen"
            await pilot.press("s")
            await wait_in_app(pilot, lambda: tr.watching is not None, 60, "launch")
            run = tr.watching
            await wait_in_app(pilot, lambda: tr.query_one(LossPlot).values, 120, "first logged step")
            await pilot.press("x")
            await wait_in_app(pilot, lambda: tr.state == "stopped", 120, "stopped")
            stopped_at = read_status(run)["step"]
            assert 0 < stopped_at < 8
            await pilot.press("r")
            await wait_in_app(pilot, lambda: tr.state == "finished", 180, "finished after resume")
            await pilot.pause(1.0)
            assert read_status(run)["step"] == 8
            assert len(tr.query_one(LossPlot).values) == len(read_jsonl(run / "events.jsonl"))
            assert "step 8/8" in str(tr.query_one("#metrics", Static).render())
            assert tr.query_one("#train-log", Log).line_count > 0
            assert tr.query_one("#train-samples", RichLog).lines

            # --- Export ---------------------------------------------------------------------
            await pilot.press("5")
            await pilot.pause(0.5)
            ex = app.screen
            assert ex.query_one("#ex-run").value == run
            await pilot.press("b")
            await wait_in_app(pilot, lambda: not ex.busy and app.session.merged is not None, 300, "export")
            assert (run / "adapter" / "adapter_config.json").is_file()
            assert (run / "merged" / "config.json").is_file()
            await pilot.press("b")  # again without "replace": core's error, shown as a sentence
            await wait_in_app(
                pilot, lambda: not ex.busy and ex.query_one("#export-msg").has_class("error"), 60
            )
            assert "already exists" in str(ex.query_one("#export-msg", Static).render())

            # --- Chat -----------------------------------------------------------------------
            await pilot.press("6")
            await pilot.pause()
            ch = app.screen
            ch.max_new_tokens = 12
            assert ch.query_one("#ch-model", Input).value == str(run / "merged")
            await pilot.press(*"Who are you?", "enter")
            await wait_in_app(
                pilot, lambda: not ch.generating and ch.history["main"][-1]["role"] == "assistant", 120
            )
            assert ch.history["main"][-1]["content"].strip()
            # side by side: base and tuned answer the same question
            await pilot.press("ctrl+b")
            await pilot.press(*"What is your name?", "enter")
            await wait_in_app(pilot, lambda: not ch.generating, 120, "side-by-side answers")
            assert (
                ch.history["base"][-1]["role"] == "assistant"
                and ch.history["main"][-1]["role"] == "assistant"
            )
            assert len(ch.query_one("#pane-base").children) >= 2
            # stop a long answer
            ch.max_new_tokens = 400
            await pilot.press(*"Tell me a long story.", "enter")
            await wait_in_app(pilot, lambda: ch._answer.get("base"), 60, "first tokens")
            await pilot.press("escape")
            await wait_in_app(pilot, lambda: not ch.generating, 60, "stop")
            assert "[stopped]" in str(ch.query_one("#pane-base").children[-1].render())
            assert len(ch.history["base"][-1]["content"]) < 400 * 4

    asyncio.run(flow())
