"""Incremental reading of a run directory for the UI: new events, samples and log lines.

Pure Python, reading each file by byte offset (core.tail): a poll reads only what was appended since
the last one, so watching a long run costs the same at step 10 and at step 10 000. Runs in a worker
thread, never in the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from assistant_forge.core.tail import FileTail, json_objects

LOG_BACKLOG = 64 << 10  # a reattached watcher shows only the log's last 64 KiB


@dataclass
class RunUpdate:
    run: Path
    status: dict
    events: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)

    @property
    def has_news(self) -> bool:
        return bool(self.events or self.samples or self.log)


class RunWatcher:
    """Polls one run directory; each poll returns only what is new."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.events = FileTail(run / "events.jsonl")
        self.samples = FileTail(run / "samples.jsonl")
        self.log = FileTail(run / "train.log", backlog=LOG_BACKLOG)
        self._last_status: dict | None = None

    def poll(self) -> RunUpdate | None:
        """The news since the last poll, or None when nothing changed."""
        from assistant_forge.core.runs import complete_checkpoints, read_status

        status = read_status(self.run)
        upd = RunUpdate(
            self.run,
            status,
            events=json_objects(self.events.read_lines()),
            samples=json_objects(self.samples.read_lines()),
            log=self.log.read_lines(),
        )
        if not upd.has_news and status == self._last_status:
            return None
        self._last_status = status
        upd.checkpoints = [s for s, _ in complete_checkpoints(self.run)]
        return upd
