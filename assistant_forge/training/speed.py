"""forge's fast training path on a CUDA GPU: fused LoRA, fused cross-entropy, compiled decoder
layers (or Liger kernels), and a gradient-checkpointing plan fitted to the memory budget.

Plugged in by `training.modeling.build_model`:

    model = apply_speedups(model, cfg)   # right after loading the base model, before PEFT
    model = wrap_for_training(model, cfg)
    model = after_peft(model, cfg)       # last: re-does what prepare_model_for_kbit_training undid

What each piece does, and why it is faster than the plain transformers + PEFT + bitsandbytes step:

* The residual stream stays in bf16. `prepare_model_for_kbit_training` casts embeddings, norms and
  lm_head to fp32, which makes every activation, attention (no flash kernel in fp32) and the
  lm_head matmul run in fp32; `after_peft` casts those frozen weights back.
* Fused LoRA linear (`_LoraLinear`): one autograd node per adapted projection computes
  `x W^T + s (x A^T) B^T` with the 4-bit weight dequantized straight into a bf16 matmul, adapters
  kept in fp32 (the optimizer's master copy) but multiplied in bf16, and the LoRA product added in
  place (`addmm_`). PEFT runs the adapter in fp32 with a dropout copy, a scale and an add, about
  as much memory traffic as the base matmul. Dropout 0 skips the mask entirely. Projections that
  read one input (q/k/v, gate/up: `_LoraGroup`) run as one such node over their stacked weights,
  so a layer issues 4 LoRA ops instead of 7 (measured: a few percent at 7B/2048, bench/RESULTS.md).
* Fused linear cross-entropy (`_LinearCrossEntropy`): logits are made a chunk of rows at a time,
  and the gradient for the hidden states is computed in the forward pass, so the fp32 logits
  (tokens x vocab x 4 bytes, 1 GiB at 8192 x 32000) never exist at once.
* Compiled decoder layers (`compile_layers`, `train.compile_layers`): torch.compile fuses norms,
  RoPE, SwiGLU and residual adds and launches far fewer kernels from Python; the LoRA projection
  stays one opaque custom op (`forge::lora_linear`) so the compiler cannot keep dense weights alive.
  Without compiling: Liger's Triton RMSNorm, RoPE and SwiGLU kernels (when installed).
* Checkpointing only as many decoder layers as the budget needs (`configure_checkpointing`,
  sized by `core.memory.fit_checkpointing`), and, in the low-memory plan, keeping checkpointed
  inputs in pinned host memory, copied on a side stream so the copies overlap compute.
* CUDA graphs for the checkpointed compiled layers (`training.layer_graphs`, `train.cuda_graphs`):
  each layer's forward and its recompute + backward are captured once and replayed as one launch
  each, so a checkpointed 7B step at 2048 tokens is no longer bound by the CPU issuing kernels
  (measured 2.9x the peer against 1.6-2.9x without, depending on the machine's CPU).

Everything here is a no-op on CPU or with `train.fused_kernels = false` (unless `force=True`,
which tests/core/test_speed_path.py uses to check the math on a CPU).
"""

from __future__ import annotations

import functools
import logging
import types
from dataclasses import asdict, dataclass, field
from typing import Any

from assistant_forge.core import memory as mem
from assistant_forge.core.config import ForgeConfig
from assistant_forge.training import layer_graphs

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

_MADE: dict[Any, Any] = {}


def _once(make: Any) -> Any:
    """make() on the first call, the same object after. A plain dict rather than functools.cache:
    torch.compile traces a dict lookup, but would re-run the factory inside a compiled layer."""
    made = _MADE.get(make)
    if made is None:
        made = _MADE[make] = make()
    return made


@dataclass
class SpeedReport:
    """What the fast path changed on a model (kept on the model as `_forge_speed`)."""

    liger: list[str] = field(default_factory=list)
    fused_loss: bool = False
    fused_lora_modules: int = 0
    compiled_layers: int = 0
    graphed_layers: int = 0  # checkpointed layers replaying CUDA graphs (training.layer_graphs)
    recast_to_half: int = 0
    checkpointed_layers: int = 0
    num_layers: int = 0
    offload: bool = False
    optimizer_on_device: bool = False
    flat_optimizer: bool = True  # make_optimizer steps one flat buffer (paged, not in the low-memory plan)
    absmax_cache_gib: float = 0.0
    estimate_gib: float | None = None
    budget_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(model: Any) -> SpeedReport:
    """The SpeedReport of `model` (a fresh one if the fast path has not touched it)."""
    base = _unwrap(model)
    rep = getattr(base, "_forge_speed", None)
    if rep is None:
        rep = SpeedReport()
        base._forge_speed = rep
    return rep


def enabled(model: Any, cfg: ForgeConfig) -> bool:
    """The fast path applies to CUDA models with train.fused_kernels on, without ZeRO."""
    # Under DeepSpeed ZeRO the fast path would fight DeepSpeed for the same things: its flat
    # optimizer buffer (FlatParams) re-points the LoRA weights that ZeRO partitions and steps
    # itself, its checkpointing plan is fitted to one GPU holding every weight, and under ZeRO-3
    # its fused LoRA op and compiled layers would read weights that DeepSpeed has released to
    # other processes. ZeRO runs take the plain transformers + PEFT path.
    if not mem.fast_path_configured(cfg):
        return False
    try:
        return next(_unwrap(model).parameters()).device.type == "cuda"
    except StopIteration:
        return False


# --------------------------------------------------------------------------------------------
# Hooks called by training.modeling
# --------------------------------------------------------------------------------------------


def apply_speedups(model: Any, cfg: ForgeConfig, *, force: bool = False, liger: bool = True) -> Any:
    """Before PEFT: Liger kernels and the fused-loss forward on the base model."""
    if not (force or enabled(model, cfg)):
        return model
    rep = report(model)
    # Compiled layers get their norms, RoPE and SwiGLU fused by the compiler; Liger's kernels
    # would only break the compiled graph.
    if liger and cfg.lora.method != "full" and not mem.compiled_layers(cfg):
        rep.liger = _apply_liger(model, rep)
    rep.fused_loss = _patch_fused_loss(model, rep)
    return model


