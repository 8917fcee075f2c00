"""Dense weights from plain or bitsandbytes 4-bit linears, for the fused LoRA op: one dequantize
kernel per weight (or one custom op per group of weights) instead of bitsandbytes' wrapper."""

from __future__ import annotations

import os

import torch
from torch import nn

from assistant_forge.training.fast.plumbing import once, unwrap

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: bitsandbytes dequantizes
    triton = None

# (weight, absmax, blocksize, quant_type, shape): what dequant needs of one weight
WeightArgs = tuple[torch.Tensor, torch.Tensor | None, int, str, list[int]]


def dequant(
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    blocksize: int,
    quant_type: str,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """A dense (out, in) weight in `dtype`: 4-bit codes dequantized in one kernel when `absmax`
    is given, else `weight` itself (a plain linear's)."""
    if absmax is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    if _nf4_kernel_serves(weight, absmax, quant_type, dtype):
        out = torch.empty(shape, dtype=dtype, device=weight.device)
        _dequant_nf4_into(weight, absmax, blocksize, out)
        return out
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, blocksize, quant_type, shape, dtype)


def _nf4_kernel_serves(
    weight: torch.Tensor, absmax: torch.Tensor, quant_type: str, dtype: torch.dtype
) -> bool:
    """NF4 on a CUDA GPU with Triton: forge's kernel. Why: bitsandbytes' dequantize kernel runs at
    ~2 TB/s on an H200, and a 7B step dequantizes every weight three times a micro-batch (11% of
    the step); this one writes the same bits (checked against it in bench/gpu_train.py --check)."""
    return (
        NF4_KERNEL
        and triton is not None
        and quant_type == "nf4"
        and weight.is_cuda
        and absmax.dtype == torch.float32
        and dtype in (torch.bfloat16, torch.float16)
    )


_BYTES_PER_PROGRAM = 2048
# On by default since a whole `forge train` ran with it on an H200 (session 10, 1.5B and 7B at 2048:
# step 3.48 -> 3.34 s at 7B). FORGE_NF4_KERNEL=0 falls back to bitsandbytes' kernel, to rule it out.
NF4_KERNEL = os.environ.get("FORGE_NF4_KERNEL", "1") != "0"


# NF4's 16 levels per device. A plain dict, not `once`: made on the first (eager) call, which a
# compiled layer's guards on once's table would see as a change.
_NF4_LEVELS: dict[torch.device, torch.Tensor] = {}


def _nf4_levels(device: torch.device) -> torch.Tensor:
    levels = _NF4_LEVELS.get(device)
    if levels is None:
        from bitsandbytes.functional import get_4bit_type

        levels = _NF4_LEVELS[device] = get_4bit_type("nf4", device=device).float()
    return levels


def _dequant_nf4_into(weight: torch.Tensor, absmax: torch.Tensor, blocksize: int, out: torch.Tensor) -> None:
    """Dequantize a packed NF4 weight (two codes a byte, the first in the high nibble) into `out`
    (contiguous, as many elements as codes)."""
    n_bytes = weight.numel()
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    levels = _nf4_levels(out.device)
    _nf4_kernel[grid](weight, absmax, levels, out, n_bytes, BLOCKSIZE=blocksize, BLOCK=_BYTES_PER_PROGRAM)


if triton is not None:

    @triton.jit
    def _nf4_kernel(
        q_ptr, absmax_ptr, levels_ptr, out_ptr, n_bytes, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n_bytes
        codes = tl.load(q_ptr + offs, mask=inside, other=0).to(tl.int32)
        # A byte's two weights share a block (blocks hold an even number of weights).
        scale = tl.load(absmax_ptr + (offs * 2) // BLOCKSIZE, mask=inside, other=0.0)
        hi = tl.load(levels_ptr + ((codes >> 4) & 15)) * scale
        lo = tl.load(levels_ptr + (codes & 15)) * scale
        pairs = tl.reshape(tl.join(hi, lo), [2 * BLOCK]).to(out_ptr.dtype.element_ty)
        outs = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + outs, pairs, mask=outs < 2 * n_bytes)


def _absmax(w: torch.Tensor) -> torch.Tensor:
    """The fp32 absmax of a 4-bit weight: the cached copy (cache_absmax), the plain one, or the
    double-quantized one dequantized now (two kernels, instead of bitsandbytes' wrapper)."""
    qs = w.quant_state
    # An attribute of the weight rather than a table: read inside compiled layers, where an
    # attribute lookup traces.
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


def weight_args(base: nn.Linear) -> WeightArgs:
    """(weight, absmax, blocksize, quant_type, shape) for dequant, from a plain or 4-bit linear."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return w, None, 0, "", list(w.shape)
    # At batch 1 x 2048 tokens the step is bound by the CPU issuing kernels: one dequant kernel
    # instead of bitsandbytes' wrapper (nested-absmax dequant, add, checks) per weight.
    return w.data, _absmax(w), qs.blocksize, qs.quant_type, list(qs.shape)


def dense_weight(base: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor in `dtype` (dequantized if 4-bit)."""
    return dequant(*weight_args(base), dtype)


def group_weight_args(
    bases: list[nn.Linear] | tuple[nn.Linear, ...],
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], int, str, list[int]]:
    """(weights, absmax, blocksize, quant_type, rows) of a group of base layers, for dequant_rows
    (a group shares blocksize and quant type, see lora._same_base_kind)."""
    args = [weight_args(base) for base in bases]
    _, _, blocksize, quant_type, _ = args[0]
    return [w for w, *_ in args], [am for _, am, *_ in args], blocksize, quant_type, [s[0] for *_, s in args]


