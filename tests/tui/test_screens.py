"""Fast Pilot tests of single screens (no model): import, TOML view, preset filter, live tailing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from .helpers import wait_in_app, write_fake_run


def _run(flow) -> None:
    async def main() -> None:
        from assistant_forge.tui.app import ForgeApp

        app = ForgeApp()
        async with app.run_test(size=(80, 24)) as pilot:
            await flow(app, pilot)

    asyncio.run(main())


def test_dataset_imports_sharegpt_and_reports_bad_files_inline(tmp_path: Path) -> None:
    good = tmp_path / "chats.json"
    good.write_text(
        json.dumps(
            [{"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]}],
            ensure_ascii=False,
        )
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1\n')

    async def flow(app, pilot) -> None:
        await pilot.press("2")
        screen = app.screen
        screen.query_one("#ds-path").value = str(bad)
        await pilot.press("escape", "i")
        await wait_in_app(pilot, lambda: screen.query_one("#data-msg").has_class("error"), 10, "import error")
        assert "bad.jsonl:1: the conversation has no assistant turn" in str(
            screen.query_one("#data-msg").render()
        )
        assert screen.records == []
        screen.query_one("#ds-path").value = str(good)
        await pilot.press("escape", "i")
        await wait_in_app(pilot, lambda: len(screen.records) == 1, 10, "import")
        assert screen.records[0]["messages"][0] == {"role": "user", "content": "你好"}
        # saving refuses an invalid conversation, and says which one
        screen.records.append({"messages": [{"role": "user", "content": "only a question"}]})
        screen.refresh_table()
        screen.query_one("#ds-path").value = str(tmp_path / "out.jsonl")
        await pilot.press("ctrl+s")
        assert "#2" in str(screen.query_one("#data-msg").render())
        assert not (tmp_path / "out.jsonl").exists()

    _run(flow)


def test_config_filter_toml_view_and_save(tmp_path: Path) -> None:
    async def flow(app, pilot) -> None:
        await pilot.press("3")
        screen = app.screen
        await pilot.press("f", *"qwen2_5-0")
        await pilot.pause()
        names = [
            screen.query_one("#preset-list").get_option_at_index(i).id
            for i in range(screen.query_one("#preset-list").option_count)
        ]
        assert names == ["qwen2_5-0_5b-instruct-qlora"]
        await pilot.press("enter", "down", "enter")  # filter → list → pick
        await wait_in_app(pilot, lambda: screen.preset_name == "qwen2_5-0_5b-instruct-qlora", 5, "preset")
        await pilot.press("escape", "v")
        await pilot.pause()
        assert "[lora]" in app.screen.query_one("#toml-text").text
        assert 'method = "qlora"' in app.screen.query_one("#toml-text").text
        await pilot.press("escape")
        screen.query_one("#cf-save-path").value = str(tmp_path / "mine.toml")
        await pilot.press("ctrl+s")
        from assistant_forge.core.config import load_config

        assert load_config(tmp_path / "mine.toml").lora.method == "qlora"
        assert app.session.config is not None

    _run(flow)


def test_train_screen_tails_a_growing_run() -> None:
    run = write_fake_run("20260101-000000-growing", "finished", 2, 10, events=2, log="line one\npartial")

    async def flow(app, pilot) -> None:
        app.session.run = run
        await pilot.press("4")
        screen = app.screen
        plot = screen.query_one("LossPlot")
        await wait_in_app(pilot, lambda: len(plot.values) == 2, 10, "first events")
        assert screen.query_one("#train-log").line_count == 1  # the partial line waits for its newline
        with open(run / "events.jsonl", "a") as f:
            f.write(json.dumps({"step": 3, "total_steps": 10, "loss": 0.5, "eta_s": 7}) + "\n")
            f.write('{"step": 4, "total_')  # half-written: not read yet
        with open(run / "train.log", "a") as f:
            f.write(" line\nstep 3\n")
        log = screen.query_one("#train-log")
        # The two files may be read in different polls: wait for both.
        await wait_in_app(pilot, lambda: len(plot.values) == 3 and log.line_count == 3, 10, "appended lines")
        assert log.lines[-2:] == ["partial line", "step 3"]
        assert "step 3/10" in str(screen.query_one("#metrics").render())

    _run(flow)


def test_theme_toggle_and_help() -> None:
    async def flow(app, pilot) -> None:
        assert app.theme == "textual-dark"
        await pilot.press("ctrl+t")
        assert app.theme == "textual-light"
        await pilot.press("question_mark")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        assert type(app.screen).__name__ == "HomeScreen"

    _run(flow)


def test_config_form_keeps_a_data_source_table_through_the_one_line_field():
    from assistant_forge.tui.screens.config import as_text, from_text

    original = [{"path": "hf:owner/name", "max_rows": 500}, "data.jsonl"]
    text = as_text(original, ",")
    assert text == "hf:owner/name, data.jsonl"
    assert from_text(text, ",", original) == original
    # Editing the line keeps the options of the paths that stay and adds plain paths.
    assert from_text("hf:owner/name, more.csv", ",", original) == [original[0], "more.csv"]
