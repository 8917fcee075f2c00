"""LoRA dropout on the GPU: each projection of a group that reads one input (q/k/v, gate/up) draws
its own mask, as PEFT's separate dropout modules do.

Two paths. `group_dropout` writes the dropped inputs and keeps the bool masks for backward (one
Philox draw gives four uniforms, one per projection; torch's dropout over the broadcast input took
its slow path: 190 ms of a 7B step, session 9). The seeded path (`seeded`, FORGE_SEEDED_DROPOUT=1)
keeps only a seed: PEFT's order is `B(A(drop(x)))`, and the masks-in-memory path writes and reads
tensors of x's size n times over in forward and backward (~300 ms of a 7B step of 3.4 s in session
9's profile); here `drop(x) A^T` (forward) and, in one kernel, A's gradient and the gradient added
to x (backward) redraw the masks tile by tile from Philox counters (the seed, the element's index),
one draw for the whole group, and nothing of x's size is written or kept. Both paths draw the same
masks from the same generator state; checkpoint recomputes and CUDA-graph replays that restore it
redraw them.
"""

from __future__ import annotations

import functools
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
# Off until a whole `forge train` has shown it faster (its first version lost to the masks).
SEEDED = os.environ.get("FORGE_SEEDED_DROPOUT") == "1"


def _triton_serves(x: torch.Tensor, n: int) -> bool:
    return n <= MAX_GROUP and triton is not None and x.is_cuda and x.is_contiguous()


def seeded(x: torch.Tensor, n: int, p: float) -> bool:
    """Whether a group of n projections reading x (2-D) drops out through the seeded kernels: its
    dropout state is then a seed, not n masks of x's size."""
    return SEEDED and p > 0 and x.dim() == 2 and _triton_serves(x, n)


def draw_seed(device: torch.device) -> torch.Tensor:
    # A device tensor, not a host int: drawing it is part of a captured CUDA graph's work.
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def group_dropout(x: torch.Tensor, n: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped x, keep-mask) for n projections reading x: each (n, *x.shape), the masks
    independent, kept inputs scaled by 1 / (1 - p). On a GPU, the masks the seeded kernels draw
    from the same generator state."""
    if not _triton_serves(x, n):
        return torch.native_dropout(x.expand(n, *x.shape), p, True)
    xd = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device)
    keep = torch.empty((n, *x.shape), dtype=torch.bool, device=x.device)
    numel = x.numel()
    seed = draw_seed(x.device)
    grid = (triton.cdiv(numel, _BLOCK),)
    _group_dropout_kernel[grid](x, xd, keep, seed, numel, p, 1.0 / (1.0 - p), N=n, BLOCK=_BLOCK)
    return xd, keep


def _splits(tiles: int, depth: int, device: torch.device) -> int:
    """Slices a kernel's reduction is cut into: about two programs per streaming multiprocessor
    (a 2048-token row has few tiles), never more slices than tiles to reduce over."""
    sms = _sm_count(device.index) if device.type == "cuda" else 4
    return max(1, min(depth, triton.cdiv(2 * sms, tiles)))


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot takes dimensions of 16 and up


_XA_BT, _XA_BK = 32, 64
_G_BT, _G_BK = 32, 64


def dropped_xa(x: torch.Tensor, a: torch.Tensor, n: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """`drop_i(x) A_i^T` for the group's n projections, side by side: (tokens, n r) in x's dtype.
    a: (n r, in), x's dtype."""
    t, k = x.shape
    r = a.shape[0] // n
    k_tiles = triton.cdiv(k, _XA_BK)
    splits = _splits(triton.cdiv(t, _XA_BT), k_tiles, x.device)
    per_split = triton.cdiv(k_tiles, splits) * _XA_BK
    part = torch.empty((splits, t, n * r), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(t, _XA_BT), splits)
    _xa_kernel[grid](
        x, a, part, seed, t, k, r, p, 1.0 / (1.0 - p), per_split, N=n, BT=_XA_BT, BK=_XA_BK, BR=_rank_block(r)
    )
    return (part.sum(0) if splits > 1 else part[0]).to(x.dtype)


def dropped_grads(
    gxa: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    n: int,
    p: float,
    seed: torch.Tensor,
    gx: torch.Tensor | None,
    need_a: bool,
) -> torch.Tensor | None:
    """Backward of dropped_xa for gxa (the gradient of its output): adds `sum_i drop_i'(gxa_i A_i)`
    to gx in place (when given) and returns A's gradient `gxa_i^T drop_i(x)` stacked (n r, in) in
    x's dtype (when need_a). Through an opaque operator: the compiler traces the fused LoRA op's
    backward and must not trace into Triton kernels."""
    if gx is None and not need_a:
        return None
    ga = once(make_dropped_grads_op)(gxa, x, a, seed, gx, n, float(p), need_a)
    return ga if need_a else None


