"""Reading a growing file by byte offset: each read returns only the complete lines appended since.

Polling, not inotify (not everywhere, and NFS homes are common on GPU boxes). Used by `forge runs
logs -f` (core.runs.follow_file), core.runs.read_jsonl and the TUI's run watcher (tui.watch).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

MAX_READ = 1 << 20  # bytes per read: a huge backlog is caught up over several reads


class FileTail:
    """Complete lines appended to a file since the last read (a partial last line waits)."""

    def __init__(self, path: Path, backlog: int | None = None) -> None:
        """backlog: start that many bytes before the current end instead of at the start."""
        self.path = path
        self.pos = 0
        self.buf = b""
        self.backlog = backlog

    def read_lines(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.pos:  # truncated or replaced: start over
            self.pos, self.buf = 0, b""
        if self.backlog is not None:
            self.pos = max(self.pos, size - self.backlog)
            self.backlog = None
        if size == self.pos:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            chunk = f.read(MAX_READ)
        self.pos += len(chunk)
        data = self.buf + chunk
        *lines, self.buf = data.split(b"\n")
        return [ln.decode("utf-8", errors="replace").rstrip("\r") for ln in lines]

    def read_all_lines(self) -> list[str]:
        """Every complete line appended since the last read, however much that is."""
        out: list[str] = []
        while self.path.exists() and self.pos < self.path.stat().st_size:
            out += self.read_lines()
        return out

    def partial_line(self) -> str:
        """The last line, not yet ended by a newline (and now taken)."""
        rest, self.buf = self.buf, b""
        return rest.decode("utf-8", errors="replace")


def json_objects(lines: Iterable[str]) -> list[dict]:
    """The JSON objects among lines forge appended to a run's file; any other line is skipped.

    Plain json, not jsonlines: these files are written by forge itself and read while being written,
    so a line that does not parse (a crash mid-write) is skipped rather than reported. User data goes
    through jsonlines in core.sources, whose errors name file:line.
    """
    out = []
    for ln in lines:
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(ln)
            if isinstance(obj, dict):
                out.append(obj)
    return out
