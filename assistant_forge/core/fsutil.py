"""Writes that never leave a half-written file behind: temp file in the same folder, then rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_lines(path, [text])


def atomic_write_lines(path: Path, chunks: Iterable[str]) -> None:
    """Write text produced piece by piece (a million rows need not be held at once); an exception from
    `chunks` leaves any earlier file as it was."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(chunks)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temp file beside `path` for a writer that opens files by name; it becomes `path` (with `mode`,
    else mkstemp's owner-only 0600) only if the block finishes; an exception (or Ctrl-C) removes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def staged_dir(target: Path, marker: str | None = None) -> Iterator[Path]:
    """A folder to fill that becomes `target` only if the block finishes (with `marker` written in it
    last); an exception leaves no staging folder and any earlier `target` as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
    try:
        yield staging
        if marker:
            (staging / marker).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_lines(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """One line per call, flushed, so watchers tailing the file see whole lines."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def restrict_umask() -> None:
    """Never create group- or world-writable files or folders, whatever umask we were started with."""
    os.umask(os.umask(0o022) | 0o022)
