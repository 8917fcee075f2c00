"""Run the real app in this process and start a training run from its Train screen.

Used by test_reattach.py: the test kills this process (SIGKILL, as a lost SSH session would)
once the run is going. argv: dataset file, marker file (gets the run path once training runs).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from helpers import tiny_config, wait_for  # run as a script: tests/tui is on sys.path

from assistant_forge.tui.app import ForgeApp


def main() -> None:
    data, marker = Path(sys.argv[1]), Path(sys.argv[2])
    app = ForgeApp()

    async def drive(pilot) -> None:
        app.session.config = tiny_config(data, max_steps=300)
        app.session.config_name = "reattach"
        await pilot.press("4")
        await pilot.pause()
        screen = app.screen
        await pilot.press("s")
        await wait_for(pilot, lambda: screen.state == "running" and screen.query_one("LossPlot").values, 180)
        marker.write_text(str(screen.watching))
        await asyncio.sleep(3600)  # until killed

    app.run(headless=True, size=(100, 30), auto_pilot=drive)


if __name__ == "__main__":
    main()
