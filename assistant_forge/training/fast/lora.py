"""Fused LoRA linear: one autograd node per adapted projection (or per group of projections that
read one input) computes `x W^T + s (drop(x) A^T) B^T`, the 4-bit weight dequantized straight into
a bf16 matmul. Eager layers run it as an autograd.Function (`_LoraLinear`), compiled layers as the
opaque custom op `forge::lora_linear`."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from assistant_forge.core import memory as mem
from assistant_forge.training.fast.dequant import dense_rows, dequant_rows, group_weight_args
from assistant_forge.training.fast.dropout import add_dropped_grad_, group_dropout
from assistant_forge.training.fast.plumbing import RECOMPUTE, once, unwrap

# Members of a group: (output, x A^T, keep-mask or None)
LoraOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _lora_fwd(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    scale: float,
    p: float,
    n: int,
    discard: bool = False,
) -> LoraOut:
    """y = x W^T (+ bias) + s * (drop(x) A^T) B^T for 2-D x and a group of n projections that read
    x: A stacks their (r, in) adapters, B is block-diagonal (their (out, r) adapters), `weight()`
    gives their stacked dense W (made only for the matmul). Each projection draws its own dropout
    mask, as PEFT's separate dropout modules do. Returns y, x A^T and the keep-mask (bool
    (n, tokens, in), or None at p = 0). `discard`: y will not be read (a recompute, see
    plumbing.RECOMPUTE): left uncomputed, what backward needs (x A^T, the mask) made as usual."""
    keep = None
    if p > 0:
        # One kernel for all n masks; x A_i^T per projection as one batched matmul.
        xd, keep = group_dropout(x, n, p)
        xa = torch.bmm(xd, a.view(n, -1, a.shape[1]).transpose(1, 2)).transpose(0, 1).reshape(x.shape[0], -1)
        del xd
    else:
        xa = x @ a.t()
    if discard:
        return x.new_empty(x.shape[0], b.shape[0]), xa, keep
    w = weight()
    y = torch.nn.functional.linear(x, w, bias)
    del w
    y.addmm_(xa, b.t(), alpha=scale)
    return y, xa, keep


def _lora_bwd(
    gy: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    keep: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: Callable[[], torch.Tensor],
    scale: float,
    p: float,
    n: int,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (x, A, B) of _lora_fwd; `needs` is ctx.needs_input_grad for (x, a, b). B's
    gradient is full (out, n r): the caller's block_diag keeps its diagonal blocks."""
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
            add_dropped_grad_(gx, gxa, a, keep, p)
    return gx, ga, gb


