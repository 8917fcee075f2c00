"""A run's states (status.json "state") and its ETA in words.

Pure Python with no imports from the rest of forge: the TUI's first screen uses it before the
core's config (pydantic) is loaded.
"""

from __future__ import annotations

import statistics
from typing import Any

LIVE_STATES = ("starting", "running", "stopping")  # a trainer is (or is about to be) working on it
ENDED_STATES = ("finished", "stopped", "failed", "dead")


def fmt_eta(seconds: Any) -> str:
    """Seconds left as `12m05s` or `3h07m`; `-` when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


# Steps left out of a run's speed: the first compiles and captures, the next two warm up.
WARMUP_STEPS = 3


def speed_summary(events: list[dict]) -> dict[str, Any]:
    """A run's speed from its events.jsonl: median and 10th-percentile tokens/s and the median step
    time over the steps after the warm-up (real tokens, padding not counted), peak GPU memory, steps
    logged. The same figures
    bench/e2e_train.py tabulates."""
    tps = sorted(
        e["tokens_per_s"] for e in events if e.get("step", 0) > WARMUP_STEPS and e.get("tokens_per_s")
    )
    step_s = [e["step_s"] for e in events if e.get("step", 0) > WARMUP_STEPS and e.get("step_s")]
    mem = [e["mem_gib"] for e in events if e.get("mem_gib") is not None]
    n = len(tps)
    return {
        "steps": len(events),
        "tokens_per_s": statistics.median(tps) if n else None,
        # Training time of one step (sample answers and checkpoint saves left out), median.
        "step_s": statistics.median(step_s) if step_s else None,
        "p10_tokens_per_s": tps[n // 10] if n else None,
        "peak_mem_gib": max(mem) if mem else None,
    }
