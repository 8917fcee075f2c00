"""InternLM2 / InternLM2.5 checkpoints as native Llama folders, and back to the hub layout.

The hub's InternLM2 modelling code no longer imports on transformers 5, but the architecture is
Llama with other tensor names and one fused q/k/v projection. forge converts a hub-format folder
once into the cache (`cache_dir()/native/<name>-<key>`), and every path (training, QLoRA, packing,
merge, chat, eval, the GPU fast path) then sees a plain `LlamaForCausalLM` that needs no remote code.
`write_hub_layout` turns a native folder (a merged model) back into the hub layout for tools that
expect it (LMDeploy, XTuner).

Layout facts (families/README.md, checked against the hub code's logits):
- `attention.wqkv` rows are grouped per key/value head: for each of the `kv_heads` groups come
  `heads / kv_heads` query heads, then one key head, then one value head (each `head_dim` rows).
- `feed_forward.w1` is the gate, `w3` the up and `w2` the down projection.
- `attention_norm` comes before attention, `ffn_norm` before the MLP.
- The rotary embedding is the rotate-half form transformers' Llama uses; `rope_scaling`
  (`dynamic` or `linear`) maps onto transformers' rope parameters.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from assistant_forge.core.fsutil import staged_dir
from assistant_forge.errors import ForgeError, first_line
from assistant_forge.paths import cache_dir

# Bump when the converted output changes: older cache folders are then not reused.
FORMAT_VERSION = 1
COMPLETE = ".complete"
SOURCE_NOTE = "forge_native.json"  # in a native folder: which hub folder it was converted from
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
INDEX = "model.safetensors.index.json"
TOKENIZER_MODEL = "tokenizer.model"
# Files of the source folder that describe the model besides its weights; they are carried over and
# their sizes and times are part of the cache key. forge_adapter.json: the chat template forge
# recorded in a merged model, which chat reads from the folder it loads.
CARRIED = ("generation_config.json", "special_tokens_map.json", "forge_adapter.json")

# Tensors inside `model.layers.N.` that map one to one (hub name -> native name).
LAYER_MAP = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_MAP = {"model.tok_embeddings": "model.embed_tokens", "model.norm": "model.norm", "output": "lm_head"}
WQKV = "attention.wqkv"
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# Buffers some exports carry; they are recomputed from the config.
SKIPPED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_KEY = re.compile(r"^(.+)\.(weight|bias)$")


# --- detection and the cache ---------------------------------------------------------------------


def _read_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_internlm2(folder: str | Path) -> bool:
    """A local folder holding an InternLM2 / InternLM2.5 checkpoint in the hub's format."""
    cfg = _read_config(Path(folder))
    return bool(cfg) and cfg.get("model_type") == "internlm2"


