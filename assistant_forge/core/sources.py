"""Where rows come from: JSON/JSONL, Parquet and CSV/TSV files, folders of them, `save_to_disk`
folders and Hugging Face hub datasets (`hf:owner/name[:split]`).

JSON and JSONL are read here (JSONL line by line with `jsonlines`), so every problem names its
`file:line`. Everything else is opened with `datasets`, which keeps its own Arrow cache: a hub
dataset downloaded once loads again offline. `datasets` is imported inside functions (0.7 s; it
does not pull torch, but `forge --help` should not wait for it).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant_forge.core.formats import DatasetError
from assistant_forge.errors import first_line

HF_PREFIX = "hf:"
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
JSON_SUFFIXES = (".json", ".jsonl")
DATA_SUFFIXES = (*JSON_SUFFIXES, *TABLE_SUFFIXES)


@dataclass(frozen=True)
class Source:
    """One entry of data.files / data.general_files (or a CLI argument), resolved."""

    spec: str  # a path, or hf:owner/name[:split]
    config: str | None = None  # the hub dataset's configuration (subset)
    split: str | None = None  # for hub datasets, folders and save_to_disk dataset dicts
    columns: dict[str, str] | None = None  # prompt/response/system field names
    max_rows: int | None = None  # use at most this many rows (after shuffling with the run's seed)
    ratio: float | None = None  # general data: this many rows per row of data.files

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HF_PREFIX)

    def hub_id_and_split(self) -> tuple[str, str]:
        repo, _, split = self.spec[len(HF_PREFIX) :].partition(":")
        if repo.count("/") > 1 or not repo.strip("/"):
            raise DatasetError(f"{self.spec}: expected hf:owner/name or hf:owner/name:split.")
        return repo, split or self.split or "train"

    @property
    def label(self) -> str:
        if self.is_hub:
            repo, split = self.hub_id_and_split()
            return f"hf:{repo}" + (f" ({self.config})" if self.config else "") + f":{split}"
        return self.spec


def as_source(entry: str | Mapping[str, Any] | Any, columns: Mapping[str, str] | None = None) -> Source:
    """A Source from a path string, a config table ({path = ..., max_rows = ...}) or a DataSource model."""
    if isinstance(entry, Source):
        return entry
    if isinstance(entry, str):
        return Source(entry, columns=dict(columns) if columns else None)
    data = entry if isinstance(entry, Mapping) else entry.model_dump(exclude_none=True)
    own = data.get("columns")
    return Source(
        str(data["path"]),
        config=data.get("config"),
        split=data.get("split"),
        columns=dict(own) if own else (dict(columns) if columns else None),
        max_rows=data.get("max_rows"),
        ratio=data.get("ratio"),
    )


def kind_of(src: Source) -> str:
    """hub, saved (save_to_disk), folder, parquet, csv, tsv or json (JSON array or JSON Lines)."""
    if src.is_hub:
        return "hub"
    path = Path(src.spec)
    if not path.exists():
        raise DatasetError(f"Dataset file {path} does not exist.")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "saved"
        return "folder"
    return TABLE_SUFFIXES.get(path.suffix.lower(), "json")


def stamp(src: Source) -> list:
    """What identifies a local source's content for caching: path, size and modification time of its files."""
    if src.is_hub:
        return [src.label]
    path = Path(src.spec).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [str(path)] + [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


# --- rows, as parsed Python objects --------------------------------------------------------------------


def iter_rows(src: Source) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the source, in order; where is `file:line` or `source: row N`."""
    if kind_of(src) == "json":
        path = Path(src.spec)
        for line, obj in json_rows(path):
            yield f"{path}:{line}", obj
        return
    table = open_table(src)
    for start in range(0, len(table), 1000):
        for i, row in enumerate(batch_rows(table[start : start + 1000]), start + 1):
            yield f"{src.label}: row {i}", row


def batch_rows(batch: Mapping[str, list]) -> Iterator[dict]:
    """The rows of a column batch (what datasets hands out) as one dict each."""
    names = list(batch)
    for values in zip(*(batch[n] for n in names)):
        yield dict(zip(names, values))


def json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for a JSON array file or a JSON Lines file, in file order."""
    import jsonlines

    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, after the first-line checks)
        # bytes: only b"\n" ends a line (U+2028 or a bare CR inside a string do not)
    except FileNotFoundError:
        raise DatasetError(f"Dataset file {path} does not exist.") from None
    except IsADirectoryError:
        raise DatasetError(f"Dataset path {path} is a folder, not a file.") from None
    except OSError as e:
        raise DatasetError(f"Dataset file {path} cannot be read: {e.strerror}.") from None
    with f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if not head:
            if not f.read().strip(b"\xef\xbb\xbf \t\r\n"):
                raise DatasetError(f"{path}: the file is empty.")
            f.seek(0)
        if head.startswith(b"["):
            yield from _json_array(path, f.read())
            return
        line = 0

        def lines() -> Iterator[bytes]:
            nonlocal line
            for line, text in enumerate(f, 1):  # noqa: B007 (the reader's position, read below)
                yield text

        try:
            # One object per read: after each, `line` is the line it came from (blank lines skipped).
            for obj in jsonlines.Reader(lines()).iter(skip_empty=True, allow_none=True):
                yield line, obj
        except jsonlines.InvalidLineError as e:
            what = "not valid UTF-8 text" if "utf-8" in e.args[0] else f"malformed JSON ({_detail(e)})"
            raise DatasetError(f"{path}:{e.lineno}: {what}.") from None
        except RecursionError:
            raise DatasetError(f"{path}:{line}: JSON nested too deeply.") from None