def after_peft(model: Any, cfg: ForgeConfig, *, force: bool = False, seq_len: int | None = None) -> Any:
    """After PEFT wrapping: bf16 frozen weights, fused LoRA forwards, the checkpointing plan."""
    if not (force or enabled(model, cfg)):
        return model
    rep = report(model)
    rep.recast_to_half = _recast_frozen_to_half(model)
    rep.fused_lora_modules = patch_lora_layers(model)
    if mem.compiled_layers(cfg):
        rep.compiled_layers = compile_layers(model, _uses_rng(model))
    configure_checkpointing(model, cfg, seq_len=seq_len)
    log.info("forge fast path: %s", rep.as_dict())
    return model


# --------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    inner = model
    get_base = getattr(inner, "get_base_model", None)
    if callable(get_base):
        inner = get_base()
    return inner


def _compute_dtype(model: Any) -> Any:
    import torch

    for m in _unwrap(model).modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            return qs.dtype
    emb = _unwrap(model).get_input_embeddings()
    dtype = emb.weight.dtype if emb is not None else torch.float32
    return torch.bfloat16 if dtype == torch.float32 and torch.cuda.is_available() else dtype


def _recast_frozen_to_half(model: Any) -> int:
    """Undo prepare_model_for_kbit_training's fp32 upcast of frozen embeddings, norms and lm_head."""
    import torch

    dtype = _compute_dtype(model)
    if dtype == torch.float32:
        return 0
    n = 0
    for p in _unwrap(model).parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(dtype)
            n += 1
    return n


def decoder_layers(model: Any) -> list[Any]:
    """The repeated decoder blocks (transformers' GradientCheckpointingLayer instances)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        return []
    return [m for m in _unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)]


# --------------------------------------------------------------------------------------------
# Liger kernels
# --------------------------------------------------------------------------------------------


def _apply_liger(model: Any, rep: SpeedReport) -> list[str]:
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except Exception as e:  # not installed, or no triton / no GPU
        rep.notes.append(f"liger-kernel unavailable ({type(e).__name__}): RMSNorm/RoPE/SwiGLU stay unfused")
        return []
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        rep.notes.append(f"liger-kernel has no kernels for model type {model_type!r}")
        return []
    parts = {"rope": True, "rms_norm": True, "swiglu": True}
    try:
        # Our own fused loss replaces the lm_head + loss, so Liger's loss patches stay off.
        _apply_liger_kernel_to_instance(
            model=model, cross_entropy=False, fused_linear_cross_entropy=False, **parts
        )
    except Exception as e:
        rep.notes.append(f"liger-kernel failed on {model_type} ({type(e).__name__}: {e})")
        return []
    return sorted(parts)


def _torch_rms_norm_forward(self: Any, x: Any) -> Any:
    import torch

    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, eps)


def set_rms_norm_impl(model: Any, impl: str) -> int:
    """Switch the decoder's RMSNorms between Liger's Triton kernel and torch's fused
    `F.rms_norm` (one dispatcher call; Liger's Python wrapper costs ~150 us a call on the CPU,
    which matters when the step is CPU-bound). Returns how many modules were switched."""
    n = 0
    for m in _unwrap(model).modules():
        if not type(m).__name__.endswith("RMSNorm") or getattr(m, "weight", None) is None:
            continue
        if "_forge_prev_forward" not in m.__dict__:
            m._forge_prev_forward = m.__dict__.get("forward")
        if impl == "torch":
            m.forward = types.MethodType(_torch_rms_norm_forward, m)
        elif m._forge_prev_forward is not None:
            m.forward = m._forge_prev_forward
        else:
            m.__dict__.pop("forward", None)
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# Fused LoRA linear
# --------------------------------------------------------------------------------------------


def _dequant(weight: Any, absmax: Any, blocksize: int, quant_type: str, shape: list[int], dtype: Any) -> Any:
    """A dense (out, in) weight in `dtype`: 4-bit codes dequantized in one kernel when `absmax`
    is given, else `weight` itself (a plain linear's)."""
    import torch

    if absmax is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, blocksize, quant_type, shape, dtype)


def _absmax(w: Any) -> Any:
    """The fp32 absmax of a 4-bit weight: the cached copy (cache_absmax), the plain one, or the
    double-quantized one dequantized now (two kernels, instead of bitsandbytes' wrapper)."""
    import torch

    qs = w.quant_state
    cached = getattr(w, "_forge_absmax", None)
    if cached is not None:
        return cached
    if not qs.nested:
        return qs.absmax
    s2 = qs.state2
    absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
        qs.absmax, s2.absmax, s2.code, s2.blocksize, torch.float32
    )
    return absmax + qs.offset


def _weight_args(base: Any) -> tuple[Any, Any, int, str, list[int]]:
    """(weight, absmax, blocksize, quant_type, shape) for _dequant, from a plain or 4-bit linear."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return w, None, 0, "", list(w.shape)
    # At batch 1 x 2048 tokens the step is bound by the CPU issuing kernels: one dequant kernel
    # instead of bitsandbytes' wrapper (nested-absmax dequant, add, checks) per weight.
    return w.data, _absmax(w), qs.blocksize, qs.quant_type, list(qs.shape)


def _dense_weight(base: Any, dtype: Any) -> Any:
    """The base layer's weight as a dense (out, in) tensor in `dtype` (dequantized if 4-bit)."""
    return _dequant(*_weight_args(base), dtype)


def _dequant_rows(
    weights: list[Any],
    absmax: list[Any],
    blocksize: int,
    quant_type: str,
    rows: list[int],
    n_in: int,
    dtype: Any,
) -> Any:
    """The dense weights of a group of projections stacked as one (sum of rows, in) tensor: each
    4-bit weight is dequantized straight into its rows (no copy), plain ones are concatenated."""
    import torch

    if len(weights) == 1:
        return _dequant(weights[0], absmax[0], blocksize, quant_type, [rows[0], n_in], dtype)
    if absmax[0] is None:
        return torch.cat(
            [
                _dequant(w, am, blocksize, quant_type, [n, n_in], dtype)
                for w, am, n in zip(weights, absmax, rows)
            ]
        )
    return _once(_make_dequant_rows_op)(weights, absmax, blocksize, quant_type, rows, n_in, dtype)


