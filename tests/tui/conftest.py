"""TUI fixtures (the autouse tmp FORGE_RUNS_DIR/FORGE_CONFIG_DIR come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fixed_runs_dir(monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runs folder at a fixed path: paths shown on screen must not differ between snapshot runs."""
    import shutil

    path = Path("/tmp/forge-tui-snapshot-runs")
    shutil.rmtree(path, ignore_errors=True)
    monkeypatch.setenv("FORGE_RUNS_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)