def make_dropped_grads_op() -> torch.library.CustomOpDef:
    schema = (
        "(Tensor gxa, Tensor x, Tensor a, Tensor seed, Tensor(a!)? gx, int n, float p, bool need_a) -> Tensor"
    )

    @torch.library.custom_op("forge::dropped_grads", mutates_args=("gx",), schema=schema)
    def op(gxa, x, a, seed, gx, n, p, need_a):  # type: ignore[no-untyped-def]
        t, k = x.shape
        r = a.shape[0] // n
        k_tiles = triton.cdiv(k, _G_BK)
        t_tiles = triton.cdiv(t, _G_BT)
        splits = _splits(k_tiles, t_tiles, x.device)
        per_split = triton.cdiv(t_tiles, splits) * _G_BT
        part = torch.empty((splits, n * r, k) if need_a else (1,), dtype=torch.float32, device=x.device)
        _grads_kernel[(k_tiles, splits)](
            gxa, x, a, seed, gx if gx is not None else x, part, t, k, r, p, 1.0 / (1.0 - p), per_split,
            N=n, BT=_G_BT, BK=_G_BK, BR=_rank_block(r), HAS_GX=gx is not None, NEED_A=need_a,
            num_warps=8,
        )  # fmt: skip
        if not need_a:
            return x.new_empty(0)
        return (part.sum(0) if splits > 1 else part[0]).to(x.dtype)

    @op.register_fake
    def _(gxa, x, a, seed, gx, n, p, need_a):  # type: ignore[no-untyped-def]
        return x.new_empty(a.shape) if need_a else x.new_empty(0)

    return op