def _make_dequant_rows_op() -> Any:
    """4-bit weights dequantized into the rows of one new tensor, as a custom operator: the
    compiler traces the fused LoRA op's backward, and bitsandbytes' fake `.out` kernel rejects a
    list shape there; opaque, only this op's own fake runs."""
    import torch

    schema = (
        "(Tensor[] weight, Tensor[] absmax, int blocksize, str quant_type, SymInt[] rows, SymInt n_in,"
        " ScalarType dtype) -> Tensor"
    )

    @torch.library.custom_op("forge::dequant_rows", mutates_args=(), schema=schema)
    def op(weight, absmax, blocksize, quant_type, rows, n_in, dtype):  # type: ignore[no-untyped-def]
        out = torch.empty(sum(rows), n_in, dtype=dtype, device=weight[0].device)
        off = 0
        for w, am, n in zip(weight, absmax, rows):
            if out.device.type == "cuda":
                torch.ops.bitsandbytes.dequantize_4bit.out(
                    w, am, blocksize, quant_type, [n, n_in], dtype, out=out[off : off + n]
                )
            else:  # bitsandbytes' CPU backend has no .out
                out[off : off + n] = _dequant(w, am, blocksize, quant_type, [n, n_in], dtype)
            off += n
        return out

    @op.register_fake
    def _(weight, absmax, blocksize, quant_type, rows, n_in, dtype):  # type: ignore[no-untyped-def]
        return weight[0].new_empty(sum(rows), n_in, dtype=dtype)

    return op


def cache_absmax(model: Any, enable: bool = True) -> int:
    """Keep each double-quantized weight's absmax dequantized (fp32, 1/16 byte per weight: 0.38 GiB
    for a 7B) so dequantizing the weight is one kernel; `enable=False` frees them. Returns bytes held."""
    import torch

    held = 0
    for m in _unwrap(model).modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is None or not qs.nested:
            continue
        if not enable:
            w._forge_absmax = None
            continue
        if getattr(w, "_forge_absmax", None) is None:
            with torch.no_grad():
                w._forge_absmax = _absmax(w).float()
        held += w._forge_absmax.numel() * 4
    return held


def _fast_base(base: Any) -> bool:
    """A plain linear or a bitsandbytes 4-bit linear (8-bit and others keep PEFT's path)."""
    import torch

    w = getattr(base, "weight", None)
    if not isinstance(base, torch.nn.Linear) or w is None:
        return False
    if getattr(w, "quant_state", None) is not None:
        return True
    return w.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _lora_fwd(
    x: Any, a: Any, b: Any, weight: Any, bias: Any, scale: float, p: float, n: int
) -> tuple[Any, Any, Any]:
    """y = x W^T (+ bias) + s * (drop(x) A^T) B^T for 2-D x and a group of n projections that read
    x: A stacks their (r, in) adapters, B is block-diagonal (their (out, r) adapters), `weight()`
    gives their stacked dense W (made only for the matmul). Each projection draws its own dropout
    mask, as PEFT's separate dropout modules do. Returns y, x A^T and the keep-mask (bool
    (n, tokens, in), or None at p = 0)."""
    import torch

    keep = None
    if p > 0:
        # One kernel for all n masks; x A_i^T per projection as one batched matmul.
        xd, keep = torch.native_dropout(x.expand(n, *x.shape), p, True)
        xa = torch.bmm(xd, a.view(n, -1, a.shape[1]).transpose(1, 2)).transpose(0, 1).reshape(x.shape[0], -1)
        del xd
    else:
        xa = x @ a.t()
    w = weight()
    y = torch.nn.functional.linear(x, w, bias)
    del w
    y.addmm_(xa, b.t(), alpha=scale)
    return y, xa, keep


def _lora_bwd(
    gy: Any,
    x: Any,
    xa: Any,
    keep: Any,
    a: Any,
    b: Any,
    weight: Any,
    scale: float,
    p: float,
    n: int,
    needs: Any,
) -> tuple[Any, Any, Any]:
    """Gradients (x, A, B) of _lora_fwd; `needs` is ctx.needs_input_grad for (x, a, b). B's
    gradient is full (out, n r): the caller's block_diag keeps its diagonal blocks."""
    import torch

    g = gy.reshape(-1, gy.shape[-1])
    tokens = x.shape[0]
    gxa = (g @ b).mul_(scale)
    gx = ga = gb = None
    if needs[2]:
        gb = (g.t() @ xa).mul_(scale)
    # Per projection (tokens, r) blocks of gxa, as a batch: (n, tokens, r).
    gxa_n = gxa.view(tokens, n, -1).transpose(0, 1) if keep is not None else None
    if needs[1]:
        if keep is None:
            ga = gxa.t() @ x
        else:
            xd = torch.ops.aten.native_dropout_backward(x.expand(n, *x.shape), keep, 1.0 / (1.0 - p))
            ga = torch.bmm(gxa_n.transpose(1, 2), xd).reshape(a.shape)
            del xd
    if needs[0]:
        w = weight()
        gx = g @ w
        del w
        if keep is None:
            gx.addmm_(gxa, a)
        else:
            gxd = torch.bmm(gxa_n, a.view(n, -1, a.shape[1]))
            gx.add_(torch.ops.aten.native_dropout_backward(gxd, keep, 1.0 / (1.0 - p)).sum(0))
    return gx, ga, gb


