"""How fast `forge` shows its first screen, and what it imports on the way.

    python bench/tui_startup.py [--runs 5]
    python bench/tui_startup.py --imports-only   # the import check alone (tests/tui/test_startup.py)

Measures, each as the median of several runs:
  - import cost of assistant_forge.tui.app (fresh interpreter, minus a bare interpreter)
  - `forge --help` wall time
  - time to first screen: `python -m assistant_forge` in a tmux pseudo-terminal (80x24), polled
    with capture-pane until the Home screen is drawn; an empty Textual app is the floor
and checks that neither `forge --help` nor the first screen (with its runs list) imports torch.
Exits non-zero when a check fails or the first screen takes 1.5 s or more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT_S = 1.5
ROOT = Path(__file__).resolve().parents[1]
EMPTY_APP = """
from textual.app import App
from textual.widgets import Static
class E(App):
    def compose(self):
        yield Static("1 Home The pipeline")
E().run()
"""
FIRST_SCREEN_IMPORTS = """
import asyncio, sys
from assistant_forge.tui.app import ForgeApp
async def main():
    app = ForgeApp()
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(50):  # until the runs worker has listed the runs
            await pilot.pause(0.1)
            if app.screen.query_one("#runs-msg").render().plain.startswith("No runs"):
                break
        print(",".join(m for m in ("torch", "transformers", "peft") if m in sys.modules) or "none")
asyncio.run(main())
"""


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FORGE_RUNS_DIR": str(tmp / "runs"),
        "FORGE_CONFIG_DIR": str(tmp / "config"),
        "PYTHONPATH": str(ROOT),
    }


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
    return time.perf_counter() - t


def first_screen_s(
    command: str, env: dict[str, str], marker: str = "The pipeline", timeout: float = 20
) -> float:
    """Seconds from starting `command` in a fresh 80x24 tmux pane until `marker` is on screen."""
    sock = f"forge-bench-{os.getpid()}-{time.monotonic_ns()}"  # a fresh server each time: no races
    t0 = time.perf_counter()
    subprocess.run(
        ["tmux", "-L", sock, "new-session", "-d", "-s", "b", "-x", "80", "-y", "24", command],
        env=env,
        check=True,
        cwd=ROOT,
    )
    try:
        while time.perf_counter() - t0 < timeout:
            out = subprocess.run(
                ["tmux", "-L", sock, "capture-pane", "-p", "-t", "b"], capture_output=True, text=True
            ).stdout
            if marker in out:
                return time.perf_counter() - t0
            time.sleep(0.01)
        raise RuntimeError(f"no first screen within {timeout}s")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)


def first_screen_imports(env: dict[str, str]) -> str:
    """Which of torch/transformers/peft the first screen imported once the runs are listed ("none")."""
    out = subprocess.run(
        [sys.executable, "-c", FIRST_SCREEN_IMPORTS], env=env, capture_output=True, text=True, cwd=ROOT
    )
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else f"FAILED: {out.stderr[-2000:]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--imports-only", action="store_true", help="only check what the first screen imports")
    args = ap.parse_args()
    if args.imports_only:
        with tempfile.TemporaryDirectory() as d:
            mods = first_screen_imports(_env(Path(d)))
        print(mods)
        return 0 if mods == "none" else 1
    if shutil.which("tmux") is None:
        print("tmux is needed", file=sys.stderr)
        return 2
    py = sys.executable
    rows: list[tuple[str, str, str]] = []
    ok = True
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = _env(tmp)
        med = lambda xs: statistics.median(xs)  # noqa: E731
        bare = med([_wall([py, "-c", "pass"], env) for _ in range(args.runs)])
        for mod in ("textual.app", "assistant_forge.tui.app"):
            t = med([_wall([py, "-c", f"import {mod}"], env) for _ in range(args.runs)])
            rows.append((f"import {mod}", f"{t - bare:.3f} s", "cost over a bare interpreter"))
        t = med([_wall([py, "-m", "assistant_forge", "--help"], env) for _ in range(args.runs)])
        rows.append(("forge --help", f"{t:.3f} s", "wall"))
        help_mods = (
            subprocess.run(
                [
                    py,
                    "-c",
                    "import sys\nfrom assistant_forge.cli import main\ntry: main(['--help'])\n"
                    "except SystemExit: pass\nprint('torch' in sys.modules)",
                ],
                env=env,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        ok &= help_mods == "False"
        rows.append(("forge --help imports torch", "no" if help_mods == "False" else "YES", "must be no"))

        empty = tmp / "empty_app.py"
        empty.write_text(EMPTY_APP)
        floor = med([first_screen_s(f"{py} {empty}", env) for _ in range(args.runs)])
        rows.append(("first screen, empty Textual app (floor)", f"{floor:.3f} s", "tmux 80x24"))
        times = [first_screen_s(f"{py} -m assistant_forge", env) for _ in range(args.runs)]
        first = med(times)
        ok &= first < LIMIT_S
        rows.append(("first screen, forge", f"{first:.3f} s", f"max {max(times):.3f} s; limit {LIMIT_S} s"))
        runs_listed = med(
            [first_screen_s(f"{py} -m assistant_forge", env, marker="No runs yet") for _ in range(args.runs)]
        )
        rows.append(("runs listed (core loaded in a worker)", f"{runs_listed:.3f} s", "after first screen"))
        mods = first_screen_imports(env)
        ok &= mods == "none"
        rows.append(("first screen imports torch/transformers/peft", mods, "must be none"))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>10}  note")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 30}")
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>10}  {note}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
