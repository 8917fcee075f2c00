"""Helpers for the TUI tests: a Pilot wait and fixed-name fake runs (a tiny config: forge_testing)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forge_testing import until_timeout  # tests/ is on sys.path (pytest rootdir, drive_start.py)

FIXED_TIME = "2026-01-01T12:00:00+00:00"


async def wait_in_app(pilot: Any, cond: Callable[[], bool], timeout: float = 120.0, what: str = "") -> None:
    """Let the app run until cond() holds (workers post from threads; the UI updates in between)."""
    for _ in until_timeout(timeout, what or str(cond)):
        if cond():
            return
        await pilot.pause(0.2)


def write_fake_run(
    name: str,
    state: str,
    step: int,
    total: int,
    *,
    events: int = 0,
    samples: tuple[tuple[str, str], ...] = (),
    log: str = "",
) -> Path:
    """A run directory as a trainer leaves it, with fixed times so snapshots are stable."""
    from assistant_forge.core.config import ForgeConfig
    from assistant_forge.core.runs import new_run_dir
    from assistant_forge.paths import runs_dir

    run = new_run_dir(ForgeConfig(), runs_dir() / name)
    status = {
        "state": state,
        "name": name,
        "created": FIXED_TIME,
        "started": FIXED_TIME,
        "updated": FIXED_TIME,
        "pid": 999_999_999,
        "reason": "",
        "step": step,
        "total_steps": total,
        "loss": round(2.5 - 0.05 * step, 4) if step else None,
        "eta_s": 42.0 * (total - step),
    }
    (run / "status.json").write_text(json.dumps(status))
    with open(run / "events.jsonl", "w") as f:
        for i in range(1, events + 1):
            ev = {
                "step": i,
                "total_steps": total,
                "epoch": i / 10,
                "loss": 2.5 - 1.5 * (i / events) ** 0.5,
                "lr": 1e-3,
                "tokens_per_s": 512.0,
                "mem_gib": None,
                "eta_s": 42.0 * (total - i),
                "time": FIXED_TIME,
            }
            f.write(json.dumps(ev) + "\n")
    with open(run / "samples.jsonl", "w") as f:
        for s, (prompt, answer) in enumerate(samples):
            f.write(
                json.dumps(
                    {
                        "step": s * step,
                        "when": "during",
                        "prompt": prompt,
                        "answer": answer,
                        "time": FIXED_TIME,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    (run / "train.log").write_text(log)
    return run