def source_folder(native: str | Path) -> Path | None:
    """The hub-format folder a native folder was converted from (None for any other folder)."""
    try:
        return Path(json.loads((Path(native) / SOURCE_NOTE).read_text(encoding="utf-8"))["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a checkpoint, in index order; refuses pickled-only weights."""
    from assistant_forge.core.models import require_safetensors

    require_safetensors(folder, "Model folder", WEIGHT_FILES)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as e:
            raise ForgeError(f"{index} is not a valid safetensors index ({e}).") from None
        return list(dict.fromkeys(weight_map.values()))
    return ["model.safetensors"]


def _cache_key(folder: Path, files: list[str]) -> str:
    """Config bytes, the folder, and the name, size and mtime of every file the conversion reads:
    an edited or replaced checkpoint gets a new key (reading 15 GB to hash it would cost minutes)."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}\0{folder}\0".encode())
    h.update((folder / "config.json").read_bytes())
    for name in sorted({*files, TOKENIZER_MODEL, "tokenizer_config.json", *CARRIED}):
        p = folder / name
        if p.is_file():
            st = p.stat()
            h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def native_dir(folder: str | Path, name: str | None = None) -> Path:
    """The native (Llama) copy of a hub-format InternLM2 folder, converted once into the cache.

    Conversion streams one tensor at a time into a staging folder that is renamed into place only
    when complete, under a lock so that several processes (torchrun ranks) convert it once.
    """
    folder = Path(folder).expanduser().resolve()
    files = weight_files(folder)
    root = cache_dir() / "native"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{_safe_name(name or folder.name)}-{_cache_key(folder, files)}"
    if (target / COMPLETE).is_file():
        return target
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / COMPLETE).is_file():
            return target
        for orphan in root.glob(".*.tmp*"):  # staging of a conversion killed mid-way (we hold the lock)
            shutil.rmtree(orphan, ignore_errors=True)
        _check_space(folder, files, root)
        # A 7B takes a minute or two: say why nothing else happens meanwhile (the TUI captures stderr).
        print(
            f"forge: converting {folder} to transformers' Llama layout, once, into {target}", file=sys.stderr
        )
        # A half folder from an older forge is replaced, never reused.
        with staged_dir(target, COMPLETE) as staging:
            try:
                convert_checkpoint(folder, staging)
            except ForgeError as e:
                raise ForgeError(f"{str(e).rstrip('.')}; nothing was kept in the cache.") from None
            except Exception as e:  # a corrupt or truncated file, a full disk: one sentence, no folder left
                reason = first_line(e)
                raise ForgeError(
                    f"Could not convert the InternLM2 checkpoint {folder} ({reason}); nothing was kept in the cache."
                ) from None
        _drop_stale(root, target, folder)
    return target


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _check_space(folder: Path, files: list[str], root: Path) -> None:
    need = sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
    free = shutil.disk_usage(root).free
    if free < need * 1.05:
        raise ForgeError(
            f"Converting {folder.name} to transformers' Llama layout needs about {need / 2**30:.1f} GiB free in "
            f"{root}, which has {free / 2**30:.1f} GiB; free some space or set FORGE_CACHE_DIR elsewhere."
        )


def _drop_stale(root: Path, keep: Path, folder: Path) -> None:
    """Older conversions of the same source folder (it changed since): a 7B copy is 15 GB."""
    for other in root.iterdir():
        stale = other != keep and other.is_dir() and not other.name.startswith(".")
        if stale and source_folder(other) == folder:
            shutil.rmtree(other, ignore_errors=True)


def hub_native(repo_id: str) -> Path | None:
    """For a hub id of an InternLM2 model: download its safetensors, json and tokenizer files and
    convert them; None for any other model (transformers downloads those itself)."""
    from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")  # no network when already here
        config = Path(cached if isinstance(cached, str) else hf_hub_download(repo_id, "config.json"))
        if not is_internlm2(config.parent):
            return None
        # The *.py files are only copied by `forge merge --hub-layout`, never imported.
        snap = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", TOKENIZER_MODEL, "*.py"])
    except Exception as e:  # offline, unknown or gated repo: what from_pretrained would fail on next
        reason = first_line(e)
        raise ForgeError(f"Could not fetch model {repo_id} from the Hugging Face hub ({reason}).") from None
    return native_dir(snap, name=repo_id.replace("/", "--"))


# --- config ----------------------------------------------------------------------------------------


def rope_parameters(hub: dict) -> dict:
    """transformers 5's rope parameters for InternLM2's `rope_theta` and `rope_scaling`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(hub.get("rope_theta", 10000))}
    scaling = hub.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ("dynamic", "linear") or "factor" not in scaling:
            raise ForgeError(
                f"This InternLM2 config's rope_scaling {scaling} is not one forge can map "
                "(known: dynamic or linear with a factor)."
            )
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return rope


def llama_config(hub: dict) -> Any:
    """The LlamaConfig equivalent to a hub InternLM2 config.json (a dict)."""
    from transformers import LlamaConfig

    arch = hub.get("architectures") or ["InternLM2ForCausalLM"]
    if arch != ["InternLM2ForCausalLM"]:
        raise ForgeError(f"forge converts InternLM2 causal language models, not {', '.join(arch)}.")
    heads = int(hub["num_attention_heads"])
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=hub["vocab_size"],
        hidden_size=hub["hidden_size"],
        intermediate_size=hub["intermediate_size"],
        num_hidden_layers=hub["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hub.get("num_key_value_heads") or heads,
        hidden_act=hub.get("hidden_act", "silu"),
        max_position_embeddings=hub.get("max_position_embeddings", 2048),
        initializer_range=hub.get("initializer_range", 0.02),
        rms_norm_eps=hub.get("rms_norm_eps", 1e-6),
        use_cache=hub.get("use_cache", True),
        pad_token_id=hub.get("pad_token_id"),
        bos_token_id=hub.get("bos_token_id", 1),
        eos_token_id=hub.get("eos_token_id", 2),
        tie_word_embeddings=hub.get("tie_word_embeddings", False),
        rope_parameters=rope_parameters(hub),
        attention_bias=bool(hub.get("bias", False)),  # InternLM2's `bias` covers wqkv and wo
        mlp_bias=False,
        dtype=hub.get("torch_dtype") or hub.get("dtype"),
    )


class _Shape:
    """The numbers the wqkv layout depends on."""

    def __init__(self, cfg: dict) -> None:
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        self.head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // self.heads)
        self.groups = self.heads // self.kv_heads
        self.layers = int(cfg["num_hidden_layers"])
        self.tied = bool(cfg.get("tie_word_embeddings", False))


# --- tensors ---------------------------------------------------------------------------------------


def split_wqkv(w: Any, kv_heads: int, groups: int, head_dim: int) -> tuple[Any, Any, Any]:
    """InternLM2's fused rows `[q x groups, k, v]` per key/value head -> separate q, k, v (weight or bias)."""
    rest = w.shape[1:]
    if w.shape[0] != kv_heads * (groups + 2) * head_dim:
        raise ForgeError(
            f"wqkv has {w.shape[0]} rows, not the {kv_heads * (groups + 2) * head_dim} the config implies."
        )
    g = w.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = g[:, :groups].reshape(kv_heads * groups * head_dim, *rest)
    k = g[:, groups].reshape(kv_heads * head_dim, *rest)
    v = g[:, groups + 1].reshape(kv_heads * head_dim, *rest)
    # Own, contiguous storage each: safetensors refuses tensors that share memory.
    return q.clone(), k.clone(), v.clone()


def fuse_qkv(q: Any, k: Any, v: Any, kv_heads: int, groups: int, head_dim: int) -> Any:
    """The inverse of `split_wqkv`."""
    import torch

    rest = q.shape[1:]
    parts = (
        q.reshape(kv_heads, groups, head_dim, *rest),
        k.reshape(kv_heads, 1, head_dim, *rest),
        v.reshape(kv_heads, 1, head_dim, *rest),
    )
    return torch.cat(parts, dim=1).reshape(kv_heads * (groups + 2) * head_dim, *rest).contiguous()


def native_tensors(name: str, tensor: Any, shape: _Shape) -> list[tuple[str, Any]]:
    """One hub tensor -> its native tensor(s)."""
    if SKIPPED.match(name):
        return []
    m = _LAYER_KEY.match(name)
    if m:
        layer, part, kind = m.groups()
        prefix = f"model.layers.{layer}."
        if part == WQKV:
            qkv = split_wqkv(tensor, shape.kv_heads, shape.groups, shape.head_dim)
            return [(f"{prefix}{n}.{kind}", t) for n, t in zip(QKV, qkv)]
        if part in LAYER_MAP:
            return [(f"{prefix}{LAYER_MAP[part]}.{kind}", tensor)]
    m = _TOP_KEY.match(name)
    if m and m.group(1) in TOP_MAP:
        return [(f"{TOP_MAP[m.group(1)]}.{m.group(2)}", tensor)]
    raise ForgeError(f"The InternLM2 checkpoint has a tensor forge does not know how to map: {name}")


def _expected_native(shape: _Shape, bias: bool) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not shape.tied:
        names.add("lm_head.weight")
    for i in range(shape.layers):
        for part in (*QKV, *LAYER_MAP.values()):
            names.add(f"model.layers.{i}.{part}.weight")
        if bias:
            names.update(f"model.layers.{i}.{p}.bias" for p in (*QKV, "self_attn.o_proj"))
    return names


class _ShardWriter:
    """Writes named shards one at a time and the index, so at most one shard is held in memory."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, shard: str, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        dup = set(tensors) & set(self.weight_map)
        if dup:
            raise ForgeError(f"Tensor {sorted(dup)[0]} appears twice in the checkpoint.")
        save_file(tensors, str(self.out / shard), metadata={"format": "pt"})
        for name, t in tensors.items():
            self.weight_map[name] = shard
            self.total += t.numel() * t.element_size()

    def finish(self, shards: list[str]) -> None:
        if shards != ["model.safetensors"]:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _stream(folder: Path, files: list[str]) -> Iterator[tuple[str, Callable[[str], Any], list[str]]]:
    """Each weight file of a folder: its name, a tensor getter and its tensor names (memory-mapped)."""
    from safetensors import safe_open

    for f in files:
        with safe_open(str(folder / f), framework="pt") as h:
            yield f, h.get_tensor, list(h.keys())


# --- hub -> native ---------------------------------------------------------------------------------


def convert_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Write the native (Llama) form of the hub-format folder `src` into the existing folder `dst`:
    weights sharded like the source, config, tokenizer, generation config."""
    src, dst = Path(src), Path(dst)
    hub = _read_config(src)
    if hub is None or hub.get("model_type") != "internlm2":
        raise ForgeError(f"{src} is not an InternLM2 checkpoint (config.json model_type is not internlm2).")
    files = weight_files(src)
    config = llama_config(hub)
    write_native_tokenizer(src, dst)  # first: cheap, and fails before gigabytes are written
    shape = _Shape(hub)
    writer = _ShardWriter(dst)
    for shard, get, names in _stream(src, files):
        out: dict[str, Any] = {}
        for name in names:
            out.update(native_tensors(name, get(name), shape))
        writer.write(shard, out)
    expected = _expected_native(shape, bool(hub.get("bias", False)))
    missing = expected - set(writer.weight_map)
    if missing:
        raise ForgeError(f"The InternLM2 checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}.")
    writer.finish(files)
    config.save_pretrained(dst)
    for name in CARRIED:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    note = {"source": str(src.resolve()), "format": FORMAT_VERSION, "converted_from": "internlm2"}
    (dst / SOURCE_NOTE).write_text(json.dumps(note, indent=2) + "\n")


def write_native_tokenizer(src: Path, dst: Path) -> None:
    """InternLM2's SentencePiece tokenizer as a plain LlamaTokenizer (TOKENIZERS.md's recipe).

    The hub declares its special tokens (`<|im_start|>` ...) over the ids of the placeholder pieces
    `[UNUSED_TOKEN_141..146]` through `added_tokens_decoder`; loaded as is, transformers would append
    them as new ids beyond the model's rows. Renaming those pieces in the SentencePiece model keeps
    the ids. `legacy=False` and `add_prefix_space=False`: the model adds no dummy prefix.
    """
    cfg_path = src / "tokenizer_config.json"
    if not (src / TOKENIZER_MODEL).is_file() or not cfg_path.is_file():
        raise ForgeError(f"{src} lacks {TOKENIZER_MODEL} or tokenizer_config.json (InternLM2's tokenizer).")
    try:  # transformers also needs both to read the result (TOKENIZERS.md: else a misleading tiktoken error)
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ForgeError(
            "InternLM2's tokenizer needs the sentencepiece and protobuf packages: pip install sentencepiece protobuf."
        ) from None

    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((src / TOKENIZER_MODEL).read_bytes())
    for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
        if int(idx) >= len(proto.pieces):
            raise ForgeError(f"tokenizer_config.json names token id {idx}, beyond the tokenizer's pieces.")
        proto.pieces[int(idx)].piece = tok["content"]
    (dst / TOKENIZER_MODEL).write_bytes(proto.SerializeToString())
    native = {k: v for k, v in cfg.items() if k not in ("auto_map", "tokenizer_class")}
    native.update(tokenizer_class="LlamaTokenizer", legacy=False, add_prefix_space=False)
    (dst / "tokenizer_config.json").write_text(json.dumps(native, indent=2, ensure_ascii=False) + "\n")


# --- native -> hub ---------------------------------------------------------------------------------

_HUB_FROM_LAYER = {v: k for k, v in LAYER_MAP.items()}
_HUB_FROM_TOP = {v: k for k, v in TOP_MAP.items()}
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def write_hub_layout(native: str | Path, hub_config_source: str | Path, out: str | Path) -> None:
    """Write the native model folder `native` into the existing folder `out` in InternLM2's hub layout:
    fused wqkv and hub tensor names, the hub's config.json (auto_map included), its tokenizer files
    with the native folder's chat template, and the remote-code .py files of `hub_config_source`."""
    from contextlib import ExitStack

    from safetensors import safe_open

    native, hub_src, out = Path(native), Path(hub_config_source), Path(out)
    hub = _read_config(hub_src)
    cfg = _read_config(native)
    if hub is None or hub.get("model_type") != "internlm2" or cfg is None:
        raise ForgeError(f"{hub_src} is not an InternLM2 checkpoint; the hub layout needs its config.json.")
    for key in (*_SHAPE_KEYS, "num_key_value_heads"):
        if key in hub and cfg.get(key) != hub[key]:
            raise ForgeError(
                f"The model's {key} is {cfg.get(key)} but {hub_src}'s is {hub[key]}: it was not made from that base."
            )
    shape = _Shape(hub)
    files = weight_files(native)
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(native / f), framework="pt")) for f in files}
        dtypes = _write_hub_tensors(native, handles, shape, _ShardWriter(out), files)
    if len(dtypes) == 1:  # the merge may have changed the precision (fp32 base, bf16 output)
        written = str(next(iter(dtypes))).removeprefix("torch.")
        if str(hub.get("torch_dtype", written)) != written:
            hub["torch_dtype"] = written
    (out / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    _write_hub_tokenizer(native, hub_src, out)
    for name in ("generation_config.json", "forge_adapter.json"):
        if (native / name).is_file():
            shutil.copy2(native / name, out / name)
    for py in sorted(hub_src.glob("*.py")):  # the model's own code, for the tools that run it
        shutil.copy2(py, out / py.name)


def _write_hub_tensors(
    native: Path, handles: dict[str, Any], shape: _Shape, writer: _ShardWriter, files: list[str]
) -> set[Any]:
    """Hub tensors shard by shard (each fused wqkv goes where its q_proj was); returns the float dtypes."""
    names = {f: list(h.keys()) for f, h in handles.items()}  # safe_open handles are not iterable
    where = {name: f for f, keys in names.items() for name in keys}
    dtypes: set[Any] = set()
    for f, h in handles.items():
        tensors: dict[str, Any] = {}
        for name in names[f]:
            m = _LAYER_KEY.match(name)
            if m and m.group(2) in QKV:
                if m.group(2) != QKV[0]:
                    continue  # written with its q_proj
                layer, kind = m.group(1), m.group(3)
                parts = [f"model.layers.{layer}.{p}.{kind}" for p in QKV]
                q, k, v = (handles[where[p]].get_tensor(p) for p in parts)
                hub_name = f"model.layers.{layer}.{WQKV}.{kind}"
                tensors[hub_name] = fuse_qkv(q, k, v, shape.kv_heads, shape.groups, shape.head_dim)
            elif m and m.group(2) in _HUB_FROM_LAYER:
                tensors[f"model.layers.{m.group(1)}.{_HUB_FROM_LAYER[m.group(2)]}.{m.group(3)}"] = (
                    h.get_tensor(name)
                )
            elif (t := _TOP_KEY.match(name)) and t.group(1) in _HUB_FROM_TOP:
                tensors[f"{_HUB_FROM_TOP[t.group(1)]}.{t.group(2)}"] = h.get_tensor(name)
            else:
                raise ForgeError(f"{native} has a tensor with no InternLM2 counterpart: {name}")
        dtypes.update(x.dtype for x in tensors.values() if x.is_floating_point())
        writer.write(f, tensors)
    writer.finish(files)
    return dtypes


def _write_hub_tokenizer(native: Path, hub_src: Path, out: Path) -> None:
    """The hub's own tokenizer files (its remote tokenizer classes read them) with the chat template
    the native folder carries (the one forge trained and merged with)."""
    for name in (TOKENIZER_MODEL, "special_tokens_map.json"):
        if (hub_src / name).is_file():
            shutil.copy2(hub_src / name, out / name)
    cfg_path = hub_src / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    template = _chat_template(native)
    if template is not None:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _chat_template(folder: Path) -> str | None:
    """A saved tokenizer's chat template: transformers 5 writes chat_template.jinja, older ones the config."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
