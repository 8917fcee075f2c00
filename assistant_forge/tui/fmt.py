"""Formatting shared by screens (no Textual, no pydantic: cheap at startup)."""

from __future__ import annotations

from typing import Any

STATE_STYLE = {
    "running": "bold green",
    "starting": "green",
    "stopping": "yellow",
    "finished": "cyan",
    "stopped": "yellow",
    "failed": "bold red",
    "dead": "red",
    "created": "dim",
}


def text_bar(step: int, total: int, width: int = 10) -> str:
    """A fixed-width bar for table cells, where a ProgressBar widget does not fit."""
    frac = min(1.0, step / total) if total else 0.0
    full = int(frac * width)
    return "█" * full + "░" * (width - full)


def fmt_num(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)
