"""A run's states (status.json "state") and its ETA in words.

Pure Python with no imports from the rest of forge: the TUI's first screen uses it before the
core's config (pydantic) is loaded.
"""

from __future__ import annotations

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
