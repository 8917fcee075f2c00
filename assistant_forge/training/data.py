"""Training samples: tokenize, pack into rows of at most max_length, and a padding-free collator.

Packing concatenates whole samples; position ids restart at every sample, which transformers turns
into a block-diagonal causal mask, so no sample ever attends to another.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assistant_forge.core.encoding import IGNORE, encode_chats, stop_token_ids, with_system


def encode_records(
    tok: Any, records: list[dict], max_length: int, system_prompt: str | None = None
) -> list[dict]:
    samples = []
    stops = set(stop_token_ids(tok))
    convs = [with_system(rec["messages"], system_prompt) for rec in records]
    for rec, enc in zip(records, encode_chats(tok, convs, max_length)):
        if enc is not None and rec.get("open_end"):
            enc = _without_final_stop(enc, stops)
        if enc is not None:
            samples.append(enc)
    return samples


def _without_final_stop(enc: dict, stops: set[int]) -> dict | None:
    """No loss on the end-of-turn token of an answer that was cut off, not finished."""
    labels = list(enc["labels"])
    last = max((i for i, label in enumerate(labels) if label != IGNORE), default=None)
    if last is None or enc["input_ids"][last] not in stops:
        return enc
    labels[last] = IGNORE
    return None if all(label == IGNORE for label in labels) else {**enc, "labels": labels}


def pack(samples: list[dict], max_length: int, packing: bool, seed: int) -> list[dict]:
    """Rows of one or more whole samples, each row at most max_length tokens, order shuffled by seed."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    ordered = [samples[i] for i in order]
    starts = row_starts([len(s["input_ids"]) for s in ordered], max_length, packing)
    return [_join(ordered[a:b]) for a, b in zip(starts, starts[1:])]


def row_starts(lengths: Sequence[int], max_length: int, packing: bool) -> list[int]:
    """Where each row begins in a sequence of sample lengths (and, last, the end): consecutive samples
    share a row while they fit in max_length; without packing every sample is a row of its own."""
    starts = [0]
    cur = 0
    for i, n in enumerate(lengths):
        if i > starts[-1] and (not packing or cur + n > max_length):
            starts.append(i)
            cur = 0
        cur += n
    if lengths:
        starts.append(len(lengths))
    return starts


# --- the same through `datasets`: cached by content, tokenized by several processes, memory flat ---------


def _encode_batch(batch: dict, tok: Any, max_length: int, system_prompt: str | None) -> dict:
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    convs = [with_system(messages, system_prompt) for messages in batch["messages"]]
    for enc in encode_chats(tok, convs, max_length):
        # A sample with no assistant token left within max_length stays as an empty row: check counts it.
        ids, labels = (enc["input_ids"], enc["labels"]) if enc else ([], [])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
    return out