def _detail(e: Exception) -> str:
    """jsonlines' message without its own prefix and line suffix."""
    msg = first_line(e, 200).removeprefix("line contains invalid json: ")
    return msg.rsplit(" (line ", 1)[0]


def _json_array(path: Path, raw: bytes) -> Iterator[tuple[int, Any]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not valid UTF-8 text.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed JSON ({e.msg}).") from None
    except RecursionError:
        raise DatasetError(f"{path}: JSON nested too deeply.") from None
    except ValueError as e:  # e.g. an integer too long to convert
        raise DatasetError(f"{path}: malformed JSON ({first_line(e, 200)}).") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of records.")
    # Line numbers of array items are not tracked by json; report item positions instead.
    yield from ((i + 1, item) for i, item in enumerate(data))


# --- tables, through `datasets` -----------------------------------------------------------------------


def quiet_datasets() -> None:
    """No progress bars or cache notices: the CLI prints one line per problem, train.log stays readable."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    datasets.disable_progress_bars()
    # Errors reach the user as one DatasetError; the libraries' own log lines (a reader's error, the
    # Hub client's retries) would only repeat it.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    hub_logging.set_verbosity(hub_logging.CRITICAL)


def open_table(src: Source) -> Any:
    """The source as a `datasets.Dataset` (raw columns), through the `datasets` cache."""
    import datasets

    quiet_datasets()
    kind = kind_of(src)
    try:
        if kind == "hub":
            repo, split = src.hub_id_and_split()
            return _split(datasets.load_dataset(repo, src.config, split=split), src.label, split)
        if kind == "saved":
            loaded = datasets.load_from_disk(src.spec)
            if isinstance(loaded, datasets.DatasetDict):
                return _split(loaded, src.label, src.split or "train")
            return loaded
        if kind == "folder":
            if not any(p.suffix.lower() in DATA_SUFFIXES for p in Path(src.spec).rglob("*") if p.is_file()):
                raise DatasetError(
                    f"{src.spec}: the folder holds no data files ({', '.join(DATA_SUFFIXES)})."
                )
            return datasets.load_dataset(str(src.spec), split=src.split or "train")
        builder = "csv" if kind in ("csv", "tsv") else kind
        extra = {"delimiter": "\t"} if kind == "tsv" else {}
        return datasets.load_dataset(builder, data_files=str(src.spec), split="train", **extra)
    except DatasetError:
        raise
    except Exception as e:
        raise _explain(e, src, kind) from None


def _split(ds: Any, label: str, split: str) -> Any:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(f"{label}: no split {split!r} (it has {', '.join(ds)}).")
        return ds[split]
    return ds


def _explain(e: Exception, src: Source, kind: str) -> DatasetError:
    """One sentence for what `datasets` raised while opening a source."""
    cause = e
    while (
        cause.__cause__ is not None or cause.__context__ is not None
    ):  # DatasetGenerationError wraps the reader's error
        nxt = cause.__cause__ or cause.__context__
        if nxt is None or nxt is cause:
            break
        cause = nxt
    text = first_line(e, 200)
    if kind == "hub":
        if isinstance(e, ConnectionError) or "offline" in text.lower():
            return DatasetError(
                f"{src.label} is not in the local datasets cache and the Hub cannot be reached "
                f"({text}); load it once on a machine with internet and copy its datasets cache "
                f"({_datasets_cache()}) here, or point HF_HOME at such a cache."
            )
        if "Unknown split" in text:
            return DatasetError(f"{src.label}: {text.rstrip('.')}.")
        if "Couldn't find cache" in text:  # offline, and this configuration was never downloaded
            cached = re.search(r"Available configs in the cache: (\[.*?\])", str(e))
            return DatasetError(
                f"{src.label}: no configuration {src.config or 'default'!r} in the local datasets cache"
                + (f" (it has {', '.join(ast.literal_eval(cached.group(1)))})" if cached else "")
                + "; --hf-config (or config in the source table) picks one."
            )
        return DatasetError(f"{src.label}: cannot be loaded ({text.rstrip('.')}).")
    what = {
        "saved": "a save_to_disk folder",
        "folder": "a folder of data files",
        "parquet": "a Parquet file",
    }.get(kind, f"a {kind.upper()} file")
    detail = first_line(cause, 200) if cause is not e else text
    return DatasetError(f"{src.spec}: cannot be read as {what} ({detail}).")


def _datasets_cache() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)
