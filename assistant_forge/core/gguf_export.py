"""A merged model as one GGUF file for llama.cpp, Ollama and LM Studio (`forge export gguf`).

Written with the `gguf` package's writer and quantizers, tensor by tensor (one tensor in memory at a
time), into a temp file beside the target that is renamed only when complete. What goes in, per
llama.cpp's conventions:

- architecture: `llama` (Llama, Mistral, Yi, the demo model and InternLM2 in forge's native form)
  or `qwen2`; Llama's q/k rows are reordered into the interleaved rotary layout llama.cpp's `llama`
  graph expects (Qwen2's graph uses the rotate-half layout transformers stores, so it is kept).
- Llama 3.1's rope scaling as a `rope_freqs` tensor of per-frequency divisors; linear scaling as
  keys; InternLM2.5's dynamic NTK scaling changes nothing below the trained context, so it is left out.
- tokenizer: byte-level BPE (`gpt2`: vocab, merges, the pre-tokenizer's name) or SentencePiece-style
  BPE with byte fallback (`llama`: vocab, scores, token types, and the merges too, which llama.cpp
  ignores but transformers' GGUF reader uses), special-token ids, add_bos/add_eos, chat template.
- 1-D tensors (norms, biases) stay F32; matrices take the chosen type (rows not a whole number of
  quant blocks fall back to F16); with q4_0 the embedding and output matrices are kept at q8_0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant_forge.core.fsutil import atomic_path
from assistant_forge.core.memory import model_shape
from assistant_forge.errors import ForgeError

QUANTS = ("f16", "bf16", "q8_0", "q4_0")
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # config model_type -> GGUF architecture
MERGE_FIRST = "merge first: forge merge BASE ADAPTER -o merged"

# How the byte-level BPE tokenizers forge knows split text before BPE, by llama.cpp's names for them.
_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

Progress = Callable[[int, int, str], None]  # (tensors written, tensors in all, the tensor's name)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    quant: str
    architecture: str
    tensors: int
    bytes: int
    seconds: float


# --- checks -------------------------------------------------------------------------------------


def check_source(folder: Path) -> dict:
    """The merged folder's config.json, or a one-line refusal saying what to do instead."""
    if not folder.is_dir():
        raise ForgeError(f"{folder} is not a folder; {MERGE_FIRST}.")
    if (folder / "adapter_config.json").is_file():
        raise ForgeError(f"{folder} is an adapter, not a merged model; {MERGE_FIRST}.")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ForgeError(f"{folder} holds no model (no readable config.json); {MERGE_FIRST}.") from None
    if config.get("quantization_config"):
        raise ForgeError(
            f"{folder} holds a quantized (4-/8-bit) model; export needs full-precision weights: "
            "merge into the full-precision base (forge merge BASE ADAPTER -o merged)."
        )
    kind = config.get("model_type")
    if kind == "internlm2":
        raise ForgeError(
            f"{folder} is InternLM2's hub layout; merge without --hub-layout and export that folder."
        )
    if kind not in ARCHS:
        raise ForgeError(
            f"{folder} is a {kind or 'unknown'} model; GGUF export supports {', '.join(sorted(ARCHS))} "
            "(and InternLM2 through forge's native form)."
        )
    from assistant_forge.core.internlm2 import weight_files

    weight_files(folder)  # refuses a folder without safetensors weights
    return config


def check_output(out: Path, force: bool) -> None:
    if not out.parent.is_dir():
        raise ForgeError(f"Output folder {out.parent} does not exist; create it first.")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ForgeError(f"Output folder {out.parent} is not writable; pick another -o.")
    if out.is_dir():
        raise ForgeError(f"{out} is a folder; -o takes a file name such as {out / 'model.gguf'}.")
    if out.exists() and not force:
        raise ForgeError(f"{out} already exists; pass --force to replace it.")


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise ForgeError(f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}.")
    return quant


# --- the export ---------------------------------------------------------------------------------


