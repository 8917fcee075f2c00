"""Render docs/forge.svg: the Train screen watching a real run on the demo model (CPU, ~1 min).

python docs/make_screenshot.py [OUT.svg]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path


async def shoot(out: Path, tmp: Path) -> None:
    from assistant_forge.core.dataset import write_records
    from assistant_forge.core.identity import generate_identity_records
    from assistant_forge.core.presets import get_preset
    from assistant_forge.core.runs import stop
    from assistant_forge.tui.app import ForgeApp

    data = tmp / "forgey.jsonl"
    write_records(generate_identity_records("Forgey", "Alice", langs=["en", "zh"], count=24), data)
    cfg = get_preset("demo-cpu-lora").load()
    cfg.data.files = [str(data)]
    cfg.train.max_steps, cfg.train.cpu_threads = 40, 1
    cfg.eval.prompts = ["Who are you?", "你是谁？"]
    cfg.eval.sample_every, cfg.eval.max_new_tokens = 10, 24

    app = ForgeApp()
    async with app.run_test(size=(100, 30)) as pilot:
        app.session.config, app.session.config_name = cfg, "forgey"
        await pilot.press("4")
        screen = app.screen
        await pilot.press("s")
        deadline = time.monotonic() + 600
        while len(screen.query_one("LossPlot").values) < 30 and time.monotonic() < deadline:
            await pilot.pause(0.5)
        await pilot.pause(1.0)
        app.save_screenshot(str(out))
        stop(screen.watching, wait_s=120)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("forge.svg")).resolve()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["FORGE_RUNS_DIR"] = str(tmp / "runs")
        os.environ["FORGE_CONFIG_DIR"] = str(tmp / "config")
        asyncio.run(shoot(out, tmp))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
