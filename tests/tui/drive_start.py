"""Run the real app in this process and start a training run from its Train screen.

Used by test_reattach.py: the test kills this process (SIGKILL, as a lost SSH session would)
once the run is going. argv: a work folder (gets the tiny config and its data), marker file (gets
the run path once training runs), the number of steps to train.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from forge_testing import tiny_config  # run as a script: tests/ and tests/tui are on sys.path
from helpers import wait_in_app

from assistant_forge.core.config import load_config
from assistant_forge.tui.app import ForgeApp


def main() -> None:
    work, marker, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    app = ForgeApp()

    async def drive(pilot) -> None:
        app.session.config = load_config(tiny_config(work, max_steps=steps, save_steps=steps))
        app.session.config_name = "reattach"
        await pilot.press("4")
        await pilot.pause()
        screen = app.screen
        await pilot.press("s")
        await wait_in_app(
            pilot, lambda: screen.state == "running" and screen.query_one("LossPlot").values, 180
        )
        marker.write_text(str(screen.watching))
        await asyncio.sleep(3600)  # until killed

    app.run(headless=True, size=(100, 30), auto_pilot=drive)


if __name__ == "__main__":
    main()
