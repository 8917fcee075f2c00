"""Training samples: tokenize, pack into rows of at most max_length, and a padding-free collator.

Packing concatenates whole samples; position ids restart at every sample, which transformers turns
into a block-diagonal causal mask, so no sample ever attends to another.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

from assistant_forge.core.encoding import IGNORE, encode_chat, stop_token_ids, with_system


def encode_records(
    tok: Any, records: list[dict], max_length: int, system_prompt: str | None = None
) -> list[dict]:
    samples = []
    stops = set(stop_token_ids(tok))
    for rec in records:
        enc = encode_chat(tok, with_system(rec["messages"], system_prompt), max_length)
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
    return _greedy([samples[i] for i in order], max_length, packing)


def _greedy(samples: list[dict], max_length: int, packing: bool) -> list[dict]:
    """Consecutive samples joined while they fit in max_length (one sample per row without packing)."""
    rows: list[dict] = []
    cur: list[dict] = []
    cur_len = 0
    for s in samples:
        if cur and (not packing or cur_len + len(s["input_ids"]) > max_length):
            rows.append(_join(cur))
            cur, cur_len = [], 0
        cur.append(s)
        cur_len += len(s["input_ids"])
    if cur:
        rows.append(_join(cur))
    return rows


# --- the same through `datasets`: cached by content, tokenized by several processes, memory flat ---------

PACK_BATCH = 2000  # samples packed together; a row left part-empty at each batch's end costs < 0.1%


def _encode_batch(batch: dict, tok: Any, max_length: int, system_prompt: str | None) -> dict:
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for messages in batch["messages"]:
        enc = encode_chat(tok, with_system(messages, system_prompt), max_length)
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
        Path(__file__).read_bytes().hex(),
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


def _pack_batch(batch: dict, max_length: int, packing: bool) -> dict:
    samples = [{"input_ids": i, "labels": b} for i, b in zip(batch["input_ids"], batch["labels"])]
    rows = _greedy(samples, max_length, packing)
    return {k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids")}


def pack_dataset(samples: Any, max_length: int, packing: bool, seed: int) -> Any:
    """Like pack(), over a Dataset of samples: shuffled by seed, packed batch by batch, cached."""
    lengths = samples["length"]
    order = [i for i in range(len(lengths)) if lengths[i]]
    random.Random(seed).shuffle(order)
    shuffled = samples.select(order)
    return shuffled.map(
        _pack_batch,
        batched=True,
        batch_size=PACK_BATCH,
        remove_columns=shuffled.column_names,
        fn_kwargs={"max_length": max_length, "packing": packing},
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