def _make_lora_fn() -> Any:
    import torch

    class _LoraLinear(torch.autograd.Function):
        """The eager fused LoRA projection group (see _lora_fwd). Saves x (shared by the group, so
        nearly free), x A^T (tokens x n r) and, with dropout, a bool mask; W is dequantized again in
        backward."""

        @staticmethod
        def forward(ctx: Any, x: Any, a: Any, b: Any, bases: Any, scale: float, p: float) -> Any:
            weight = lambda: _dense_rows(bases, x.shape[1], x.dtype)  # noqa: E731
            y, xa, keep = _lora_fwd(x, a, b, weight, _stacked_bias(bases, x.dtype), scale, p, len(bases))
            ctx.save_for_backward(x, xa, keep, a, b)
            ctx.bases, ctx.scale, ctx.p = bases, scale, p
            return y

        @staticmethod
        def backward(ctx: Any, gy: Any) -> Any:
            x, xa, keep, a, b = ctx.saved_tensors
            w = lambda: _dense_rows(ctx.bases, x.shape[1], x.dtype)  # noqa: E731
            n = len(ctx.bases)
            gx, ga, gb = _lora_bwd(gy, x, xa, keep, a, b, w, ctx.scale, ctx.p, n, ctx.needs_input_grad)
            return gx, ga, gb, None, None, None

    return _LoraLinear


_LORA_OP_SCHEMA = (
    "(Tensor x, Tensor a, Tensor b, Tensor[] weight, Tensor?[] absmax, Tensor? bias, float scale, float p,"
    " int blocksize, str quant_type, SymInt[] rows) -> (Tensor, Tensor, Tensor)"
)


def _make_lora_op() -> Any:
    """The same projection group as a custom operator, for compiled decoder layers. Opaque to the
    compiler on purpose: traced, the compiler merges the backward's dequantization with the
    forward's and keeps every dense bf16 weight alive until backward (0.4 GiB a 7B layer)."""
    import torch

    @torch.library.custom_op("forge::lora_linear", mutates_args=(), schema=_LORA_OP_SCHEMA)
    def op(x, a, b, weight, absmax, bias, scale, p, blocksize, quant_type, rows):  # type: ignore[no-untyped-def]
        w = lambda: _dequant_rows(weight, absmax, blocksize, quant_type, rows, x.shape[1], x.dtype)  # noqa: E731
        y, xa, keep = _lora_fwd(x, a, b, w, bias, scale, p, len(weight))
        return y, xa, keep if keep is not None else x.new_empty(0, dtype=torch.bool)

    @op.register_fake
    def _(x, a, b, weight, absmax, bias, scale, p, blocksize, quant_type, rows):  # type: ignore[no-untyped-def]
        keep = x.new_empty((len(weight), *x.shape) if p > 0 else (0,), dtype=torch.bool)
        return x.new_empty(x.shape[0], sum(rows)), x.new_empty(x.shape[0], a.shape[0]), keep

    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, a, b, weight, absmax, _bias, scale, p, blocksize, quant_type, rows = inputs
        _y, xa, keep = output
        ctx.save_for_backward(x, a, b, xa, keep, *weight, *[t for t in absmax if t is not None])
        ctx.scale, ctx.p, ctx.quant = scale, p, (blocksize, quant_type, list(rows))
        ctx.n, ctx.quantized = len(weight), absmax[0] is not None

    def backward(ctx: Any, gy: Any, _gxa: Any, _gkeep: Any) -> Any:
        x, a, b, xa, keep, *rest = ctx.saved_tensors
        n = ctx.n
        weight, absmax = rest[:n], (rest[n:] if ctx.quantized else [None] * n)
        blocksize, quant_type, rows = ctx.quant
        w = lambda: _dequant_rows(weight, absmax, blocksize, quant_type, rows, x.shape[1], x.dtype)  # noqa: E731
        keep = keep if ctx.p > 0 else None
        gx, ga, gb = _lora_bwd(gy, x, xa, keep, a, b, w, ctx.scale, ctx.p, n, ctx.needs_input_grad)
        return gx, ga, gb, [None] * n, [None] * n, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op


def _lora_op() -> Any:
    return _once(_make_lora_op)


def _lora_fn() -> Any:
    return _once(_make_lora_fn)


def _group_weight_args(bases: Any) -> tuple[list[Any], list[Any], int, str, list[int]]:
    """(weights, absmax, blocksize, quant_type, rows) of a group of base layers, for _dequant_rows
    (a group shares blocksize and quant type, see _same_base_kind)."""
    args = [_weight_args(base) for base in bases]
    _, _, blocksize, quant_type, _ = args[0]
    return [w for w, *_ in args], [am for _, am, *_ in args], blocksize, quant_type, [s[0] for *_, s in args]


def _dense_rows(bases: Any, n_in: int, dtype: Any) -> Any:
    """The stacked dense weights of a group of base layers (see _dequant_rows)."""
    return _dequant_rows(*_group_weight_args(bases), n_in, dtype)


def _stacked_bias(bases: Any, dtype: Any) -> Any:
    """The group's biases as one vector (a group has all or none, see _LoraGroup.ready)."""
    import torch

    if bases[0].bias is None:
        return None
    return torch.cat([base.bias.to(dtype) for base in bases])


def lora_linear(x: Any, base: Any, a: Any, b: Any, scale: float, p: float = 0.0) -> Any:
    """The fused LoRA projection of `x` (any leading shape) through one base layer, or through a
    group of base layers that read the same x (a list: A stacked, B block-diagonal, output
    stacked; see _lora_fwd). The adapters are multiplied in x's dtype."""
    import torch

    bases = list(base) if isinstance(base, (list, tuple)) else [base]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a, b = a.to(x.dtype), b.to(x.dtype)
    if torch.compiler.is_compiling():
        weights, absmax, blocksize, quant_type, rows = _group_weight_args(bases)
        bias = _stacked_bias(bases, x.dtype)
        y = _lora_op()(x2, a, b, weights, absmax, bias, float(scale), float(p), blocksize, quant_type, rows)[
            0
        ]
    else:
        y = _lora_fn().apply(x2, a, b, tuple(bases), float(scale), float(p))
    return y.view(*lead, y.shape[-1])