def _stacked_bias(bases: list[nn.Linear] | tuple[nn.Linear, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The group's biases as one vector (a group has all or none, see _LoraGroup.ready)."""
    if bases[0].bias is None:
        return None
    return torch.cat([base.bias.to(dtype) for base in bases])


def make_lora_fn() -> type[torch.autograd.Function]:
    class _LoraLinear(torch.autograd.Function):
        """The eager fused LoRA projection group (see _lora_fwd). Saves x (shared by the group, so
        nearly free), x A^T (tokens x n r) and, with dropout, a bool mask; W is dequantized again in
        backward."""

        @staticmethod
        def forward(ctx: Any, x, a, b, bases, scale: float, p: float, discard: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
            weight = lambda: dense_rows(bases, x.shape[1], x.dtype)  # noqa: E731
            bias = _stacked_bias(bases, x.dtype)
            y, xa, keep = _lora_fwd(x, a, b, weight, bias, scale, p, len(bases), discard)
            ctx.save_for_backward(x, xa, keep, a, b)
            ctx.bases, ctx.scale, ctx.p = bases, scale, p
            return y

        @staticmethod
        def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            x, xa, keep, a, b = ctx.saved_tensors
            w = lambda: dense_rows(ctx.bases, x.shape[1], x.dtype)  # noqa: E731
            n = len(ctx.bases)
            gx, ga, gb = _lora_bwd(gy, x, xa, keep, a, b, w, ctx.scale, ctx.p, n, ctx.needs_input_grad)
            return gx, ga, gb, None, None, None, None

    return _LoraLinear


_LORA_OP_SCHEMA = (
    "(Tensor x, Tensor a, Tensor b, Tensor[] weight, Tensor?[] absmax, Tensor? bias, float scale, float p,"
    " int blocksize, str quant_type, SymInt[] rows, bool discard) -> (Tensor, Tensor, Tensor)"
)


def make_lora_op() -> torch.library.CustomOpDef:
    """The same projection group as a custom operator, for compiled decoder layers. Opaque to the
    compiler on purpose: traced, the compiler merges the backward's dequantization with the
    forward's and keeps every dense bf16 weight alive until backward (0.4 GiB a 7B layer)."""

    @torch.library.custom_op("forge::lora_linear", mutates_args=(), schema=_LORA_OP_SCHEMA)
    def op(x, a, b, weight, absmax, bias, scale, p, blocksize, quant_type, rows, discard):  # type: ignore[no-untyped-def]
        w = lambda: dequant_rows(weight, absmax, blocksize, quant_type, rows, x.shape[1], x.dtype)  # noqa: E731
        y, xa, keep = _lora_fwd(x, a, b, w, bias, scale, p, len(weight), discard)
        return y, xa, keep if keep is not None else x.new_empty(0, dtype=torch.bool)

    @op.register_fake
    def _(x, a, b, weight, absmax, bias, scale, p, blocksize, quant_type, rows, discard):  # type: ignore[no-untyped-def]
        keep = x.new_empty((len(weight), *x.shape) if p > 0 else (0,), dtype=torch.bool)
        return x.new_empty(x.shape[0], sum(rows)), x.new_empty(x.shape[0], a.shape[0]), keep

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: LoraOut) -> None:
        x, a, b, weight, absmax, _bias, scale, p, blocksize, quant_type, rows, _discard = inputs
        _y, xa, keep = output
        ctx.save_for_backward(x, a, b, xa, keep, *weight, *[t for t in absmax if t is not None])
        ctx.scale, ctx.p, ctx.quant = scale, p, (blocksize, quant_type, list(rows))
        ctx.n, ctx.quantized = len(weight), absmax[0] is not None

    def backward(ctx: Any, gy: torch.Tensor, _gxa: torch.Tensor, _gkeep: torch.Tensor) -> tuple[Any, ...]:
        x, a, b, xa, keep, *rest = ctx.saved_tensors
        n = ctx.n
        weight, absmax = rest[:n], (rest[n:] if ctx.quantized else [None] * n)
        blocksize, quant_type, rows = ctx.quant
        w = lambda: dequant_rows(weight, absmax, blocksize, quant_type, rows, x.shape[1], x.dtype)  # noqa: E731
        keep = keep if ctx.p > 0 else None
        gx, ga, gb = _lora_bwd(gy, x, xa, keep, a, b, w, ctx.scale, ctx.p, n, ctx.needs_input_grad)
        return gx, ga, gb, [None] * n, [None] * n, None, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op


def lora_linear(
    x: torch.Tensor,
    base: nn.Linear | list[nn.Linear],
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    p: float = 0.0,
    discard: bool = False,
) -> torch.Tensor:
    """The fused LoRA projection of `x` (any leading shape) through one base layer, or through a
    group of base layers that read the same x (a list: A stacked, B block-diagonal, output
    stacked; see _lora_fwd). The adapters are multiplied in x's dtype. `discard`: the output will
    not be read, only its gradient given (see _lora_fwd)."""
    bases = list(base) if isinstance(base, (list, tuple)) else [base]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a, b = a.to(x.dtype), b.to(x.dtype)
    if torch.compiler.is_compiling():
        weights, absmax, blocksize, quant_type, rows = group_weight_args(bases)
        bias = _stacked_bias(bases, x.dtype)
        op = once(make_lora_op)
        y, _xa, _keep = op(
            x2, a, b, weights, absmax, bias, float(scale), float(p), blocksize, quant_type, rows, discard
        )
    else:
        y = once(make_lora_fn).apply(x2, a, b, tuple(bases), float(scale), float(p), discard)
    return y.view(*lead, y.shape[-1])


def _fast_base(base: nn.Module | None) -> bool:
    """A plain linear or a bitsandbytes 4-bit linear (8-bit and others keep PEFT's path)."""
    w = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or w is None:
        return False
    if getattr(w, "quant_state", None) is not None:
        return True
    return w.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _fusable(layer: LoraLayer) -> tuple[str, float] | None:
    """(adapter name, dropout p) when `layer` (a PEFT LoRA Linear) can take the fused path now:
    one plain active adapter on a plain or 4-bit base, not merged or disabled, in training mode.
    Generating (replay and sample answers, eval mode) takes PEFT's forward: for a few tokens at a
    time bitsandbytes' inference kernel reads the 4-bit weight directly, where the fused op would
    dequantize every projection for each token (measured at 7B: replay answers 16 s instead of 7.5)."""
    if not layer.training or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
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
    return name, drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0


def _same_base_kind(b1: nn.Linear, b2: nn.Linear) -> bool:
    """Both plain (same dtype) or both 4-bit with the same blocksize and quant type, same input."""
    q1, q2 = getattr(b1.weight, "quant_state", None), getattr(b2.weight, "quant_state", None)
    if b1.in_features != b2.in_features or (q1 is None) != (q2 is None):
        return False
    if q1 is None:
        return b1.weight.dtype == b2.weight.dtype
    return (q1.blocksize, q1.quant_type, q1.dtype) == (q2.blocksize, q2.quant_type, q2.dtype)


class _LoraGroup:
    """Sibling LoRA projections that read the same input (q/k/v, gate/up). The first one called
    runs the whole group as one fused op (one dequantized weight block, one matmul for the base,
    one for the adapters' A); its siblings, called next with the same tensor, take their slice.
    At batch 1 x 2048 tokens a 7B step is bound by the CPU issuing kernels: a layer's 7 LoRA
    projections become 4 calls."""

    def __init__(self, members: list[LoraLayer], own_storage: tuple[int, ...] = ()) -> None:
        self.members = members
        # Members whose output backward keeps on its own (attention saves v as it is): a slice
        # would keep the whole q/k/v block alive in every layer that is not checkpointed.
        self.own_storage = own_storage
        self.x: torch.Tensor | None = None
        self.outs: list[torch.Tensor | None] | None = None

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

    def output(self, i: int, x: torch.Tensor, name: str, p: float) -> torch.Tensor:
        """Member i's output for input x (the whole group runs on the first call for x)."""
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


@dataclass(eq=False)
class FusedLora:
    """How one PEFT LoRA Linear runs on the fast path, kept on it as `_forge_lora`."""

    peft_forward: Callable[..., torch.Tensor]  # PEFT's own forward, for what the fused path skips
    group: _LoraGroup | None = None  # siblings that read the same input, run as one op
    index: int = 0  # this layer's place in the group
    # Its output goes straight into the layer's residual add: a recompute may leave it uncomputed.
    discardable: bool = False


# Projections whose output is saved for backward as it is (attention's v): copied out of the
# group's output block so that block can be freed.
_OWN_STORAGE = ("v_proj",)

# Model types whose decoder layer adds the MLP's down projection straight to the residual stream (no
# norm after it, unlike Gemma 2/3 or OLMo 2): a recompute may leave that projection uncomputed.
# InternLM2 loads as Llama (core.internlm2), Yi as Llama.
_RESIDUAL_DOWN_PROJ = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _lora_forward(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement forward of a PEFT LoRA Linear: fused path for one plain adapter (as its group
    when it has one), else PEFT's."""
    fused: FusedLora = self.__dict__["_forge_lora"]
    if args or kwargs:
        return fused.peft_forward(x, *args, **kwargs)
    group = fused.group
    ready = group.ready() if group is not None else None
    if ready is not None:
        return group.output(fused.index, x, *ready)
    got = _fusable(self)
    if got is None:
        return fused.peft_forward(x)
    name, p = got
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    discard = fused.discardable and RECOMPUTE.active
    return lora_linear(x, self.base_layer, a, b, self.scaling[name], p, discard)


def patch_lora_layers(model: nn.Module, group: bool = True) -> int:
    """Route every PEFT LoRA Linear through the fused path, siblings that read one input as a
    group (`group=False`: each on its own); returns how many were patched."""
    once(make_lora_fn)  # made here, outside any compiled region
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    residual_down = model_type in _RESIDUAL_DOWN_PROJ
    n = 0
    for parent in model.modules():
        patched: dict[str, FusedLora] = {}
        members: dict[str, LoraLayer] = {}
        for child_name, m in parent.named_children():
            if (
                isinstance(m, LoraLayer)
                and hasattr(m, "lora_A")
                and _fast_base(getattr(m, "base_layer", None))
            ):
                fused = m.__dict__.get("_forge_lora")
                if fused is None:
                    fused = m.__dict__["_forge_lora"] = FusedLora(m.forward)
                    m.forward = types.MethodType(_lora_forward, m)
                fused.group, fused.index = None, 0
                fused.discardable = residual_down and child_name == "down_proj"
                patched[child_name], members[child_name] = fused, m
                n += 1
        for names in mem.SIBLING_PROJECTIONS if group else ():
            present = [k for k in names if k in patched]
            if len(present) > 1:
                own = tuple(i for i, k in enumerate(present) if k in _OWN_STORAGE)
                grp = _LoraGroup([members[k] for k in present], own)
                for i, k in enumerate(present):
                    patched[k].group, patched[k].index = grp, i
    return n