def encode_fingerprint(source_fingerprint: str, tok: Any, max_length: int, system_prompt: str | None) -> str:
    """What the encoded samples depend on: the conversations, the tokenizer and the template it carries,
    the limits, and the encoding code itself (so a new forge never reuses samples an older one made)."""
    from assistant_forge.core import encoding, templates

    h = hashlib.sha256()
    for part in (
        source_fingerprint,
        getattr(tok, "name_or_path", ""),
        str(len(tok)),
        _tokenizer_digest(tok),
        str(tok.chat_template or ""),
        str(max_length),
        system_prompt or "",
        Path(encoding.__file__).read_bytes().hex(),
        Path(templates.__file__).read_bytes().hex(),
        inspect.getsource(_encode_batch),
    ):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def _tokenizer_digest(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def default_num_proc(configured: int = 0) -> int:
    return configured or max(
        1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    )


def encode_dataset(
    conversations: Any,
    tok: Any,
    max_length: int,
    system_prompt: str | None = None,
    num_proc: int = 0,
) -> Any:
    """Conversations (a Dataset with a messages column) as samples: input_ids, labels, length (0: dropped)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the map's processes are forked
    procs = min(default_num_proc(num_proc), max(1, len(conversations) // 1000))  # small data: no pool
    return conversations.map(
        _encode_batch,
        batched=True,
        batch_size=200,
        num_proc=procs if procs > 1 else None,
        remove_columns=conversations.column_names,
        fn_kwargs={
            "tok": tok,
            "max_length": max_length,
            "system_prompt": system_prompt,
        },
        new_fingerprint=encode_fingerprint(conversations._fingerprint, tok, max_length, system_prompt),
    )


PACK_CHUNK = 2000  # packed rows gathered and written at a time: memory stays flat whatever the data size


def pack_dataset(samples: Any, max_length: int, packing: bool, seed: int) -> Any:
    """pack() over a Dataset of samples, with the same rows: shuffled by seed, joined while they fit.

    Done with Arrow and numpy (a packed row's tokens are its samples' tokens back to back, so rows are
    new offsets over the gathered samples), written chunk by chunk to a cache file beside the samples'
    and memory-mapped; a second run with the same samples, seed and limits opens that file at once.
    """
    import datasets
    import numpy as np

    lengths = np.asarray(samples["length"], dtype=np.int64)
    order = [i for i in range(len(lengths)) if lengths[i]]
    random.Random(seed).shuffle(order)
    order_np = np.asarray(order, dtype=np.int64)
    starts = row_starts(lengths[order_np].tolist(), max_length, packing)
    key = hashlib.sha256(
        f"{samples._fingerprint}|{max_length}|{packing}|{seed}|{inspect.getsource(_write_packed)}".encode()
    ).hexdigest()[:32]
    folders = {Path(f["filename"]).parent for f in samples.cache_files}
    if not folders:  # samples held in memory (a tiny run): no cache to keep
        return datasets.Dataset(_packed_table(samples, order_np, starts, lengths))
    path = sorted(folders)[0] / f"forge-packed-{key}.arrow"
    if not path.exists():
        _write_packed(samples, order_np, starts, lengths, path)
    return datasets.Dataset.from_file(str(path))


def _write_packed(samples: Any, order: Any, starts: list[int], lengths: Any, path: Path) -> None:
    import pyarrow as pa

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            writer = None
            for r0 in range(0, len(starts) - 1, PACK_CHUNK):
                r1 = min(r0 + PACK_CHUNK, len(starts) - 1)
                batch = _packed_batch(samples, order, starts[r0 : r1 + 1], lengths)
                if writer is None:
                    writer = pa.ipc.new_stream(sink, batch.schema)
                writer.write_batch(batch)
            if writer is not None:
                writer.close()
        os.replace(tmp, path)  # whole or not at all: a killed run leaves no half-written cache
    finally:
        if tmp.exists():
            tmp.unlink()


def _packed_table(samples: Any, order: Any, starts: list[int], lengths: Any) -> Any:
    import pyarrow as pa

    if len(starts) < 2:
        return pa.table(
            {k: pa.array([], pa.list_(pa.int32())) for k in ("input_ids", "labels", "position_ids")}
        )
    return pa.Table.from_batches([_packed_batch(samples, order, starts, lengths)])


def _packed_batch(samples: Any, order: Any, starts: list[int], lengths: Any) -> Any:
    """Packed rows starts[0]..starts[-1] (indices into the shuffled order) as one Arrow record batch."""
    import numpy as np
    import pyarrow as pa

    idx = order[starts[0] : starts[-1]]
    sub = samples.with_format("arrow")[idx.tolist()]
    ids = sub.column("input_ids").combine_chunks().flatten().to_numpy().astype(np.int32)
    labels = sub.column("labels").combine_chunks().flatten().to_numpy().astype(np.int32)
    lens = lengths[idx]
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])  # where each sample starts in the flat tokens
    # The first token of a sample is never predicted from the previous sample's last token (as _join).
    labels[first] = IGNORE
    pos = (np.arange(len(ids)) - np.repeat(first, lens)).astype(np.int32)
    ends = np.concatenate([[0], np.cumsum(lens)])
    offsets = pa.array(ends[np.asarray(starts) - starts[0]].astype(np.int32))
    return pa.record_batch(
        [pa.ListArray.from_arrays(offsets, pa.array(v)) for v in (ids, labels, pos)],
        names=["input_ids", "labels", "position_ids"],
    )


def length_stats(samples: Any, max_length: int, bins: int = 10) -> dict:
    """Token lengths of the encoded samples: count, mean, percentiles, how many max_length cut, a histogram."""
    import numpy as np

    lengths = np.asarray(samples["length"], dtype=np.int64)
    kept = lengths[lengths > 0]
    if not len(kept):
        return {"samples": 0, "dropped": int(len(lengths)), "truncated": 0, "histogram": []}
    counts, edges = np.histogram(kept, bins=bins, range=(0, max_length))
    return {
        "samples": int(len(kept)),
        "tokens": int(kept.sum()),
        "mean": round(float(kept.mean()), 1),
        "min": int(kept.min()),
        "p50": int(np.percentile(kept, 50)),
        "p90": int(np.percentile(kept, 90)),
        "p99": int(np.percentile(kept, 99)),
        "max": int(kept.max()),
        # encode_chat cuts at max_length: a sample that long was (almost surely) cut; a dropped one lost
        # every assistant token to the cut.
        "truncated": int((kept >= max_length).sum()),
        "dropped": int((lengths == 0).sum()),
        "histogram": [[int(edges[i]), int(edges[i + 1]), int(c)] for i, c in enumerate(counts)],
    }


def _join(parts: list[dict]) -> dict:
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for p in parts:
        ids += p["input_ids"]
        # The first token of a sample is never predicted from the previous sample's last token.
        labels += [IGNORE, *p["labels"][1:]]
        pos += list(range(len(p["input_ids"])))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


class FlatCollator:
    """Concatenate a micro-batch of rows into one row (no padding); position ids keep samples apart."""

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        ids = [t for r in rows for t in r["input_ids"]]
        labels = [t for r in rows for t in r["labels"]]
        pos = [t for r in rows for t in r["position_ids"]]
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
            # transformers only derives the per-sample mask from position ids when no KV cache is built.
            "use_cache": False,
        }


def mix_replay(records: list[dict], replay: list[dict], ratio: float, seed: int) -> list[dict]:
    """Add replay samples so they make up `ratio` of the result (cycling when there are too few)."""
    return list(records) + replay_draw(len(records), replay, ratio, seed)


def replay_draw(n: int, replay: list[dict], ratio: float, seed: int) -> list[dict]:
    """The replay records to add to n conversations so they make up `ratio` of the whole."""
    if ratio <= 0 or not replay or not n:
        return []
    want = round(n * ratio / (1 - ratio))
    rng = random.Random(seed)
    pool = list(replay)
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(want)]