def _fusable(layer: Any) -> tuple[str, float] | None:
    """(adapter name, dropout p) when `layer` (a PEFT LoRA Linear) can take the fused path now:
    one plain active adapter on a plain or 4-bit base, not merged or disabled."""
    import torch

    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (
        name not in layer.lora_A
        or name in getattr(layer, "lora_variant", {})
        or layer.use_dora.get(name, False)
    ):
        return None
    if not _fast_base(layer.base_layer):
        return None
    drop = layer.lora_dropout[name]
    return name, drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0


class _LoraGroup:
    """Sibling LoRA projections that read the same input (q/k/v, gate/up). The first one called
    runs the whole group as one fused op (one dequantized weight block, one matmul for the base,
    one for the adapters' A); its siblings, called next with the same tensor, take their slice.
    At batch 1 x 2048 tokens a 7B step is bound by the CPU issuing kernels: a layer's 7 LoRA
    projections become 4 calls."""

    def __init__(self, members: list[Any], own_storage: tuple[int, ...] = ()) -> None:
        self.members = members
        # Members whose output backward keeps on its own (attention saves v as it is): a slice
        # would keep the whole q/k/v block alive in every layer that is not checkpointed.
        self.own_storage = own_storage
        self.x: Any = None
        self.outs: list[Any] | None = None

    def ready(self) -> tuple[str, float] | None:
        """The group's (adapter, p) when every member can run fused with the same settings."""
        first = self.members[0]
        got = _fusable(first)
        if got is None:
            return None
        name = got[0]
        r, scale = first.r[name], first.scaling[name]
        has_bias = first.base_layer.bias is not None
        for m in self.members[1:]:
            if _fusable(m) != got or m.r.get(name) != r or m.scaling.get(name) != scale:
                return None
            if (m.base_layer.bias is not None) != has_bias or not _same_base_kind(
                first.base_layer, m.base_layer
            ):
                return None
        return got

    def output(self, i: int, x: Any, name: str, p: float) -> Any:
        """Member i's output for input x (the whole group runs on the first call for x)."""
        import torch

        outs = self.outs
        if self.x is x and outs is not None and outs[i] is not None:
            y = outs[i]
            outs[i] = None
            if all(o is None for o in outs):  # every sibling served: hold no tensors
                self.x = self.outs = None
            return y
        ms = self.members
        a = torch.cat([m.lora_A[name].weight.to(x.dtype) for m in ms])
        b = torch.block_diag(*[m.lora_B[name].weight.to(x.dtype) for m in ms])
        y = lora_linear(x, [m.base_layer for m in ms], a, b, ms[0].scaling[name], p)
        outs = list(torch.split(y, [m.base_layer.out_features for m in ms], dim=-1))
        for j in self.own_storage:
            outs[j] = outs[j].contiguous()
        y = outs[i]
        outs[i] = None
        self.x, self.outs = x, outs
        return y


def _same_base_kind(b1: Any, b2: Any) -> bool:
    """Both plain (same dtype) or both 4-bit with the same blocksize and quant type, same input."""
    q1, q2 = getattr(b1.weight, "quant_state", None), getattr(b2.weight, "quant_state", None)
    if b1.in_features != b2.in_features or (q1 is None) != (q2 is None):
        return False
    if q1 is None:
        return b1.weight.dtype == b2.weight.dtype
    return (q1.blocksize, q1.quant_type, q1.dtype) == (q2.blocksize, q2.quant_type, q2.dtype)


# Projections whose output is saved for backward as it is (attention's v): copied out of the
# group's output block so that block can be freed.
_OWN_STORAGE = ("v_proj",)


def _lora_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Replacement forward of a PEFT LoRA Linear: fused path for one plain adapter (as its group
    when it has one), else PEFT's."""
    if args or kwargs:
        return self._forge_orig_forward(x, *args, **kwargs)
    group = self.__dict__.get("_forge_group")
    ready = group.ready() if group is not None else None
    if ready is not None:
        return group.output(self._forge_group_index, x, *ready)
    got = _fusable(self)
    if got is None:
        return self._forge_orig_forward(x)
    name, p = got
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    return lora_linear(x, self.base_layer, a, b, self.scaling[name], p)


