"""`forge data ...`: write identity data, check, convert and preview any source (headless, cheap imports)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from assistant_forge.errors import ForgeError


def cmd_data_identity(a: argparse.Namespace) -> int:
    from assistant_forge.core.dataset import write_records
    from assistant_forge.core.identity import generate_identity_records, mixed_identity_records

    langs = [s.strip() for s in a.lang.split(",") if s.strip()]
    recs = generate_identity_records(
        a.name, a.author, langs=langs, count=a.count, facts=a.fact or (), seed=a.seed
    )
    if a.mixed:
        recs += mixed_identity_records(a.name, a.author, langs=langs, seed=a.seed)
    write_records(recs, a.output)
    print(f"wrote {len(recs)} conversations to {a.output}")
    return 0


def _source(a: argparse.Namespace, spec: str, columns: dict | None = None) -> Any:
    """The CLI's SOURCE argument with --split, --hf-config and --column applied."""
    from assistant_forge.core.sources import Source

    cols = dict(columns or {})
    for item in a.column or []:
        role, sep, name = item.partition("=")
        if not sep or role not in ("prompt", "response", "system") or not name:
            raise ForgeError(f"--column {item!r}: expected prompt=NAME, response=NAME or system=NAME.")
        cols[role] = name
    return Source(spec, config=a.hf_config, split=a.split, columns=cols or None)


def cmd_data_check(a: argparse.Namespace) -> int:
    from assistant_forge.core.dataset import check_records

    if a.source.endswith(".toml"):
        return _check_config(a)
    if a.preset:
        from assistant_forge.core.presets import resolve_config

        cfg, _ = resolve_config(a.preset)
        return _check_mix(a, cfg, [_source(a, a.source, cfg.data.columns)], [])
    stats = check_records(_source(a, a.source))
    d = stats.to_dict()
    if a.json:
        print(json.dumps(d, ensure_ascii=False))
    else:
        turns = ", ".join(f"{k} {v}" for k, v in sorted(d["turns"].items()))
        fmts = ", ".join(f"{k} {v}" for k, v in d["formats"].items())
        print(
            f"{a.source}: {d['records']} conversations OK ({turns}; formats: {fmts}; {d['chars']} characters)"
        )
    return 0


def _check_config(a: argparse.Namespace) -> int:
    """Every source of a config, mixed as a run mixes them, with its tokenizer's length statistics."""
    from assistant_forge.core.config import load_config

    cfg = load_config(a.source)
    if a.preset:
        from assistant_forge.core.presets import resolve_config

        cfg.model = resolve_config(a.preset)[0].model
    if not cfg.data.files:
        raise ForgeError(f"{a.source}: the config lists no training data; set data.files.")
    return _check_mix(a, cfg, cfg.data.files, cfg.data.general_files)


def _check_mix(a: argparse.Namespace, cfg: Any, files: list, general: list) -> int:
    from assistant_forge.core.mixing import build_mix

    mix, reports = build_mix(files, general, cfg.data.columns, cfg.train.seed)
    out: dict[str, Any] = {"sources": [r.to_dict() for r in reports], "conversations": len(mix)}
    if not a.json:  # the counts first: a tokenizer that cannot load still leaves them on screen
        for r in reports:
            fmts = ", ".join(f"{k} {v}" for k, v in sorted(r.formats.items()))
            dup = f", {r.duplicates} duplicates dropped" if r.duplicates else ""
            kind = "general" if r.general else "data"
            print(f"{kind} {r.label}: {r.rows} conversations OK, {r.used} used{dup} (formats: {fmts})")
        print(f"total: {len(mix)} conversations", flush=True)
    if not a.no_tokens:
        out["tokens"] = _token_stats(cfg, mix)
    if a.json:
        print(json.dumps(out, ensure_ascii=False))
    elif "tokens" in out:
        print(_format_tokens(out["tokens"], cfg))
    return 0


def _token_stats(cfg: Any, mix: Any) -> dict:
    from assistant_forge.core.encoding import load_tokenizer
    from assistant_forge.core.models import resolve_model
    from assistant_forge.training.data import encode_dataset, length_stats

    try:
        tok = load_tokenizer(
            resolve_model(cfg.model.path),
            cfg.model.chat_template,
            cfg.model.trust_remote_code,
            label=cfg.model.path,
        )
    except ForgeError as e:
        raise ForgeError(f"{str(e).rstrip('.')}; --no-tokens checks the data without a tokenizer.") from None
    d = cfg.data
    samples = encode_dataset(mix, tok, d.max_length, d.system_prompt, d.num_proc)
    return {"tokenizer": cfg.model.path, "max_length": d.max_length, **length_stats(samples, d.max_length)}


def _format_tokens(t: dict, cfg: Any) -> str:
    if not t["samples"]:
        return f"tokens ({t['tokenizer']}): no sample keeps an assistant token within max_length {t['max_length']}"
    lines = [
        f"tokens ({t['tokenizer']}, max_length {t['max_length']}): {t['samples']} samples, {t['tokens']} tokens; "
        f"mean {t['mean']}, min {t['min']}, p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}",
        f"max_length truncates {t['truncated']} samples and leaves no assistant token in {t['dropped']} (dropped)",
    ]
    top = max(c for _, _, c in t["histogram"]) or 1
    for lo, hi, c in t["histogram"]:
        lines.append(f"  {lo:>7}-{hi:<7} {'#' * round(40 * c / top):<40} {c}")
    return "\n".join(lines)


def cmd_data_convert(a: argparse.Namespace) -> int:
    from assistant_forge.core.dataset import DatasetStats, iter_records, write_records

    stats = DatasetStats()
    write_records(iter_records(_source(a, a.input), stats=stats), a.output)
    print(f"wrote {stats.records} conversations to {a.output} (from {', '.join(stats.formats)})")
    return 0


def cmd_data_preview(a: argparse.Namespace) -> int:
    from itertools import islice

    from assistant_forge.core.dataset import iter_records
    from assistant_forge.core.encoding import encode_chat, load_tokenizer, render_loss_preview, with_system
    from assistant_forge.core.models import resolve_model
    from assistant_forge.core.presets import resolve_config

    cfg, _ = resolve_config(a.preset)
    recs = list(islice(iter_records(_source(a, a.file, cfg.data.columns)), a.n))
    tok = load_tokenizer(
        resolve_model(cfg.model.path),
        cfg.model.chat_template,
        cfg.model.trust_remote_code,
        label=cfg.model.path,
    )
    for i, rec in enumerate(recs):
        enc = encode_chat(tok, with_system(rec["messages"], cfg.data.system_prompt), cfg.data.max_length)
        print(f"--- sample {i + 1}: {len(enc['input_ids']) if enc else 0} tokens; loss on [[...]] ---")
        print(
            render_loss_preview(tok, enc, ("[[", "]]")) if enc else "(no assistant token within max_length)"
        )
    return 0
