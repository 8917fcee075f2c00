"""The Chat pane's model list on a real trained run, GGUF export from the Export screen, and the
first field focused on entering each screen."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from forge_testing import tiny_config, wait_for

from .helpers import wait_in_app


def _run(flow, size: tuple[int, int] = (100, 30)) -> None:
    async def main() -> None:
        from assistant_forge.tui.app import ForgeApp

        app = ForgeApp()
        async with app.run_test(size=size) as pilot:
            await flow(app, pilot)

    asyncio.run(main())


def test_chat_lists_a_trained_runs_models_newest_first_and_compares_with_their_base(
    tmp_path: Path, demo_path: str
) -> None:
    from assistant_forge.core.config import ForgeConfig, load_config
    from assistant_forge.core.known_models import EXPORTS, known_models
    from assistant_forge.core.merge import convert, merge
    from assistant_forge.core.runs import launch, new_run_dir, read_status

    # `forge demo`'s layout: OUT/run, OUT/adapter, OUT/merged; then one more merge elsewhere.
    run = new_run_dir(load_config(tiny_config(tmp_path, max_steps=1, save_steps=1)), tmp_path / "run")
    launch(run)
    wait_for(lambda: read_status(run).get("state") not in ("created", "starting", "running"), 300, "training")
    assert read_status(run)["state"] == "finished", (run / "train.log").read_text()[-2000:]
    adapter = convert(run, tmp_path / "adapter")
    merged = merge("demo", adapter, tmp_path / "merged")
    later = merge("demo", adapter, tmp_path / "elsewhere" / "m2")

    listed = [(m.kind, m.adapter or m.model) for m in known_models()]
    assert listed == [
        ("merged", str(later.resolve())),
        ("merged", str(merged.resolve())),
        ("adapter", str(adapter.resolve())),
        ("base", "demo"),
    ]
    # Folders made before runs recorded them are still found where forge puts them by default.
    (run / EXPORTS).unlink()
    assert [m.kind for m in known_models()] == ["merged", "adapter", "base"]
    merge("demo", adapter, tmp_path / "elsewhere" / "m2", force=True)  # records it again

    async def flow(app, pilot) -> None:
        from textual.widgets import Input, Select

        app.session.run = run
        app.session.config = ForgeConfig()
        app.session.config.model.path = "Qwen/Qwen2.5-0.5B-Instruct"  # another base, being configured
        await pilot.press("6")
        await pilot.pause()
        ch = app.screen
        sel = ch.query_one("#ch-source", Select)
        labels = [m.label for m in ch.known]
        assert labels[:3] == ["merged · run · m2", "merged · run · merged", "adapter · run · adapter"]
        assert labels[3:] == ["base · demo", "base · Qwen/Qwen2.5-0.5B-Instruct"]
        # default: the newest merged model of the watched run; side by side: its own base, not the config's
        assert sel.value == 0 and ch.query_one("#ch-model", Input).value == str(later.resolve())
        assert ch.base_model() == "demo"
        sel.value = 2  # the adapter: its base model plus the adapter
        await pilot.pause()
        assert (ch.query_one("#ch-model", Input).value, ch.query_one("#ch-adapter", Input).value) == (
            "demo",
            str(adapter.resolve()),
        )
        assert ch.base_model() == "demo"
        assert app.screen.focused is ch.query_one("#prompt")

    _run(flow)


def _tiny_merged(tmp_path: Path) -> Path:
    from families import family_model

    from assistant_forge.core.models import resolve_model

    # A tiny InternLM2 in forge's native form (what forge merges into): a 1k vocabulary, written in a second.
    folder = tmp_path / "merged"
    shutil.copytree(resolve_model(str(family_model("internlm2_5"))), folder)
    return folder


def test_export_screen_writes_gguf_and_modelfile_with_progress(tmp_path: Path) -> None:
    tmp_path = tmp_path / "out"  # beside the test's runs and config folders
    tmp_path.mkdir()
    merged = _tiny_merged(tmp_path)
    out = tmp_path / "My Bot.gguf"

    async def flow(app, pilot) -> None:
        from textual.widgets import Checkbox, Input, ProgressBar, Select, Static

        await pilot.press("5")
        await pilot.pause()
        ex = app.screen
        ex.query_one("#ex-merged", Input).value = str(merged)
        ex.query_one("#ex-gguf", Input).value = str(out)
        ex.query_one("#ex-quant", Select).value = "q4_0"
        assert ex.query_one("#ex-ollama", Checkbox).value
        await pilot.press("escape", "g")
        await wait_in_app(pilot, lambda: not ex.busy, 60, "GGUF export")
        result = str(ex.query_one("#gguf-result", Static).render())
        assert out.is_file() and (tmp_path / "Modelfile").is_file(), result
        assert f"wrote {out} (q4_0, " in result
        assert f"cd {tmp_path} && ollama create my-bot -f Modelfile" in result
        bar = ex.query_one("#export-progress", ProgressBar)
        assert bar.total and bar.progress == bar.total  # every tensor reported
        import gguf

        assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0

        # again without "replace": core's one-line refusal, and the file is kept
        size = out.stat().st_size
        await pilot.press("g")
        await wait_in_app(pilot, lambda: not ex.busy, 30)
        msg = ex.query_one("#export-msg", Static)
        assert msg.has_class("error") and "already exists; pass --force" in str(msg.render())
        assert out.stat().st_size == size
        # an adapter folder is not a merged model
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
        ex.query_one("#ex-merged", Input).value = str(tmp_path / "adapter")
        ex.query_one("#ex-gguf", Input).value = str(tmp_path / "other.gguf")
        await pilot.press("escape", "g")
        await wait_in_app(pilot, lambda: not ex.busy, 30)
        assert "merge first" in str(msg.render()) and len(str(msg.render()).splitlines()) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "My Bot.gguf", "adapter", "merged"]

    _run(flow)


FIRST_FIELDS = {
    "2": "ds-name",
    "3": "preset-list",
    "4": "train-log",
    "5": "ex-run",
    "6": "prompt",
    "1": "runs",
}


def test_every_screen_focuses_its_first_field_on_entry() -> None:
    async def flow(app, pilot) -> None:
        for visit in range(2):
            for key, first in FIRST_FIELDS.items():
                await pilot.press("escape", key)
                await pilot.pause()
                assert app.screen.focused is not None and app.screen.focused.id == first, (visit, key)
                app.screen.focus_next()  # leave the focus elsewhere: the next entry still starts at the top
                app.screen.focus_next()
        # a dialog on top (help) gives the focus back where it was
        await pilot.press("2", "escape", "tab", "tab")
        focused = app.screen.focused
        await pilot.press("f1")  # "?" would be typed into the field
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        assert app.screen.focused is focused

    _run(flow, size=(80, 24))