if triton is not None:

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

    @triton.jit
    def _dropped(x, r0, r1, r2, r3, j: tl.constexpr, p, scale):
        """Projection j's dropped-and-scaled x tile (x's dtype) from the tile's four uniforms."""
        if j == 0:
            r = r0
        elif j == 1:
            r = r1
        elif j == 2:
            r = r2
        else:
            r = r3
        return tl.where(r >= p, x.to(tl.float32) * scale, 0.0).to(x.dtype)

    @triton.jit
    def _xa_kernel(
        x_ptr, a_ptr, part_ptr, seed_ptr, T, K, R, p, scale, per_split,
        N: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    ):  # fmt: skip
        # Program (token tile, slice s of the input features): partial sums of drop_j(x) A_j^T over
        # the slice for every projection j, one Philox draw per element for all of them.
        s = tl.program_id(1)
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        rr = tl.arange(0, BR)
        seed = tl.load(seed_ptr)
        acc0 = tl.zeros((BT, BR), dtype=tl.float32)
        acc1 = tl.zeros((BT, BR), dtype=tl.float32)
        acc2 = tl.zeros((BT, BR), dtype=tl.float32)
        acc3 = tl.zeros((BT, BR), dtype=tl.float32)
        for k0 in range(0, per_split, BK):  # the last slice's tiles past K load nothing
            ks = s * per_split + k0 + tl.arange(0, BK)
            idx = rows[:, None].to(tl.int64) * K + ks[None, :]
            x = tl.load(x_ptr + idx, mask=(rows[:, None] < T) & (ks[None, :] < K), other=0.0)
            r0, r1, r2, r3 = tl.rand4x(seed, idx.to(tl.uint32))
            a_mask = (rr[:, None] < R) & (ks[None, :] < K)
            a_rows = a_ptr + rr[:, None].to(tl.int64) * K + ks[None, :]
            a0 = tl.load(a_rows, mask=a_mask, other=0.0)
            acc0 = tl.dot(_dropped(x, r0, r1, r2, r3, 0, p, scale), tl.trans(a0), acc0)
            if N > 1:
                a1 = tl.load(a_rows + R * K, mask=a_mask, other=0.0)
                acc1 = tl.dot(_dropped(x, r0, r1, r2, r3, 1, p, scale), tl.trans(a1), acc1)
            if N > 2:
                a2 = tl.load(a_rows + 2 * R * K, mask=a_mask, other=0.0)
                acc2 = tl.dot(_dropped(x, r0, r1, r2, r3, 2, p, scale), tl.trans(a2), acc2)
            if N > 3:
                a3 = tl.load(a_rows + 3 * R * K, mask=a_mask, other=0.0)
                acc3 = tl.dot(_dropped(x, r0, r1, r2, r3, 3, p, scale), tl.trans(a3), acc3)
        out = part_ptr + (s.to(tl.int64) * T + rows[:, None]) * (N * R) + rr[None, :]
        inside = (rows[:, None] < T) & (rr[None, :] < R)
        tl.store(out, acc0, mask=inside)
        if N > 1:
            tl.store(out + R, acc1, mask=inside)
        if N > 2:
            tl.store(out + 2 * R, acc2, mask=inside)
        if N > 3:
            tl.store(out + 3 * R, acc3, mask=inside)

    @triton.jit
    def _grad_step(
        x,
        r0,
        r1,
        r2,
        r3,
        j: tl.constexpr,
        p,
        scale,
        g,
        a,
        gx_acc,
        acc,
        HAS_GX: tl.constexpr,
        NEED_A: tl.constexpr,
    ):
        """One projection's share of a tile: gx += mask_j * scale * (g_j A_j); acc += g_j^T drop_j(x)."""
        if j == 0:
            r = r0
        elif j == 1:
            r = r1
        elif j == 2:
            r = r2
        else:
            r = r3
        kept = r >= p
        if HAS_GX:
            gx_acc += tl.where(kept, tl.dot(g, a) * scale, 0.0)
        if NEED_A:
            xd = tl.where(kept, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            acc = tl.dot(tl.trans(g), xd, acc)
        return gx_acc, acc

    @triton.jit
    def _grads_kernel(
        g_ptr, x_ptr, a_ptr, seed_ptr, gx_ptr, part_ptr, T, K, R, p, scale, per_split,
        N: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
        HAS_GX: tl.constexpr, NEED_A: tl.constexpr,
    ):  # fmt: skip
        # Program (feature tile, slice s of the tokens): for each token tile of the slice, the
        # gradient added to x there (each (token, feature) tile has one owner) and, summed over the
        # slice, A's gradient for every projection; one Philox draw per element.
        s = tl.program_id(1)
        ks = tl.program_id(0) * BK + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        seed = tl.load(seed_ptr)
        a_mask = (rr[:, None] < R) & (ks[None, :] < K)
        a_rows = a_ptr + rr[:, None].to(tl.int64) * K + ks[None, :]
        a0 = tl.load(a_rows, mask=a_mask, other=0.0)
        a1 = a0
        a2 = a0
        a3 = a0
        if N > 1:
            a1 = tl.load(a_rows + R * K, mask=a_mask, other=0.0)
        if N > 2:
            a2 = tl.load(a_rows + 2 * R * K, mask=a_mask, other=0.0)
        if N > 3:
            a3 = tl.load(a_rows + 3 * R * K, mask=a_mask, other=0.0)
        acc0 = tl.zeros((BR, BK), dtype=tl.float32)
        acc1 = tl.zeros((BR, BK), dtype=tl.float32)
        acc2 = tl.zeros((BR, BK), dtype=tl.float32)
        acc3 = tl.zeros((BR, BK), dtype=tl.float32)
        for t0 in range(0, per_split, BT):  # the last slice's tiles past T load nothing
            rows = s * per_split + t0 + tl.arange(0, BT)
            inside = (rows[:, None] < T) & (ks[None, :] < K)
            idx = rows[:, None].to(tl.int64) * K + ks[None, :]
            x = tl.load(x_ptr + idx, mask=inside, other=0.0)
            r0, r1, r2, r3 = tl.rand4x(seed, idx.to(tl.uint32))
            gx_acc = tl.zeros((BT, BK), dtype=tl.float32)
            g_mask = (rows[:, None] < T) & (rr[None, :] < R)
            g_rows = g_ptr + rows[:, None].to(tl.int64) * (N * R) + rr[None, :]
            g0 = tl.load(g_rows, mask=g_mask, other=0.0)
            gx_acc, acc0 = _grad_step(x, r0, r1, r2, r3, 0, p, scale, g0, a0, gx_acc, acc0, HAS_GX, NEED_A)
            if N > 1:
                g1 = tl.load(g_rows + R, mask=g_mask, other=0.0)
                gx_acc, acc1 = _grad_step(
                    x, r0, r1, r2, r3, 1, p, scale, g1, a1, gx_acc, acc1, HAS_GX, NEED_A
                )
            if N > 2:
                g2 = tl.load(g_rows + 2 * R, mask=g_mask, other=0.0)
                gx_acc, acc2 = _grad_step(
                    x, r0, r1, r2, r3, 2, p, scale, g2, a2, gx_acc, acc2, HAS_GX, NEED_A
                )
            if N > 3:
                g3 = tl.load(g_rows + 3 * R, mask=g_mask, other=0.0)
                gx_acc, acc3 = _grad_step(
                    x, r0, r1, r2, r3, 3, p, scale, g3, a3, gx_acc, acc3, HAS_GX, NEED_A
                )
            if HAS_GX:
                gx = tl.load(gx_ptr + idx, mask=inside, other=0.0).to(tl.float32)
                tl.store(gx_ptr + idx, (gx + gx_acc).to(gx_ptr.dtype.element_ty), mask=inside)
        if NEED_A:
            out = part_ptr + (s.to(tl.int64) * (N * R) + rr[:, None]) * K + ks[None, :]
            tl.store(out, acc0, mask=a_mask)
            if N > 1:
                tl.store(out + R * K, acc1, mask=a_mask)
            if N > 2:
                tl.store(out + 2 * R * K, acc2, mask=a_mask)
            if N > 3:
                tl.store(out + 3 * R * K, acc3, mask=a_mask)
