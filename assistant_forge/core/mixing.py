"""A run's conversations as one `datasets.Dataset`: every source converted and validated once (cached
by content in the `datasets` cache), general data de-duplicated, capped or weighted, drawn with the
run's seed. Memory stays flat: rows live in memory-mapped Arrow files, never in Python lists.

`datasets` is imported inside functions, so `assistant_forge.core` stays light to import.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from assistant_forge.core.formats import DatasetError, to_messages, validate_record
from assistant_forge.core.sources import (
    Source,
    as_source,
    batch_rows,
    json_rows,
    kind_of,
    open_table,
    quiet_datasets,
    stamp,
)


def features() -> Any:
    from datasets import Features, List, Value

    return Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "format": Value("string"),
        }
    )


def _json_records(spec: str, columns: dict | None, content_stamp: str) -> Iterator[dict]:
    """Rows of a JSON/JSONL file as records. `content_stamp` (size, mtime) is only there to key the cache."""
    from pathlib import Path

    for line, obj in json_rows(Path(spec)):
        where = f"{spec}:{line}"
        fmt, rec = to_messages(obj, where, columns)
        validate_record(rec, where)
        yield {"messages": rec["messages"], "format": fmt}


def _normalize_batch(batch: dict, indices: list[int], label: str, columns: dict | None) -> dict:
    out: dict[str, list] = {"messages": [], "format": []}
    for i, row in zip(indices, batch_rows(batch)):
        where = f"{label}: row {i + 1}"
        fmt, rec = to_messages(row, where, columns)
        validate_record(rec, where)
        out["messages"].append(rec["messages"])
        out["format"].append(fmt)
    return out


def normalized(src: Source) -> Any:
    """The source's conversations as a Dataset with columns messages and format (cached by content)."""
    import datasets

    quiet_datasets()
    try:
        if kind_of(src) == "json":
            ds = datasets.Dataset.from_generator(
                _json_records,
                features=features(),
                # No list values in gen_kwargs: datasets would read a list as shards, one generator each.
                gen_kwargs={
                    "spec": src.spec,
                    "columns": src.columns,
                    "content_stamp": json.dumps([stamp(src), code_digest()]),
                },
            )
        else:
            table = open_table(src)
            ds = table.map(
                _normalize_batch,
                batched=True,
                with_indices=True,
                remove_columns=table.column_names,
                features=features(),
                fn_kwargs={"label": src.label, "columns": src.columns},
                new_fingerprint=_digest(
                    table._fingerprint, src.label, json.dumps(src.columns), code_digest()
                ),
            )
    except DatasetError:
        raise
    except Exception as e:  # from_generator wraps the generator's own error
        inner = _forge_cause(e)
        if inner is not None:
            raise inner from None
        raise
    if len(ds) == 0:
        raise DatasetError(f"{src.label}: the source holds no conversations.")
    return ds


def code_digest() -> str:
    """The code that turns rows into records: a new forge never reuses records an older one converted
    (datasets' own cache key sees the function, not the modules it calls)."""
    from pathlib import Path

    from assistant_forge.core import formats, identity, sources

    files = (formats.__file__, identity.__file__, sources.__file__, __file__)
    return _digest(*(Path(f).read_bytes().hex() for f in files))


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def _forge_cause(e: BaseException) -> DatasetError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DatasetError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _key_batch(batch: dict) -> dict:
    """A digest per conversation: equal conversations (roles and text) get equal keys."""
    return {
        "key": [
            hashlib.blake2b(
                json.dumps(m, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass"),
                digest_size=12,
            ).hexdigest()
            for m in batch["messages"]
        ]
    }


def _keys(ds: Any) -> list[str]:
    return ds.map(_key_batch, batched=True, remove_columns=ds.column_names)["key"]


@dataclass
class SourceReport:
    label: str
    general: bool
    rows: int  # valid conversations the source holds
    used: int  # conversations that go into the run
    duplicates: int = 0  # general data only: rows dropped as already seen
    formats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_mix(
    files: Sequence[Any], general_files: Sequence[Any], columns: Mapping[str, str] | None, seed: int
) -> tuple[Any, list[SourceReport]]:
    """All sources as one Dataset of conversations (messages, format) and a report per source.

    data.files are used whole (repeats in your own data are deliberate: the tutorial repeats its
    identity pair) unless max_rows caps them. general_files are de-duplicated against everything
    before them, then drawn with the run's seed: max_rows caps a source, ratio = r takes r rows per row
    of data.files (fewer when the source has fewer).
    """
    import datasets

    parts, reports = [], []
    for entry in files:
        src = as_source(entry, columns)
        ds = normalized(src)
        rows = len(ds)
        ds = _draw(ds, src.max_rows, seed)
        parts.append(ds)
        reports.append(SourceReport(src.label, False, rows, len(ds), 0, _formats(ds)))
    n_main = sum(len(p) for p in parts)
    seen: set[str] = set()
    if general_files:
        for p in parts:
            seen.update(_keys(p))
    for entry in general_files:
        src = as_source(entry, columns)
        ds = normalized(src)
        rows = len(ds)
        keep = []
        for i, k in enumerate(_keys(ds)):
            if k not in seen:
                seen.add(k)
                keep.append(i)
        if len(keep) < rows:
            ds = ds.select(keep)
        want = src.max_rows
        if src.ratio is not None:
            want = min(want or len(ds), round(src.ratio * n_main))
        ds = _draw(ds, want, seed)
        parts.append(ds)
        reports.append(SourceReport(src.label, True, rows, len(ds), rows - len(keep), _formats(ds)))
    if not parts:
        raise DatasetError("The config lists no training data; set data.files.")
    mix = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return mix, reports


def _draw(ds: Any, n: int | None, seed: int) -> Any:
    """At most n rows, a seeded random choice (all rows, unshuffled, when n is None or not smaller)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def _formats(ds: Any) -> dict[str, int]:
    return dict(Counter(ds["format"]))
