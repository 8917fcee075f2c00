"""Adapter export (`forge convert`, XTuner's pth_to_hf) and merging an adapter into its base."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from assistant_forge.core import internlm2
from assistant_forge.core.chat import ADAPTER_META, adapter_meta
from assistant_forge.core.encoding import load_tokenizer, stop_token_ids
from assistant_forge.core.known_models import record_export
from assistant_forge.core.models import (
    check_model_code,
    quiet_transformers,
    require_safetensors,
    resolve_model,
)
from assistant_forge.core.runs import checkpoint_for, run_config
from assistant_forge.core.templates import MODEL
from assistant_forge.errors import ForgeError, first_line

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not force:
        raise ForgeError(f"{out} already exists and is not empty; pass --force to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))


def _publish(staging: Path, out: Path) -> None:
    """Swap the finished folder into place: readers never see a half-written one."""
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    out.chmod(0o755)


def convert(run: Path, out: str | Path, step: int | None = None, force: bool = False) -> Path:
    """Export a run's checkpoint as a PEFT adapter folder with the run's tokenizer and template."""
    cfg = run_config(run)
    if cfg.lora.method == "full":
        raise ForgeError(
            "This run trained all weights (method = 'full'): its checkpoints are already full models."
        )
    ckpt = checkpoint_for(run, step)
    missing = [f for f in ADAPTER_FILES if not (ckpt / f).is_file()]
    if missing:
        raise ForgeError(f"Checkpoint {ckpt} lacks {', '.join(missing)}; it is not a LoRA checkpoint.")
    out = Path(out).expanduser()
    staging = _prepare_out(out, force)
    try:
        for f in ADAPTER_FILES:
            shutil.copy2(ckpt / f, staging / f)
        base = resolve_model(cfg.model.path)
        check_model_code(base, cfg.model.path, cfg.model.trust_remote_code)
        # The tokenizer carries the template the run trained with: the model's own, byte for byte, where it has one.
        tok = load_tokenizer(base, cfg.model.chat_template, cfg.model.trust_remote_code, label=cfg.model.path)
        tok.save_pretrained(staging)
        meta = {
            "base_model": cfg.model.path,
            # The folder the user gave, not forge's converted copy of it in the cache.
            "base_model_path": str(internlm2.source_folder(base) or base),
            "chat_template": cfg.model.chat_template,
            "run": str(run),
            "step": int(ckpt.name.split("-")[-1]),
            "system_prompt": cfg.data.system_prompt,
        }
        (staging / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _record(run, "adapter", out)
    return out


def _record(run: Path, kind: str, out: Path) -> None:
    """Note the folder in its run (the Chat screen lists it); the folder is written either way."""
    # A read-only run folder: the folder is still found at its default place, or typed in by hand.
    if (run / "config.toml").is_file():
        with contextlib.suppress(OSError):
            record_export(run, kind, out)


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def merge(
    base: str,
    adapter: str | Path,
    out: str | Path,
    max_shard_size: str = "2GB",
    dtype: str = "bf16",
    force: bool = False,
    template: str | None = None,
    trust_remote_code: bool = False,
    hub_layout: bool = False,
) -> Path:
    """Merge a LoRA adapter into its full-precision base and save safetensors, tokenizer and template.

    `hub_layout` (InternLM2 bases only) writes the hub's original layout instead of the native one:
    fused wqkv, the hub's config.json with its auto_map and the base folder's remote-code files.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    quiet_transformers()
    if dtype not in _DTYPES:
        raise ForgeError(f"--dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}.")
    adapter = Path(adapter).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise ForgeError(
            f"{adapter} is not a PEFT adapter folder (no adapter_config.json); make one with `forge convert`."
        )
    require_safetensors(adapter, "Adapter folder", ("adapter_model.safetensors",))
    path = resolve_model(base)
    check_model_code(path, base, trust_remote_code)
    hub_source = internlm2.source_folder(path)
    if hub_layout and hub_source is None:
        raise ForgeError(f"--hub-layout writes InternLM2's hub layout, but {base} is not an InternLM2 model.")
    qc = getattr(
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "quantization_config", None
    )
    if qc:
        q = qc if isinstance(qc, dict) else qc.to_dict()
        if (
            q.get("load_in_4bit")
            or q.get("load_in_8bit")
            or q.get("quant_method") in ("bitsandbytes", "gptq", "awq")
        ):
            raise ForgeError(
                f"{base} is a quantized model; merging needs the full-precision base weights "
                "(merging into 4-bit weights would lose the adapter's precision)."
            )
    meta = adapter_meta(adapter)
    template_name = template or meta.get("chat_template") or MODEL
    out = Path(out).expanduser()
    staging = _prepare_out(out, force)
    # With --hub-layout the native model is written next to the output first, then rewritten.
    native = (
        Path(tempfile.mkdtemp(dir=staging.parent, prefix=f".{out.name}.native")) if hub_layout else staging
    )
    try:
        torch_dtype = getattr(torch, _DTYPES[dtype])
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        except OSError as e:
            raise ForgeError(f"Could not load model {base}: {first_line(e)}") from None
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(native, max_shard_size=max_shard_size)
        tok = load_tokenizer(path, template_name, trust_remote_code, label=base)
        tok.save_pretrained(native)
        gen = GenerationConfig.from_model_config(model.config)
        # The base's own end-of-turn ids stay (Llama 3.1 lists three), with the template's end of turn.
        gen.eos_token_id = stop_token_ids(tok, getattr(model.generation_config, "eos_token_id", None))
        gen.pad_token_id = tok.pad_token_id
        gen.save_pretrained(native)
        (native / ADAPTER_META).write_text(
            json.dumps({**meta, "chat_template": template_name, "merged_from": str(adapter)}, indent=2) + "\n"
        )
        if hub_layout:
            del model  # the hub layout is written tensor by tensor from the saved files
            internlm2.write_hub_layout(native, hub_source, staging)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if native != staging:
            shutil.rmtree(native, ignore_errors=True)
    if meta.get("run"):
        _record(Path(meta["run"]), "merged", out)
    return out