def export_gguf(
    merged: str | Path,
    out: str | Path,
    quant: str = "f16",
    force: bool = False,
    progress: Progress | None = None,
    name: str | None = None,
) -> ExportResult:
    """Write `merged` (a folder from `forge merge`) as one GGUF file at `out`."""
    import time

    import gguf
    from transformers import AutoTokenizer

    from assistant_forge.core.models import quiet_transformers

    folder, target = Path(merged).expanduser(), Path(out).expanduser()
    check_quant(quant)
    config = check_source(folder)
    check_output(target, force)
    quiet_transformers()
    started = time.monotonic()
    arch = ARCHS[config["model_type"]]
    tok = AutoTokenizer.from_pretrained(folder)
    names = _tensor_names(folder)
    writer_arch = gguf.MODEL_ARCH_NAMES[_arch_enum(arch)]
    with atomic_path(target, mode=0o644) as tmp:
        w = gguf.GGUFWriter(tmp, writer_arch)
        try:
            w.add_name(name or folder.resolve().name)
            w.add_file_type(_FILE_TYPES[quant]())
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hparams(w, config)
            _add_tokenizer(w, tok, config)
            plan = list(_plan(folder, names, config, arch, quant))
            for p in plan:
                w.add_tensor_info(p.gguf_name, p.shape, _np_float32(), p.nbytes, raw_dtype=p.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for i, p in enumerate(plan):
                w.write_tensor_data(p.data())
                if progress:
                    progress(i + 1, len(plan), p.gguf_name)
        finally:
            w.close()
        size = tmp.stat().st_size
    return ExportResult(target, quant, arch, len(plan), size, time.monotonic() - started)


def _np_float32() -> Any:
    import numpy as np

    return np.dtype(np.float32)


def _arch_enum(arch: str) -> Any:
    import gguf

    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]


_FILE_TYPES: dict[str, Callable[[], int]] = {
    "f16": lambda: _file_type("MOSTLY_F16"),
    "bf16": lambda: _file_type("MOSTLY_BF16"),
    "q8_0": lambda: _file_type("MOSTLY_Q8_0"),
    "q4_0": lambda: _file_type("MOSTLY_Q4_0"),
}


def _file_type(name: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, name))


def _rope(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling parameters) from transformers 5's `rope_parameters` or the older keys."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    return float(theta), ({**merged, "rope_type": kind} if kind != "default" else {})


def _add_hparams(w: Any, config: dict) -> None:
    import gguf

    shape = model_shape(config)
    w.add_context_length(int(config.get("max_position_embeddings") or 4096))
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(shape.vocab)
    w.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim * shape.heads != shape.hidden:
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    theta, scaling = _rope(config)
    w.add_rope_freq_base(theta)
    kind = scaling.get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "llama3", "dynamic"):
        raise ForgeError(f"The model's rope scaling {kind!r} has no GGUF form forge can write.")


# --- tensors ------------------------------------------------------------------------------------


@dataclass
class _Planned:
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any
    nbytes: int
    data: Callable[[], Any]


def _tensor_names(folder: Path) -> dict[str, str]:
    """Each tensor's name -> the safetensors file that holds it."""
    from safetensors import safe_open

    from assistant_forge.core.internlm2 import weight_files

    where: dict[str, str] = {}
    for f in weight_files(folder):
        with safe_open(folder / f, framework="pt") as st:
            where.update(dict.fromkeys(st.keys(), f))
    return where


def _plan(folder: Path, names: dict[str, str], config: dict, arch: str, quant: str) -> Iterator[_Planned]:
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    name_map = gguf.get_tensor_name_map(_arch_enum(arch), config["num_hidden_layers"])
    Q = gguf.GGMLQuantizationType
    matrix = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    _, scaling = _rope(config)
    if scaling.get("rope_type") == "llama3":
        factors = _llama3_rope_factors(config, scaling)
        yield _Planned("rope_freqs.weight", factors.shape, Q.F32, factors.nbytes, lambda: factors)
    for hf_name in names:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        g = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ForgeError(f"Tensor {hf_name} has no GGUF name for the {arch} architecture.")
        shape = _shape(folder, names[hf_name], hf_name)
        if len(shape) == 1:
            qtype = Q.F32
        else:
            qtype = matrix
            if quant == "q4_0" and g in ("token_embd.weight", "output.weight"):
                qtype = Q.Q8_0
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if shape[-1] % block:
                qtype = Q.F16
        nbytes = math.prod(quant_shape_to_byte_shape(shape, qtype))
        yield _Planned(
            g, shape, qtype, nbytes, _loader(folder, names[hf_name], hf_name, g, qtype, config, arch)
        )


