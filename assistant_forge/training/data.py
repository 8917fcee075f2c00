"""Training samples: tokenize, pack into rows of at most max_length (best fit), and the collator.

Packing concatenates whole samples; position ids restart at every sample, which transformers turns
into a block-diagonal causal mask, so no sample ever attends to another.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assistant_forge.core.encoding import IGNORE, encode_chats, stop_token_ids, with_system
from assistant_forge.training.base_anchor import REPLAY


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
    order, starts = row_order([len(s["input_ids"]) for s in samples], max_length, packing, seed)
    ordered = [samples[i] for i in order]
    return [_join(ordered[a:b]) for a, b in zip(starts, starts[1:])]


def row_order(
    lengths: Sequence[int], max_length: int, packing: bool, seed: int
) -> tuple[list[int], list[int]]:
    """Which samples make each row: `order` lists sample indices row after row, `starts` where each row
    begins in it (and, last, the end). Rows come in an order shuffled by seed.

    Without packing every sample is a row. With packing, best fit decreasing: the longest sample first,
    each into the open row with the least room that still fits it. Filling rows in data order left a
    fifth of each 2048-token row empty on identity data mixed with chat data (79% full; best fit 99%),
    and the fast path pads every row to max_length so its compiled, graphed layers see one shape.
    """
    rng = random.Random(seed)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    if not packing:
        return shuffled, list(range(len(shuffled) + 1)) if shuffled else [0]
    # Python's sort is stable: equal lengths keep the seeded order.
    by_length = sorted(shuffled, key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room = _RoomIndex(max_length)
    for i in by_length:
        n = min(int(lengths[i]), max_length)
        row, left = room.take(n) or (len(rows), max_length)
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        room.put(row, left - n)
    rng.shuffle(rows)
    order = [i for r in rows for i in r]
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + len(r))
    return order, starts


class _RoomIndex:
    """Open rows by the room left in them: the row with the least room >= n in O(log max_length),
    through a Fenwick tree of counts per room size."""

    def __init__(self, max_length: int) -> None:
        self.size = max_length + 1
        self.tree = [0] * (self.size + 1)
        self.rows: list[list[int]] = [[] for _ in range(self.size)]
        self.top = 1 << self.size.bit_length()

    def _add(self, room: int, delta: int) -> None:
        k = room + 1
        while k <= self.size:
            self.tree[k] += delta
            k += k & -k

    def put(self, row: int, room: int) -> None:
        if room > 0:
            self.rows[room].append(row)
            self._add(room, 1)

    def take(self, n: int) -> tuple[int, int] | None:
        """Remove and return the row with the least room >= n and that room, or None."""
        before = self._prefix(n - 1)  # rows with room < n
        # The (before+1)-th row in order of room, found by descending the tree.
        k, pos, want = 0, self.top, before + 1
        while pos:
            nxt = k + pos
            if nxt <= self.size and self.tree[nxt] < want:
                k = nxt
                want -= self.tree[nxt]
            pos >>= 1
        if k >= self.size:
            return None
        room = k  # tree index k + 1 holds room k
        self._add(room, -1)
        return self.rows[room].pop(), room

    def _prefix(self, room: int) -> int:
        total, k = 0, room + 1
        while k > 0:
            total += self.tree[k]
            k -= k & -k
        return total


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
    """pack() over a Dataset of samples, with the same rows (row_order: best fit, shuffled by seed).

    Done with Arrow and numpy (a packed row's tokens are its samples' tokens back to back, so rows are
    new offsets over the gathered samples), written chunk by chunk to a cache file beside the samples'
    and memory-mapped; a second run with the same samples, seed and limits opens that file at once.
    """
    import datasets
    import numpy as np

    lengths = np.asarray(samples["length"], dtype=np.int64)

    def rows() -> tuple[Any, list[int]]:
        kept = np.flatnonzero(lengths)  # empty samples (no answer left within max_length) make no row
        order, starts = row_order(lengths[kept].tolist(), max_length, packing, seed)
        return kept[np.asarray(order, dtype=np.int64)], starts

    code = inspect.getsource(_write_packed) + inspect.getsource(row_order) + inspect.getsource(_RoomIndex)
    digest = hashlib.sha256(f"{samples._fingerprint}|{max_length}|{packing}|{seed}|{code}".encode())
    key = digest.hexdigest()[:32]
    folders = {Path(f["filename"]).parent for f in samples.cache_files}
    if not folders:  # samples held in memory (a tiny run): no cache to keep
        return datasets.Dataset(_packed_table(samples, *rows(), lengths))
    path = sorted(folders)[0] / f"forge-packed-{key}.arrow"
    if not path.exists():
        _write_packed(samples, *rows(), lengths, path)
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
    columns = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if REPLAY in sub.column_names:  # train.kl_to_base: which tokens are replay, sample flag per token
        columns[REPLAY] = np.repeat(sub.column(REPLAY).to_numpy().astype(np.int8), lens)
    return pa.record_batch(
        [pa.ListArray.from_arrays(offsets, pa.array(v)) for v in columns.values()], names=list(columns)
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


REAL_TOKENS = "forge_real_tokens"  # a collated batch's token count without padding (not a model input)
# The samples' boundaries in a flat micro-batch, under the names transformers passes down to the
# attention function (training.fast.attention reads them).
CU_SEQ_Q, CU_SEQ_K, MAX_Q, MAX_K = "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"


class FlatCollator:
    """Concatenate a micro-batch of rows into one row; position ids keep samples apart.

    `pad_to`: pad the row to this many tokens (a last "sample" of pad tokens that carries no loss), so
    every micro-batch has one shape: compiled layers never recompile and their CUDA graphs replay on
    every step. The batch carries its count of real tokens under REAL_TOKENS, for the trainer to count
    when it trains on it (the Trainer's own count would include the padding, and syncs with the GPU).

    `boundaries`: also send where each sample starts (cumulative lengths, int32, this many + 1
    entries: the list is padded with empty samples at the end so that it has one shape too) and the
    longest sample (the row length when padded), for varlen attention (training.fast.attention).
    """

    def __init__(self, pad_to: int = 0, pad_id: int = 0, boundaries: int = 0) -> None:
        self.pad_to, self.pad_id, self.boundaries = pad_to, pad_id, boundaries

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        ids = [t for r in rows for t in r["input_ids"]]
        labels = [t for r in rows for t in r["labels"]]
        pos = [t for r in rows for t in r["position_ids"]]
        replay = [t for r in rows for t in r[REPLAY]] if REPLAY in rows[0] else None
        real = len(ids)
        pad = self.pad_to - real
        if pad > 0:
            ids += [self.pad_id] * pad
            labels += [IGNORE] * pad
            pos += range(pad)
            replay = None if replay is None else replay + [0] * pad
        batch = {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]),
            # transformers only derives the per-sample mask from position ids when no KV cache is built.
            "use_cache": False,
            REAL_TOKENS: real,
        }
        if replay is not None:
            batch[REPLAY] = torch.tensor([replay], dtype=torch.int8)
        if self.boundaries:
            cu = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            if len(cu) <= self.boundaries + 1:  # more samples than planned for: SDPA's mask instead
                longest = len(pos) if self.pad_to else max(b - a for a, b in zip(cu, cu[1:]))
                cu += [len(pos)] * (self.boundaries + 1 - len(cu))
                batch[CU_SEQ_Q] = batch[CU_SEQ_K] = torch.tensor(cu, dtype=torch.int32)
                batch[MAX_Q] = batch[MAX_K] = longest
        return batch


def max_samples_per_row(rows: Any) -> int:
    """The most samples any packed row holds (each starts at position 0), read with Arrow."""
    import numpy as np
    import pyarrow.compute as pc

    most = 0
    for batch in rows.data.to_batches(max_chunksize=PACK_CHUNK):
        col = batch.column("position_ids")
        starts = pc.equal(pc.list_flatten(col), 0).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(col).to_numpy()
        if len(parents):
            most = max(most, int(np.bincount(parents[starts], minlength=len(col)).max()))
    return most


def mix_replay(records: list[dict], replay: list[dict], ratio: float, seed: int) -> list[dict]:
    """Add replay samples so they make up `ratio` of the result (cycling when there are too few)."""
    return list(records) + replay_draw(len(records), replay, ratio, seed)


# A base model that speaks of itself ("I'm sorry, but as a chatbot designed to assist users...", "我是一个...")
# in a replay answer: trained beside the new identity, such answers came back as "as a chatbot designed by
# Alice" on unrelated prompts, so the forgetting guard leaves them out.
_SELF_TALK = re.compile(
    r"\b(?:I'm|I am|as) (?:an? )?(?:AI|chatbot|(?:helpful |virtual |writing |text-based )?(?:assistant|AI)|"
    r"language model)\b|\bI'm (?:sorry for any|here to (?:help|assist))|\bmy name is\b|"
    r"(?:^|[。！？，\s])我是|作为(?:一[个名])?(?:AI|人工智能|助手|语言模型)|我的名字",
    re.IGNORECASE,
)


def speaks_of_itself(answer: str) -> bool:
    """Whether a base model's answer talks about the model itself (its role, name or limits)."""
    return _SELF_TALK.search(answer) is not None


def replay_draw(n: int, replay: list[dict], ratio: float, seed: int) -> list[dict]:
    """The replay records to add to n conversations so they make up `ratio` of the whole."""
    if ratio <= 0 or not replay or not n:
        return []
    want = round(n * ratio / (1 - ratio))
    rng = random.Random(seed)
    pool = list(replay)
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(want)]


def replay_openings(replay: list[dict], tokens: int, tok: Any) -> list[dict]:
    """Each replay answer's first `tokens` tokens once more, as a sample of its own (open-ended: no end
    of turn), so those tokens weigh twice. A tuned model chooses between doing a task and introducing
    itself at the first tokens of its answer (bench/RESULTS.md, issue 16, rounds 10-11)."""
    if tokens <= 0:
        return []
    out = []
    for rec in replay:
        *prompt, answer = rec["messages"]
        ids = tok(answer["content"], add_special_tokens=False)["input_ids"][:tokens]
        # A cut can split a character's bytes (Chinese): the broken tail decodes as U+FFFD, dropped.
        text = tok.decode(ids).rstrip("\ufffd")
        if text.strip():
            out.append({"messages": [*prompt, {"role": "assistant", "content": text}], "open_end": True})
    return out
