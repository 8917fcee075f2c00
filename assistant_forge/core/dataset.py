"""Chat records: read any source in any known format, validate with file:line errors, write messages JSONL.

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI format). Formats are
core.formats (messages, ShareGPT, Alpaca, XTuner, oasst1 `text`, prompt/response); sources are
core.sources (JSON/JSONL, Parquet, CSV/TSV, folders, save_to_disk folders, `hf:owner/name`).
Reading streams: checking or converting a million rows never holds them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant_forge.core.formats import (  # noqa: F401 (DatasetError and friends are used from here)
    ROLES,
    DatasetError,
    detect_format,
    to_messages,
    validate_record,
)
from assistant_forge.core.sources import Source, as_source


@dataclass
class DatasetStats:
    records: int = 0
    turns: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    chars: int = 0

    def add(self, fmt: str, rec: dict) -> None:
        self.records += 1
        self.formats[fmt] += 1
        for m in rec["messages"]:
            self.turns[m["role"]] += 1
            self.chars += len(m["content"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "turns": dict(self.turns),
            "formats": dict(self.formats),
            "chars": self.chars,
        }


def iter_records(
    source: str | Path | Source, columns: Mapping[str, str] | None = None, stats: DatasetStats | None = None
) -> Iterator[dict]:
    """Converted, validated records of one source, in order; the first problem raises with its location.
    Counts go into `stats` as rows pass; a source with no conversation at all is an error."""
    src = as_source(str(source), columns) if isinstance(source, (str, Path)) else source
    stats = stats if stats is not None else DatasetStats()
    start = stats.records
    for where, obj in _rows(src):
        fmt, rec = to_messages(obj, where, src.columns)
        validate_record(rec, where)
        stats.add(fmt, rec)
        yield rec
    if stats.records == start:  # "[]": as empty as an empty file
        raise DatasetError(f"{src.label}: the file holds no conversations.")


def _rows(src: Source) -> Iterator[tuple[str, Any]]:
    from assistant_forge.core.sources import iter_rows

    return iter_rows(src)


def load_records(
    source: str | Path | Source, columns: Mapping[str, str] | None = None
) -> tuple[list[dict], DatasetStats]:
    """Read, convert and validate a whole source into a list (for small data: identity sets, the app)."""
    stats = DatasetStats()
    return list(iter_records(source, columns, stats)), stats


def check_records(source: str | Path | Source, columns: Mapping[str, str] | None = None) -> DatasetStats:
    """Validate every row of a source and count them, holding one row at a time."""
    stats = DatasetStats()
    for _ in iter_records(source, columns, stats):
        pass
    return stats


def write_records(records: Iterable[dict], path: str | Path) -> None:
    """Write messages JSONL atomically: a failure (also one raised while `records` is read) leaves
    any earlier file as it was."""
    from assistant_forge.core.fsutil import atomic_write_jsonl

    try:
        atomic_write_jsonl(Path(path), records)
    except OSError as e:
        raise DatasetError(f"Cannot write {path}: {e.strerror or e}.") from None