def _shape(folder: Path, file: str, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(folder / file, framework="pt") as st:
        return tuple(st.get_slice(name).get_shape())


def _loader(
    folder: Path, file: str, name: str, g: str, qtype: Any, config: dict, arch: str
) -> Callable[[], Any]:
    def load() -> Any:
        import gguf
        import numpy as np
        import torch
        from safetensors import safe_open

        with safe_open(folder / file, framework="pt") as st:
            t = st.get_tensor(name).to(torch.float32)
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"]
            if g.endswith("attn_k.weight"):
                heads = config.get("num_key_value_heads") or heads
            t = interleave_rotary(t, heads)
        a = t.numpy()
        Q = gguf.GGMLQuantizationType
        if qtype == Q.F32:
            return a.astype(np.float32)
        if qtype == Q.F16:
            return a.astype(np.float16)
        return gguf.quants.quantize(a, qtype)

    return load


def interleave_rotary(w: Any, heads: int) -> Any:
    """q/k projection rows from transformers' rotate-half order (each head: first halves, then second
    halves of the rotated pairs) to the interleaved pairs llama.cpp's `llama` graph rotates."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama3_rope_factors(config: dict, scaling: dict) -> Any:
    """Llama 3.1's per-frequency rope divisors: high frequencies untouched, low ones divided by
    `factor`, a smooth blend between (the scaling transformers applies to inv_freq)."""
    import numpy as np

    dim = model_shape(config).head_dim
    theta, _ = _rope(config)
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    return divisors.astype(np.float32)


# --- tokenizer ----------------------------------------------------------------------------------

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _add_tokenizer(w: Any, tok: Any, config: dict) -> None:
    from assistant_forge.core.templates import own_template

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ForgeError("The model's tokenizer has no tokenizer.json form; forge exports fast tokenizers.")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ForgeError(
            f"The model's tokenizer is {model.get('type')}, not BPE; forge exports BPE tokenizers."
        )
    byte_level = _has(spec.get("pre_tokenizer"), "ByteLevel") or _has(spec.get("decoder"), "ByteLevel")
    if not byte_level and not model.get("byte_fallback"):
        raise ForgeError("The model's tokenizer is neither byte-level BPE nor BPE with byte fallback.")
    ids: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    ids.update({i: a["content"] for i, a in added.items()})
    size = max(config["vocab_size"], max(ids) + 1)
    tokens, types = [], []
    for i in range(size):
        text = ids.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(_CONTROL if added[i]["special"] else _USER_DEFINED)
        elif i == tok.unk_token_id:
            tokens.append(text)
            types.append(_UNKNOWN)
        elif not byte_level and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(_BYTE)
        else:
            tokens.append(text)
            types.append(_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    else:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        # SentencePiece scores: earlier ids merge first, as in the SentencePiece model they came from.
        w.add_token_scores([0.0 if t != _NORMAL else -float(i) for i, t in enumerate(types)])
        w.add_add_space_prefix(_prepends_space(spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    for token_id, add in (
        (tok.bos_token_id, w.add_bos_token_id),
        (tok.eos_token_id, w.add_eos_token_id),
        (tok.unk_token_id, w.add_unk_token_id),
        (tok.pad_token_id, w.add_pad_token_id),
    ):
        if isinstance(token_id, int):
            add(token_id)
    stop = _end_of_turn_id(tok)
    if stop is not None and stop != tok.eos_token_id:
        w.add_eot_token_id(stop)
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id
    w.add_add_bos_token(bos is not None and bool(probe) and probe[0] == bos)
    w.add_add_eos_token(len(probe) > 1 and probe[-1] == tok.eos_token_id)
    template = own_template(tok)
    if template:
        w.add_chat_template(template)


def _end_of_turn_id(tok: Any) -> int | None:
    from assistant_forge.core.encoding import end_of_turn

    if not getattr(tok, "chat_template", None):
        return None
    stop = end_of_turn(tok)
    sid = tok.convert_tokens_to_ids(stop) if stop else None
    return sid if isinstance(sid, int) and sid != tok.unk_token_id else None


def _has(node: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (or any part of a Sequence of them) is of `kind`."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_has(p, kind) for p in node.get("pretokenizers") or node.get("decoders") or [])


def _prepends_space(spec: dict) -> bool:
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    return _has({"type": "Sequence", "pretokenizers": norm.get("normalizers", [norm])}, "Prepend")


def _pre_tokenizer(pre: Any) -> str:
    """llama.cpp's name for how a byte-level BPE splits text, or a refusal (a wrong name would split
    text differently from the model's own tokenizer)."""
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, split in _SPLITS.items():
            if regex == split:
                return name
    raise ForgeError(
        "forge does not know llama.cpp's name for this tokenizer's pre-tokenizer "
        f"({' + '.join(str(k) for k in kinds) or 'none'}); convert with llama.cpp's convert_hf_to_gguf.py."
    )
