"""The app's first screen must not wait for torch (bench/tui_startup.py measures the time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

IMPORT_ONLY = """
import sys
import assistant_forge.tui.app
print(",".join(m for m in ("torch", "transformers", "pydantic") if m in sys.modules) or "none")
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_importing_the_app_loads_neither_torch_nor_pydantic() -> None:
    assert _run(IMPORT_ONLY) == "none"


def test_first_screen_with_runs_listed_does_not_import_torch() -> None:
    """The bench's own check, run as a script (tests do not import bench/)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tui_startup.py"), "--imports-only"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "none"), proc.stdout + proc.stderr[-2000:]
