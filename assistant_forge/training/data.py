"""Training samples: tokenize, pack into rows of at most max_length, and a padding-free collator.

Packing concatenates whole samples; position ids restart at every sample, which transformers turns
into a block-diagonal causal mask, so no sample ever attends to another.
"""

from __future__ import annotations

import random
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
    rows: list[dict] = []
    cur: list[dict] = []
    cur_len = 0
    for i in order:
        s = samples[i]
        if cur and (not packing or cur_len + len(s["input_ids"]) > max_length):
            rows.append(_join(cur))
            cur, cur_len = [], 0
        cur.append(s)
        cur_len += len(s["input_ids"])
    if cur:
        rows.append(_join(cur))
    return rows


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
    if ratio <= 0 or not replay or not records:
        return list(records)
    want = round(len(records) * ratio / (1 - ratio))
    rng = random.Random(seed)
    pool = list(replay)
    rng.shuffle(pool)
    return list(records) + [pool[i % len(pool)] for i in range(want)]