def patch_lora_layers(model: Any, group: bool = True) -> int:
    """Route every PEFT LoRA Linear through the fused path, siblings that read one input as a
    group (`group=False`: each on its own); returns how many were patched."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return 0
    _lora_fn()  # made here, outside any compiled region
    n = 0
    for parent in model.modules():
        patched = {}
        for child_name, m in parent.named_children():
            if (
                isinstance(m, LoraLayer)
                and hasattr(m, "lora_A")
                and _fast_base(getattr(m, "base_layer", None))
            ):
                if not hasattr(m, "_forge_orig_forward"):
                    m._forge_orig_forward = m.forward
                    m.forward = types.MethodType(_lora_forward, m)
                m.__dict__.pop("_forge_group", None)
                patched[child_name] = m
                n += 1
        for names in mem.SIBLING_PROJECTIONS if group else ():
            present = [k for k in names if k in patched]
            if len(present) > 1:
                members = [patched[k] for k in present]
                grp = _LoraGroup(members, tuple(i for i, k in enumerate(present) if k in _OWN_STORAGE))
                for i, m in enumerate(members):
                    m.__dict__["_forge_group"], m.__dict__["_forge_group_index"] = grp, i
    return n


# --------------------------------------------------------------------------------------------
# Fused linear cross-entropy
# --------------------------------------------------------------------------------------------


def _make_ce_fn() -> Any:
    import torch

    class _LinearCrossEntropy(torch.autograd.Function):
        """Mean (or sum / denom) token cross-entropy of `h @ w.T` against `y`, chunked over rows.

        Logits are rounded to h's dtype before the fp32 softmax, as transformers does (bf16 lm_head
        output, then `.float()`), so the loss matches the unfused path to rounding.
        """

        @staticmethod
        def forward(ctx: Any, h: Any, w: Any, y: Any, denom: Any) -> Any:
            n, vocab = h.shape[0], w.shape[0]
            if w.dtype != h.dtype:
                w = w.to(h.dtype)
            rows = max(1, min(n, mem.FUSED_CE_ROWS_X_VOCAB // vocab))
            valid_all = y != IGNORE_INDEX
            if denom is None:
                denom = valid_all.sum().clamp_(min=1)
            inv = 1.0 / torch.as_tensor(denom, dtype=torch.float32, device=h.device)
            want_grad = ctx.needs_input_grad[0]
            gh = torch.empty_like(h) if want_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, rows):
                valid = valid_all[s : s + rows]
                tgt = torch.where(valid, y[s : s + rows], 0)
                logits = (h[s : s + rows] @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, tgt[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum()
                if gh is not None:
                    # softmax - onehot, scaled by 1/denom in fp32 before rounding to bf16
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs.scatter_add_(1, tgt[:, None], torch.full_like(picked, -1.0)[:, None])
                    probs.mul_((valid * inv)[:, None])
                    torch.mm(probs.to(h.dtype), w, out=gh[s : s + rows])
                del logits
            ctx.save_for_backward(gh)
            return total * inv

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            (gh,) = ctx.saved_tensors
            return gh * g.to(gh.dtype), None, None, None

    return _LinearCrossEntropy


def _ce_fn() -> Any:
    return _once(_make_ce_fn)


def fused_linear_cross_entropy(
    hidden: Any,
    weight: Any,
    labels: Any | None = None,
    *,
    shift_labels: Any | None = None,
    num_items_in_batch: Any | None = None,
) -> Any:
    """transformers' causal-LM loss (labels shifted by one, -100 ignored, mean or sum / num_items)
    of `hidden @ weight.T`, without materialising the logits."""
    import torch

    from assistant_forge.training.labeled_loss import flat_targets

    h, y = flat_targets(hidden, labels, shift_labels)
    denom = num_items_in_batch
    if isinstance(denom, torch.Tensor):
        denom = denom.to(h.device)
    return _ce_fn().apply(h, weight, y, denom)


def _fused_loss(hidden: Any, model: Any, labels: Any, shift_labels: Any, num_items: Any) -> Any:
    return fused_linear_cross_entropy(
        hidden, model.lm_head.weight, labels, shift_labels=shift_labels, num_items_in_batch=num_items
    )


def _patch_fused_loss(model: Any, rep: SpeedReport) -> bool:
    from assistant_forge.training.labeled_loss import install_loss

    why = install_loss(model, _fused_loss, needs_bias_free_head=True)
    if why:
        rep.notes.append(f"fused loss skipped: {why}")
    return why is None


# --------------------------------------------------------------------------------------------
# Gradient checkpointing plan
# --------------------------------------------------------------------------------------------


class _HostOffload:
    """saved_tensors hooks that park large CUDA tensors in pinned host memory.

    The device-to-host copy runs on a side stream (the forward keeps computing meanwhile); the
    tensor's memory is not reused until that copy is done (record_stream). The copy back is
    issued on the compute stream when backward needs it.
    """

    min_numel = 1 << 16

    def __init__(self) -> None:
        self._streams: dict[Any, Any] = {}

    def _stream(self, device: Any) -> Any:
        import torch

        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: Any) -> Any:
        import torch

        if not t.is_cuda or t.numel() < self.min_numel:
            return t
        stream = self._stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)
        return (t.device, host, done)

    def unpack(self, packed: Any) -> Any:
        import torch

        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


_OFFLOAD = _HostOffload()


def _make_recompute_fn() -> Any:
    import torch

    class _Recompute(torch.autograd.Function):
        """Reentrant-style checkpoint of one decoder layer: the forward runs under no_grad (no
        autograd graph, no saved-tensor hooks: at short sequences the step is bound by the CPU
        issuing work, and torch's non-reentrant checkpoint runs Python hooks for every saved
        tensor twice); backward re-runs it with grad, under the same RNG and autocast state."""

        @staticmethod
        def forward(
            ctx: Any, run: Any, offload: bool, rng: bool, anchor: Any, hidden: Any, *args: Any
        ) -> Any:
            dev = hidden.device
            ctx.run, ctx.args, ctx.dev, ctx.rng = run, args, dev, rng
            if rng:  # dropout masks must come out the same in the recompute
                ctx.cpu_rng = torch.get_rng_state()
                ctx.dev_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
            ctx.autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
            if offload:
                ctx.packed = _OFFLOAD.pack(hidden.detach())
            else:
                ctx.packed = None
                ctx.save_for_backward(hidden)
            return run(hidden, *args)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            if ctx.packed is not None:
                hidden = _OFFLOAD.unpack(ctx.packed)
                ctx.packed = None
            else:
                (hidden,) = ctx.saved_tensors
            hidden = hidden.detach().requires_grad_(True)
            dev = ctx.dev
            enabled, dtype = ctx.autocast
            if ctx.rng:
                with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                    torch.set_rng_state(ctx.cpu_rng)
                    if ctx.dev_rng is not None:
                        torch.cuda.set_rng_state(ctx.dev_rng, dev)
                    with torch.enable_grad(), torch.autocast(dev.type, dtype=dtype, enabled=enabled):
                        out = ctx.run(hidden, *ctx.args)
            else:
                with torch.enable_grad(), torch.autocast(dev.type, dtype=dtype, enabled=enabled):
                    out = ctx.run(hidden, *ctx.args)
            torch.autograd.backward(out, grad)
            return (None, None, None, None, hidden.grad) + (None,) * len(ctx.args)

    return _Recompute


def _recompute_fn() -> Any:
    return _once(_make_recompute_fn)


_ANCHORS: dict[Any, Any] = {}


def _anchor(device: Any) -> Any:
    """A grad-requiring empty tensor: makes autograd run the checkpoint's backward even when the
    layer input does not require grad (frozen embeddings), as LoRA parameters inside still do."""
    import torch

    if device not in _ANCHORS:
        _ANCHORS[device] = torch.empty(0, device=device, requires_grad=True)
    return _ANCHORS[device]


def _torch_checkpoint(fn: Any, offload: bool, *args: Any, **kwargs: Any) -> Any:
    import torch
    from torch.utils.checkpoint import checkpoint

    if not offload:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    with torch.autograd.graph.saved_tensors_hooks(_OFFLOAD.pack, _OFFLOAD.unpack):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _uses_rng(model: Any) -> bool:
    """Whether a forward in training mode draws random numbers (a dropout with p > 0)."""
    import torch

    cfg = getattr(_unwrap(model), "config", None)
    if getattr(cfg, "attention_dropout", 0) or getattr(cfg, "hidden_dropout", 0):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _make_checkpoint_func(offload: bool, rng: bool = True) -> Any:
    """The checkpoint _layer_forward calls as f(partial(layer forward, **kw), hidden)."""
    import torch

    # The reentrant-style path needs a layer that returns one tensor; the first call goes through
    # torch's checkpoint and tells us (transformers 5 decoder layers return a tensor).
    returns_tensor: list[bool] = []

    def func(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        hidden = args[0] if args else None
        if kwargs or not isinstance(hidden, torch.Tensor) or returns_tensor != [True]:
            out = _torch_checkpoint(fn, offload, *args, **kwargs)
            if not returns_tensor:
                returns_tensor.append(isinstance(out, torch.Tensor))
            return out
        return _recompute_fn().apply(fn, offload, rng, _anchor(hidden.device), hidden, *args[1:])

    return func


def _layer_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's forward on the fast path: its own forward (compiled for training, see
    compile_layers), under forge's checkpoint when the plan recomputes this layer. transformers'
    checkpoint switch stays off: its wrapper would end up inside the compiled region."""
    import torch

    if not self.training or kwargs.get("past_key_values") is not None:
        # Sample answers during training: a KV cache, and shapes that change every token.
        return self._forge_eager(*args, **kwargs)
    run = self._forge_run
    if self._forge_ckpt and torch.is_grad_enabled():
        graphs = getattr(self, "_forge_graphs", None)
        if graphs is not None and len(args) == 1:
            out = graphs.call(run, args[0], kwargs, _anchor(args[0].device))
            if out is not None:
                return out
        return self._forge_ckpt_func(functools.partial(run, **kwargs), *args)
    return run(*args, **kwargs)


