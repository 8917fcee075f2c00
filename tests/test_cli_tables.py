"""List commands at the common 80-column SSH terminal: names a user types next are never cut."""

from __future__ import annotations

import os
from pathlib import Path

from forge_testing import forge

from assistant_forge.core.presets import get_preset, list_presets
from assistant_forge.core.runs import list_runs, new_run_dir


def _lines_at_80(*args: str) -> list[str]:
    proc = forge(*args, env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and max(len(x) for x in lines) <= 80
    return lines


def test_presets_list_shows_every_name_whole_at_80_columns():
    lines = _lines_at_80("presets", "list")
    for p in list_presets():
        assert any(f"│ {p.name} " in line for line in lines), p.name


def test_runs_list_shows_every_run_name_whole_at_80_columns(tmp_path):
    cfg = get_preset("demo-cpu-lora").load()
    new_run_dir(cfg, tmp_path / "lab" / "a-rather-long-run-name-typed-into-forge")
    names = [r.name for r in list_runs()]
    assert names
    for args in (("runs",), ("runs", "list")):
        lines = _lines_at_80(*args)
        for name in names:
            assert any(f"│ {name} " in line for line in lines), name


SNAPSHOTS = Path(__file__).parent / "fixtures" / "cli"


def _matches_snapshot(name: str, lines: list[str]) -> None:
    """The output at 80 columns, as committed (FORGE_UPDATE_SNAPSHOTS=1 rewrites it; review the diff)."""
    path, text = SNAPSHOTS / name, "\n".join(lines) + "\n"
    if os.environ.get("FORGE_UPDATE_SNAPSHOTS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name}: the 80-column output changed"


def test_list_commands_at_80_columns_match_their_snapshots(tmp_path):
    _matches_snapshot("presets_list_80.txt", _lines_at_80("presets", "list"))
    cfg = get_preset("demo-cpu-lora").load()
    for name in ("identity-qwen-7b-first-try", "a-rather-long-run-name-typed-into-forge"):
        new_run_dir(cfg, tmp_path / "lab" / name)
    _matches_snapshot("runs_list_80.txt", _lines_at_80("runs"))
