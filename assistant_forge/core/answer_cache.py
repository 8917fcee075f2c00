"""A base model's greedy answers, kept by what determines them so later runs skip generating them.

Greedy answers depend only on the model's files, the tokenizer and chat template, the exact text each
prompt renders to (system prompt included), the answer budget and where/how the model runs. The key
hashes all of that; the answers live in the user cache dir (`<cache>/answers/<key>.jsonl`). For the
embedded demo model they also ship in sample_data/base_answers/, so even a first `forge demo` skips
generation (tests/core/test_answer_cache.py regenerates some and checks they match).

Hashing a model's weights is done once per file: the digest is kept beside the answers, keyed by the
file's path, size and modification time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from assistant_forge.core.fsutil import atomic_write_json, atomic_write_jsonl
from assistant_forge.paths import bundled, cache_dir

# Bumped when the way answers are produced or post-processed changes (decode, strip, stop tokens).
FORMAT = 1
# Files of a model folder that decide its answers (weights, architecture, generation defaults, tokenizer).
_MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "generation_config.json", "tokenizer*", "*.jinja")


def _answers_dir() -> Path:
    path = Path(os.environ.get("FORGE_ANSWERS_DIR") or cache_dir() / "answers")  # tests point it elsewhere
    path.mkdir(parents=True, exist_ok=True)
    return path


def shipped_dir() -> Path:
    return bundled("sample_data") / "base_answers"


def _file_digest(path: Path, memo: dict[str, Any]) -> str:
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    known = memo.get(str(path))
    if known and known[0] == stamp:
        return known[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    memo[str(path)] = [stamp, h.hexdigest()]
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """A digest of the files of a local model folder that decide its answers (hashed once per file)."""
    folder = Path(model_dir).resolve()
    files = sorted({p for pattern in _MODEL_FILES for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"no model files in {folder}")
    memo_path = _answers_dir() / "file_digests.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    before = dict(memo)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_digest(p, memo)}\0".encode())
    if memo != before:
        with contextlib.suppress(OSError):
            atomic_write_json(memo_path, memo)
    return h.hexdigest()


def local_model_dir(spec: str) -> Path | None:
    """The local folder of a model given as a folder or an already downloaded hub id; None if neither."""
    if Path(spec).is_dir():
        return Path(spec)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # not a hub id, or not downloaded: no cache, the answers are generated
        return None


def answers_key(fingerprint: str, rendered: Sequence[str], max_new_tokens: int, runtime: str) -> str:
    """The key of a set of greedy answers: model, rendered prompts, budget and runtime (device, dtype)."""
    payload = json.dumps(
        {
            "format": FORMAT,
            "model": fingerprint,
            "prompts": list(rendered),
            "max_new_tokens": max_new_tokens,
            "runtime": runtime,
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def runtime_of(model: Any) -> str:
    """Where and how the model runs: answers on a GPU in bf16 or 4-bit differ from fp32 on a CPU."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None and hasattr(quant, "to_dict"):
        quant = quant.to_dict()
    return json.dumps([str(model.device.type), str(model.dtype), quant], sort_keys=True, default=str)


def _read(path: Path, prompts: Sequence[str]) -> list[str] | None:
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if [r.get("prompt") for r in rows] != list(prompts):  # a damaged or foreign file is not trusted
        return None
    return [r["answer"] for r in rows]


def lookup(key: str, prompts: Sequence[str]) -> list[str] | None:
    """Cached answers for `key` (the user cache first, then the shipped ones), or None."""
    for folder in (_answers_dir(), shipped_dir()):
        path = folder / f"{key}.jsonl"
        if path.is_file() and (answers := _read(path, prompts)) is not None:
            return answers
    return None


def store(key: str, prompts: Sequence[str], answers: Sequence[str], folder: Path | None = None) -> Path:
    path = (folder or _answers_dir()) / f"{key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(path, [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)])
    return path


def cached_answers(
    model_spec: str,  # as the config or command line gives it ("demo", a folder, a hub id)
    model: Any,
    tok: Any,
    conversations: list[list[dict]],
    max_new_tokens: int,
    generate: Callable[[], list[str]],
) -> tuple[list[str], bool]:
    """`generate()`'s answers to `conversations`, from the cache when this exact set was answered before.

    Returns (answers, whether they came from the cache). Models that are not local folders or
    downloaded hub ids are answered every time.
    """
    from assistant_forge.core.models import resolve_model
    from assistant_forge.core.templates import render

    folder = local_model_dir(resolve_model(model_spec))
    if folder is None or os.environ.get("FORGE_NO_ANSWER_CACHE"):
        return generate(), False
    rendered = [render(tok, c, add_generation_prompt=True) for c in conversations]
    key = answers_key(model_fingerprint(folder), rendered, max_new_tokens, runtime_of(model))
    prompts = [c[-1]["content"] for c in conversations]
    if (answers := lookup(key, prompts)) is not None:
        return answers, True
    answers = generate()
    with contextlib.suppress(OSError):  # a cache that cannot be written costs time, never the run
        store(key, prompts, answers)
    return answers, False


def base_eval_answers(
    chat: Any,
    model_spec: str,
    max_new_tokens: int,
    langs: Sequence[str],
    limit: int | None = None,
    split: str = "test",
) -> dict[str, str]:
    """A base model's answers to the held-out generic prompts and compound tasks of a split
    (`run_eval`'s `base_answers`), cached: the key covers the prompts, so each split has its own."""
    from assistant_forge.core.encoding import with_system
    from assistant_forge.core.evaluate import base_prompts, collect_answers

    prompts = base_prompts(langs, limit, split)
    convs = [with_system([{"role": "user", "content": p}], chat.system) for p in prompts]
    answers, _ = cached_answers(
        model_spec,
        chat.model,
        chat.tok,
        convs,
        max_new_tokens,
        lambda: collect_answers(lambda b: chat.answer_batch(b, max_new_tokens), prompts, chat.batch_size),
    )
    return dict(zip(prompts, answers, strict=True))