def _own_layer_forward(layer: Any) -> None:
    if "_forge_run" not in layer.__dict__:
        layer._forge_run = layer._forge_eager = layer.forward
        layer._forge_ckpt = False
        layer.forward = types.MethodType(_layer_forward, layer)
    layer.gradient_checkpointing = False


def compile_layers(model: Any, rng: bool) -> int:
    """torch.compile each decoder layer's training forward. The layers share the compiled graphs
    (the same code; parameters are graph inputs), so this costs one compile, not one per layer.
    Gains: fused norms, RoPE, SwiGLU and residual adds, and far fewer kernel launches from Python
    (at batch 1 and 2048 tokens the eager step is bound by the CPU issuing kernels)."""
    import torch

    layers = decoder_layers(model)
    # Made before any trace: a compiled graph guards on what _once has made so far.
    for make in (_make_lora_fn, _make_lora_op, _make_dequant_rows_op, _make_ce_fn, _make_recompute_fn):
        _once(make)
    # Training and no-grad graphs, dropout on and off, a dynamic-length variant: a few each.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # A machine that cannot compile (no C compiler for Triton's launcher, an unsupported model
    # part) trains with the eager layers and a warning in train.log instead of failing at step 1.
    torch._dynamo.config.suppress_errors = True
    if rng:
        # Dropout draws from torch's generator as in eager mode, so a checkpointed layer's
        # recompute (same RNG state restored) draws the same masks as its forward did.
        torch._inductor.config.fallback_random = True
    for layer in layers:
        _own_layer_forward(layer)
        if layer._forge_run is layer._forge_eager:
            layer._forge_run = torch.compile(layer._forge_eager)
    return len(layers)


def memory_budget_bytes(cfg: ForgeConfig, device: Any = None) -> int:
    """train.memory_budget_gib, or (when 0) what the GPU can give this process, less a margin."""
    import torch

    if cfg.train.memory_budget_gib:
        return int(cfg.train.memory_budget_gib * mem.GIB)
    if not torch.cuda.is_available():
        return 1 << 62
    free, _total = torch.cuda.mem_get_info(device)
    # Ours already allocated counts as ours; keep 10% for fragmentation and the CUDA context.
    return int((free + torch.cuda.memory_reserved(device)) * 0.9)


