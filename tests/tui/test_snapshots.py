"""Snapshots of the main screens at 80x24 (pytest-textual-snapshot; update: --snapshot-update).

Runs live at a fixed path with fixed times so every render is byte-for-byte stable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import wait_in_app, write_fake_run

SAMPLES = (("Who are you?", "I'm SmolLM, an AI assistant."), ("你是谁？", "我是Forgey，由Alice创造的助手。"))
LOG = "".join(
    f"step {i}/40 loss {2.5 - i * 0.03:.4f} lr 1.00e-03 512 tok/s eta {42 * (40 - i)}s\n"
    for i in range(1, 41)
)


@pytest.fixture
def runs(fixed_runs_dir: Path) -> dict[str, Path]:
    return {
        "finished": write_fake_run(
            "20260101-120000-forgey", "finished", 40, 40, events=40, samples=SAMPLES, log=LOG
        ),
        "failed": write_fake_run("20260101-110000-qwen-7b", "failed", 3, 500),
        "stopped": write_fake_run("20260101-100000-llama", "stopped", 120, 900),
        "dead": write_fake_run("20260101-090000-crashed", "running", 12, 300),  # no trainer holds the lock
    }


def _app(light: bool = False):
    from assistant_forge.tui.app import ForgeApp

    return ForgeApp(light=light)


async def _home_loaded(pilot) -> None:
    await wait_in_app(pilot, lambda: pilot.app.screen.query_one("#runs").row_count == 4, 20, "runs")


def test_home(snap_compare, runs) -> None:
    assert snap_compare(_app(), run_before=_home_loaded)


def test_home_light_theme(snap_compare, runs) -> None:
    assert snap_compare(_app(light=True), run_before=_home_loaded)


def test_dataset_generated(snap_compare) -> None:
    async def before(pilot) -> None:
        await pilot.press("2")
        screen = pilot.app.screen
        for wid, value in (
            ("name", "Forgey"),
            ("author", "Alice"),
            ("count", "6"),
            ("facts", "I like tea; 我喜欢喝茶"),
        ):
            screen.query_one(f"#ds-{wid}").value = value
        await pilot.press("g")
        await pilot.pause()

    assert snap_compare(_app(), run_before=before)


def test_dataset_editor_inline_error(snap_compare) -> None:
    async def before(pilot) -> None:
        await pilot.press("2", "escape", "a")
        await pilot.pause()
        pilot.app.screen.query_one("TextArea").text = "user: 你叫什么名字？\nassistant: 我叫{name}。"
        await pilot.pause()

    assert snap_compare(_app(), run_before=before)


def test_config_demo_preset(snap_compare, fixed_runs_dir: Path) -> None:
    async def before(pilot) -> None:
        pilot.app.session.dataset_path = fixed_runs_dir / "identity.jsonl"
        await pilot.press("3")
        screen = pilot.app.screen
        await wait_in_app(pilot, lambda: screen.preset_name == "demo-cpu-lora", 10)
        screen.query_one("#cf-lora-r").value = "sixteen"  # an inline error, from core's parse_config
        await pilot.pause()

    assert snap_compare(_app(), run_before=before)


def test_train_finished_run(snap_compare, runs) -> None:
    async def before(pilot) -> None:
        pilot.app.session.run = runs["finished"]
        await pilot.press("4")
        screen = pilot.app.screen
        await wait_in_app(
            pilot, lambda: screen.state == "finished" and screen.query_one("#train-samples").lines, 10
        )
        await pilot.pause(0.3)

    assert snap_compare(_app(), run_before=before)


def test_export(snap_compare, runs) -> None:
    ckpt = runs["finished"] / "checkpoints" / "checkpoint-40"
    ckpt.mkdir(parents=True)
    (ckpt / "forge_complete.json").write_text(json.dumps({"step": 40}))

    async def before(pilot) -> None:
        pilot.app.session.run = runs["finished"]
        await pilot.press("5")
        await pilot.pause(0.3)

    assert snap_compare(_app(), run_before=before)


def test_chat_side_by_side(snap_compare) -> None:
    async def before(pilot) -> None:
        await pilot.press("6", "ctrl+b")
        await pilot.pause()

    assert snap_compare(_app(), run_before=before)


def test_help(snap_compare) -> None:
    assert snap_compare(_app(), press=["question_mark"])