def dequant_rows(
    weights: list[torch.Tensor],
    absmax: list[torch.Tensor | None],
    blocksize: int,
    quant_type: str,
    rows: list[int],
    n_in: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense weights of a group of projections stacked as one (sum of rows, in) tensor: each
    4-bit weight is dequantized straight into its rows (no copy), plain ones are concatenated.
    4-bit weights always go through the opaque operator, a group of one too: the compiler traces
    the fused LoRA op's backward, and must not trace into forge's Triton kernel."""
    if absmax[0] is None:
        if len(weights) == 1:
            return dequant(weights[0], None, blocksize, quant_type, [rows[0], n_in], dtype)
        return torch.cat(
            [
                dequant(w, am, blocksize, quant_type, [n, n_in], dtype)
                for w, am, n in zip(weights, absmax, rows)
            ]
        )
    return once(make_dequant_rows_op)(weights, absmax, blocksize, quant_type, rows, n_in, dtype)


def dense_rows(bases: list[nn.Linear] | tuple[nn.Linear, ...], n_in: int, dtype: torch.dtype) -> torch.Tensor:
    """The stacked dense weights of a group of base layers (see dequant_rows)."""
    return dequant_rows(*group_weight_args(bases), n_in, dtype)


def make_dequant_rows_op() -> torch.library.CustomOpDef:
    """4-bit weights dequantized into the rows of one new tensor, as a custom operator: the
    compiler traces the fused LoRA op's backward, and bitsandbytes' fake `.out` kernel rejects a
    list shape there; opaque, only this op's own fake runs."""
    schema = (
        "(Tensor[] weight, Tensor[] absmax, int blocksize, str quant_type, SymInt[] rows, SymInt n_in,"
        " ScalarType dtype) -> Tensor"
    )

    @torch.library.custom_op("forge::dequant_rows", mutates_args=(), schema=schema)
    def op(weight, absmax, blocksize, quant_type, rows, n_in, dtype):  # type: ignore[no-untyped-def]
        out = torch.empty(sum(rows), n_in, dtype=dtype, device=weight[0].device)
        off = 0
        for w, am, n in zip(weight, absmax, rows):
            if _nf4_kernel_serves(w, am, quant_type, dtype):
                _dequant_nf4_into(w, am, blocksize, out[off : off + n])
            elif out.device.type == "cuda":
                torch.ops.bitsandbytes.dequantize_4bit.out(
                    w, am, blocksize, quant_type, [n, n_in], dtype, out=out[off : off + n]
                )
            else:  # bitsandbytes' CPU backend has no .out
                out[off : off + n] = dequant(w, am, blocksize, quant_type, [n, n_in], dtype)
            off += n
        return out

    @op.register_fake
    def _(weight, absmax, blocksize, quant_type, rows, n_in, dtype):  # type: ignore[no-untyped-def]
        return weight[0].new_empty(sum(rows), n_in, dtype=dtype)

    return op


def cache_absmax(model: nn.Module, enable: bool = True) -> int:
    """Keep each double-quantized weight's absmax dequantized (fp32, 1/16 byte per weight: 0.38 GiB
    for a 7B) so dequantizing the weight is one kernel; `enable=False` frees them. Returns bytes held."""
    held = 0
    for m in unwrap(model).modules():
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