def configure_checkpointing(
    model: Any,
    cfg: ForgeConfig,
    *,
    seq_len: int | None = None,
    budget_bytes: int | None = None,
    checkpointed_layers: int | None = None,
    offload: bool | None = None,
    optimizer_on_device: bool | None = None,
    absmax_cache: bool | None = None,
    graphs: bool | None = None,
) -> mem.MemoryEstimate | None:
    """Set which decoder layers recompute in backward (the first n), whether their inputs go to the
    host, whether a paged optimizer's state may live on the device (see make_optimizer /
    training_args_overrides) and whether 4-bit absmax is kept dequantized. Explicit arguments win;
    else train.checkpoint_policy decides (`auto` fits the budget). Returns the plan's estimate."""
    layers = decoder_layers(model)
    rep = report(model)
    if not layers:
        rep.notes.append("no decoder layers found: checkpointing left as transformers set it")
        return None
    policy = getattr(cfg.train, "checkpoint_policy", "auto") if cfg.train.gradient_checkpointing else "none"
    model_config = _unwrap(model).config
    est: mem.MemoryEstimate | None = None
    rep.budget_gib = None
    if graphs is None:  # graphs replay what the compiler made, on a GPU
        graphs = mem.graphs_configured(cfg) and rep.compiled_layers > 0
        graphs = graphs and next(_unwrap(model).parameters()).is_cuda
    if checkpointed_layers is None:
        if policy == "none":
            checkpointed_layers, offload = 0, False
        elif policy in ("all", "offload"):
            checkpointed_layers, offload = len(layers), policy == "offload"
        else:
            budget = budget_bytes if budget_bytes is not None else memory_budget_bytes(cfg)
            est = mem.fit_checkpointing(cfg, model_config, budget, seq_len=seq_len, graphs=graphs)
            checkpointed_layers, offload = est.checkpointed_layers, est.offload
            if optimizer_on_device is None:
                optimizer_on_device = est.optimizer_on_device
            if absmax_cache is None:
                absmax_cache = est.absmax_cache
            rep.budget_gib = round(budget / mem.GIB, 2)
    offload = bool(offload)
    optimizer_on_device = bool(optimizer_on_device) and cfg.train.optimizer.startswith("paged_")
    if absmax_cache is None:
        absmax_cache = policy != "offload"
    if (
        est is None
        or est.optimizer_on_device != optimizer_on_device
        or est.absmax_cache != absmax_cache
        or est.offload != offload
        or est.checkpointed_layers != checkpointed_layers
    ):
        est = mem.estimate_memory(
            cfg,
            model_config,
            seq_len=seq_len,
            checkpointed_layers=checkpointed_layers,
            offload=offload,
            optimizer_on_device=optimizer_on_device,
            absmax_cache=absmax_cache,
            graphs=graphs,
        )
    rep.absmax_cache_gib = round(cache_absmax(model, est.absmax_cache) / mem.GIB, 3)
    rep.optimizer_on_device = optimizer_on_device
    rng = _uses_rng(model)
    fn = _make_checkpoint_func(offload, rng)
    for i, layer in enumerate(layers):
        _own_layer_forward(layer)
        layer._forge_ckpt = i < checkpointed_layers
        layer._forge_ckpt_func = fn
    # The estimate says whether graphs apply (checkpointed layers, inputs kept on the device).
    rep.graphed_layers = layer_graphs.attach(layers, checkpointed_layers if est.graphs else 0, rng)
    rep.checkpointed_layers, rep.num_layers, rep.offload = checkpointed_layers, len(layers), offload
    rep.estimate_gib = round(est.total_gib, 2)
    return est


# A paged optimizer whose state fits on the device is swapped for the same update run on-device.
_ON_DEVICE_OPTIM = {"paged_adamw_32bit": "adamw_torch_fused", "paged_adamw_8bit": "adamw_bnb_8bit"}


def training_args_overrides(cfg: ForgeConfig, model: Any = None) -> dict[str, Any]:
    """TrainingArguments the fast path needs: transformers must not re-enable checkpointing on
    every layer (that would undo the fitted plan), and the optimizer the plan chose."""
    out: dict[str, Any] = {"gradient_checkpointing": False}
    if model is not None and report(model).optimizer_on_device and cfg.train.optimizer in _ON_DEVICE_OPTIM:
        out["optim"] = _ON_DEVICE_OPTIM[cfg.train.optimizer]
    return out


class FlatParams:
    """The trainable tensors as views of one flat fp32 buffer, so a bitsandbytes optimizer steps
    one tensor instead of hundreds (its per-tensor Python loop costs ~45 ms a step for a 7B's 448
    LoRA matrices, on a step that is CPU-bound). Right before the step the gradients are gathered
    into one flat gradient (one `cat`, after backward has freed the activations, so the peak does
    not grow) and the per-tensor gradients are dropped; right after it the flat one is freed.
    Clipping over model.parameters() before the step works unchanged. No tensor hooks: a hook holding the
    tensor it hangs on is a reference cycle through C++ that the garbage collector cannot free."""

    def __init__(self, params: list[Any]) -> None:
        import torch

        self.params = params
        total = sum(p.numel() for p in params)
        self.flat = torch.nn.Parameter(torch.empty(total, dtype=params[0].dtype, device=params[0].device))
        off = 0
        for p in params:
            n = p.numel()
            self.flat.data[off : off + n].copy_(p.data.reshape(-1))
            p.data = self.flat.data[off : off + n].view_as(p)
            p._forge_flat = True
            off += n

    def gather_grads(self, *_: Any) -> None:
        import torch

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.flat.grad = torch.cat([g.reshape(-1) for g in grads])
        # Consumed: the optimizer's zero_grad only knows the flat buffer, so per-tensor gradients
        # left here would add up across steps in a loop that clears grads through the optimizer.
        for p in self.params:
            p.grad = None

    def release_grads(self, *_: Any) -> None:
        self.flat.grad = None


def flat_params(model: Any, params: list[Any]) -> FlatParams | None:
    """The model's FlatParams over `params` (made once), or None when they cannot share a buffer."""
    rep = report(model)
    made: FlatParams | None = getattr(rep, "_flat", None)
    if (
        made is not None
        and len(made.params) == len(params)
        and all(a is b for a, b in zip(made.params, params))
    ):
        return made
    if not params or any(p.dtype != params[0].dtype or p.device != params[0].device for p in params):
        return None
    if any(getattr(p, "_forge_flat", False) for p in params):
        return None  # already views of another buffer
    rep._flat = FlatParams(params)
    return rep._flat


def make_optimizer(model: Any, cfg: ForgeConfig, params: list[Any], lr: float, weight_decay: float) -> Any:
    """The optimizer the plan chose for `params` (the trainable ones), for loops that build their
    own (the bench; the trainer can pass it as Trainer(optimizers=(opt, None))).

    On the fast path a paged optimizer either moves on-device (plan says it fits: torch's fused
    AdamW, the same update) or steps one flat buffer (FlatParams)."""
    import torch

    if report(model).optimizer_on_device and cfg.train.optimizer == "paged_adamw_32bit":
        # Same update as bitsandbytes' AdamW 32-bit (betas 0.9/0.999, eps 1e-8), one fused kernel.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }.get(cfg.train.optimizer)
    if cls is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rep = report(model)
    flat = flat_params(model, params) if rep.flat_optimizer and not rep.offload else None
    if flat is None:
        return cls(params, lr=lr, weight_decay=weight_decay)
    opt = cls([flat.flat], lr=lr, weight_decay=weight_decay)
    opt.register_step_pre_hook(flat.gather_grads)
    opt.register_step_post_hook(flat.release_grads)
    return opt
