"""Training outlives the app: kill forge, the trainer goes on; start forge again, it shows the run live.

The app runs in real processes: first headless (driven to press Start), killed with SIGKILL;
then `python -m assistant_forge` in a tmux pseudo-terminal, read back with capture-pane.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from forge_testing import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]

HERE = Path(__file__).resolve().parent
STEPS = 3000  # forge_testing's tiny config trains fast: enough steps to outlive the app and its restart


def _events(run: Path) -> int:
    try:
        return (run / "events.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def test_run_survives_app_and_is_shown_live_again(tmp_path: Path, demo_path: str) -> None:
    from assistant_forge.core.runs import read_json, stop, trainer_alive

    marker = tmp_path / "run.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE.parents[1]), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    with open(tmp_path / "app.err", "wb") as err:
        app = subprocess.Popen(
            [sys.executable, str(HERE / "drive_start.py"), str(tmp_path), str(marker), str(STEPS)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    run: Path | None = None
    sock = f"forge-test-{os.getpid()}"
    try:
        wait_for(lambda: marker.exists() or app.poll() is not None, 240, "the app to start a run")
        assert marker.exists(), (tmp_path / "app.err").read_text()[-2000:]
        run = Path(marker.read_text())

        # The app dies as with a dropped SSH session; the trainer is in its own session and goes on.
        app.send_signal(signal.SIGKILL)
        app.wait(10)
        assert trainer_alive(run)
        before = _events(run)
        wait_for(lambda: _events(run) > before + 1, 60, "events.jsonl to grow after the app died")

        # forge again, in a real terminal: the Home screen lists the run as running, live.
        cmd = (
            f"cd {tmp_path} && env FORGE_RUNS_DIR={os.environ['FORGE_RUNS_DIR']} "
            f"FORGE_CONFIG_DIR={os.environ['FORGE_CONFIG_DIR']} {sys.executable} -m assistant_forge"
        )
        subprocess.run(
            ["tmux", "-L", sock, "new-session", "-d", "-s", "forge", "-x", "100", "-y", "30", cmd],
            check=True,
            env=env,
        )

        def screen() -> str:
            return subprocess.run(
                ["tmux", "-L", sock, "capture-pane", "-p", "-t", "forge"], capture_output=True, text=True
            ).stdout

        def live_step() -> int | None:
            m = re.search(rf"training live: \S+\s+step (\d+)/{STEPS}", screen())
            return int(m.group(1)) if m else None

        first = wait_for(live_step, 30, "the reattached app to show the run live")
        text = screen()
        assert run.name in text and "running" in text
        wait_for(lambda: (live_step() or 0) > first, 30, "the shown step to advance")

        # enter on the run opens the Train screen on it, with its loss plot and log.
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", "forge", "Enter"], check=True)
        wait_for(
            lambda: "train.log" in screen() and re.search(rf"step \d+/{STEPS} · ETA", screen()),
            20,
            "Train screen",
        )
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        if app.poll() is None:
            app.kill()
        if run is not None and trainer_alive(run):
            stop(run, wait_s=60)
        if run is not None:
            assert read_json(run / "status.json").get("state") in ("stopped", "finished")
