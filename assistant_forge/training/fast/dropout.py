"""LoRA dropout for a group of projections that read one input (q/k/v, gate/up): each projection
draws its own mask, as PEFT's separate dropout modules do, from one read of the input. And the
gradient that flows back through those masks to the input, in one pass (`add_dropped_grad_`).

Why a kernel of our own: torch's dropout over the group's broadcast input (`x.expand(n, ...)`, not
contiguous) takes its slow element-wise path: 190 ms of a 7B step of 3.5 s, 2.5x the contiguous
kernel's rate (profile of session 9). Here one Philox draw gives four uniforms, one per projection.
Same contract as `torch.native_dropout(x.expand(n, ...), p, True)`: the dropped-and-scaled inputs
and the bool keep-masks, both (n, *x.shape); the random numbers come from a seed drawn from torch's
generator, so checkpoint recomputes and CUDA-graph replays that restore its state redraw the same masks.
"""

from __future__ import annotations

import os

import torch

from assistant_forge.training.fast.plumbing import once

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's dropout serves
    triton = None

# One Philox draw holds four uniforms: groups of up to four projections take one draw per element.
MAX_GROUP = 4
_BLOCK = 1024
# The gradient through the masks in one kernel (add_dropped_grad_): at 7B/2048 the step's peak is 0.21
# GiB lower, its time the same (whole runs, sessions 11-12). FORGE_DROPPED_GRAD_KERNEL=0: torch's ops.
DROPPED_GRAD_KERNEL = os.environ.get("FORGE_DROPPED_GRAD_KERNEL", "1") != "0"


def group_dropout(x: torch.Tensor, n: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped x, keep-mask) for n projections reading x: each (n, *x.shape), the masks
    independent, kept inputs scaled by 1 / (1 - p)."""
    if n == 1 or n > MAX_GROUP or triton is None or not x.is_cuda or not x.is_contiguous():
        # n = 1: the broadcast is contiguous, and torch's vectorized kernel is as fast as this one.
        return torch.native_dropout(x.expand(n, *x.shape), p, True)
    xd = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device)
    keep = torch.empty((n, *x.shape), dtype=torch.bool, device=x.device)
    # A device tensor, not a host int: drawing it is part of a captured CUDA graph's work.
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    numel = x.numel()
    grid = (triton.cdiv(numel, _BLOCK),)
    _group_dropout_kernel[grid](x, xd, keep, seed, numel, p, 1.0 / (1.0 - p), N=n, BLOCK=_BLOCK)
    return xd, keep


def add_dropped_grad_(
    gx: torch.Tensor, gxa: torch.Tensor, a: torch.Tensor, keep: torch.Tensor, p: float
) -> None:
    """gx += sum_i drop_i'(gxa_i A_i), in place: the gradient reaching x through the group's dropped
    LoRA inputs. gx (tokens, in); gxa (tokens, n r), projection i's columns i r..(i+1) r; a (n r, in);
    keep (n, tokens, in) from group_dropout.

    Why a kernel: torch writes each projection's (tokens, in) product, its dropout backward, their sum
    and the add, ~35 bytes moved per element of x for q/k/v; this reads the masks and gx and writes
    gx (~7), one program per (tokens, in) tile, the rank-r products in registers. Through an opaque
    operator: the compiler traces the fused LoRA op's backward and must not trace into Triton."""
    n = keep.shape[0]
    if (
        not DROPPED_GRAD_KERNEL
        or triton is None
        or not gx.is_cuda
        or not all(t.is_contiguous() for t in (gx, gxa, a, keep))
    ):
        gxd = torch.bmm(gxa.view(gxa.shape[0], n, -1).transpose(0, 1), a.view(n, -1, a.shape[1]))
        gx.add_(torch.ops.aten.native_dropout_backward(gxd, keep, 1.0 / (1.0 - p)).sum(0))
        return
    once(make_dropped_grad_op)(gx, gxa, a, keep, 1.0 / (1.0 - p))


def make_dropped_grad_op() -> torch.library.CustomOpDef:
    schema = "(Tensor(a!) gx, Tensor gxa, Tensor a, Tensor keep, float scale) -> ()"

    @torch.library.custom_op("forge::add_dropped_grad", mutates_args=("gx",), schema=schema)
    def op(gx, gxa, a, keep, scale):  # type: ignore[no-untyped-def]
        n, t, k = keep.shape
        r = a.shape[0] // n
        grid = lambda meta: (triton.cdiv(t, meta["BT"]), triton.cdiv(k, meta["BK"]))  # noqa: E731
        _dropped_grad_kernel[grid](
            gx, gxa, a, keep, t, k, r, scale, N=n, BR=max(16, triton.next_power_of_2(r))
        )

    @op.register_fake
    def _(gx, gxa, a, keep, scale):  # type: ignore[no-untyped-def]
        return None

    return op


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BT": bt, "BK": bk}, num_warps=w)
            for bt, bk, w in ((64, 64, 4), (32, 128, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8))
        ],
        key=["K", "R", "N"],
        restore_value=["gx_ptr"],  # the benchmark runs add into gx: each config starts from the same gx
    )
    @triton.jit
    def _dropped_grad_kernel(
        gx_ptr, g_ptr, a_ptr, keep_ptr, T, K, R, scale,
        N: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        ks = tl.program_id(1) * BK + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        inside = (rows[:, None] < T) & (ks[None, :] < K)
        idx = rows[:, None].to(tl.int64) * K + ks[None, :]
        g_mask = (rows[:, None] < T) & (rr[None, :] < R)
        a_mask = (rr[:, None] < R) & (ks[None, :] < K)
        acc = tl.zeros((BT, BK), dtype=tl.float32)
        for j in tl.static_range(N):
            g = tl.load(
                g_ptr + rows[:, None].to(tl.int64) * (N * R) + j * R + rr[None, :], mask=g_mask, other=0.0
            )
            a = tl.load(a_ptr + (j * R + rr[:, None]).to(tl.int64) * K + ks[None, :], mask=a_mask, other=0.0)
            kept = tl.load(keep_ptr + (j * T).to(tl.int64) * K + idx, mask=inside, other=0)  # past 2**31
            acc += tl.where(kept, tl.dot(g, a), 0.0)
        gx = tl.load(gx_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        tl.store(gx_ptr + idx, (gx + acc * scale).to(gx_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _group_dropout_kernel(
        x_ptr, xd_ptr, keep_ptr, seed_ptr, numel, p, scale, N: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < numel
        x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
        r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr), offs.to(tl.uint32))
        for j in tl.static_range(N):
            if j == 0:
                r = r0
            elif j == 1:
                r = r1
            elif j == 2:
                r = r2
            else:
                r = r3
            kept = r >= p
            tl.store(keep_ptr + j * numel + offs, kept, mask=inside)
            out = tl.where(kept, x * scale, 0.0).to(xd_ptr.dtype.element_ty)
            tl.store(xd_ptr + j * numel + offs, out, mask=inside)
