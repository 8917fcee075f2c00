"""LoRA dropout on the GPU: each projection of a group that reads one input (q/k/v, gate/up) draws
its own mask, as PEFT's separate dropout modules do, and the masks live only inside the kernels
that use them.

Why kernels of our own: PEFT's order is `B(A(drop(x)))`, so every projection's dropped copy of x
(tokens x in, bf16) was written, read by the A matmul and kept with its bool mask for backward,
whose dropout-backward passes wrote and read those sizes again: ~300 ms of a 7B step of 3.4 s
(session 9's profile, 9% of the GPU's time). Here the masks come from Philox counters (a seed drawn
from torch's generator, the element's index as offset; one draw gives four uniforms, one per
projection), so the forward's `drop(x) A^T`, the backward's `A` gradient and the gradient added to x
regenerate them tile by tile and nothing of the size of x is written or kept. Checkpoint recomputes and
CUDA-graph replays that restore the generator's state draw the same seed, hence the same masks.

`group_dropout` materializes the same masks (the CPU's and the checks' path).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's dropout serves
    triton = None

# One Philox draw holds four uniforms: groups of up to four projections take one draw per element.
MAX_GROUP = 4
_BLOCK = 1024
_BT, _BK = 64, 64  # tile of tokens x input features in the matmul kernels


def seeded(x: torch.Tensor, n: int, p: float) -> bool:
    """Whether a group of n projections reading x drops out through the seeded kernels (CUDA,
    Triton, contiguous 2-D x): its dropout state is then a seed, not n masks of x's size."""
    return (
        p > 0 and n <= MAX_GROUP and triton is not None and x.is_cuda and x.is_contiguous() and x.dim() == 2
    )


def draw_seed(device: torch.device) -> torch.Tensor:
    # A device tensor, not a host int: drawing it is part of a captured CUDA graph's work.
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def group_dropout(x: torch.Tensor, n: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped x, keep-mask) for n projections reading x: each (n, *x.shape), the masks
    independent, kept inputs scaled by 1 / (1 - p). On a GPU, the masks the seeded kernels draw
    from the same generator state."""
    if not seeded(x, n, p):
        return torch.native_dropout(x.expand(n, *x.shape), p, True)
    xd = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device)
    keep = torch.empty((n, *x.shape), dtype=torch.bool, device=x.device)
    numel = x.numel()
    grid = (triton.cdiv(numel, _BLOCK),)
    seed = draw_seed(x.device)
    _group_dropout_kernel[grid](x, xd, keep, seed, numel, p, 1.0 / (1.0 - p), N=n, BLOCK=_BLOCK)
    return xd, keep


def _splits(tiles: int, n: int, depth: int, device: torch.device) -> int:
    """How many slices the reduction of a matmul kernel is cut into: enough programs for two per
    streaming multiprocessor (a 2048-token row has only 32 token tiles), no slice empty."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(depth, triton.cdiv(2 * sms, tiles * n)))


def dropped_xa(x: torch.Tensor, a: torch.Tensor, n: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """`drop_i(x) A_i^T` for the group's n projections, side by side: (tokens, n r), in x's dtype.
    a: (n r, in) in x's dtype."""
    t, k = x.shape
    r = a.shape[0] // n
    k_tiles = triton.cdiv(k, _BK)
    splits = _splits(triton.cdiv(t, _BT), n, k_tiles, x.device)
    per_split = triton.cdiv(k_tiles, splits) * _BK
    part = torch.empty((splits, t, n * r), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(t, _BT), n, splits)
    _xa_kernel[grid](
        x, a, part, seed, t, k, r, p, 1.0 / (1.0 - p), per_split, N=n, BT=_BT, BK=_BK, BR=_rank_block(r)
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
    to gx in place (when given) and returns A's gradient `gxa_i^T drop_i(x)` stacked (n r, in), in
    x's dtype, when need_a."""
    t, k = x.shape
    r = a.shape[0] // n
    br = _rank_block(r)
    scale = 1.0 / (1.0 - p)
    if gx is not None:
        grid = (triton.cdiv(t, _BT), triton.cdiv(k, _BK))
        _gx_kernel[grid](gx, gxa, a, seed, t, k, r, p, scale, N=n, BT=_BT, BK=_BK, BR=br)
    if not need_a:
        return None
    t_tiles = triton.cdiv(t, _BT)
    splits = _splits(triton.cdiv(k, _BK), n, t_tiles, x.device)
    per_split = triton.cdiv(t_tiles, splits) * _BT
    part = torch.empty((splits, n * r, k), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(k, _BK), n, splits)
    _ga_kernel[grid](gxa, x, part, seed, t, k, r, p, scale, per_split, N=n, BT=_BT, BK=_BK, BR=br)
    return (part.sum(0) if splits > 1 else part[0]).to(x.dtype)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot takes dimensions of 16 and up


if triton is not None:

    @triton.jit
    def _uniform(seed, idx, j):
        """Projection j's uniform for the elements at flat indices idx of x (j < 4)."""
        r0, r1, r2, r3 = tl.rand4x(seed, idx.to(tl.uint32))
        return tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))

    @triton.jit
    def _group_dropout_kernel(
        x_ptr, xd_ptr, keep_ptr, seed_ptr, numel, p, scale, N: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < numel
        x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
        seed = tl.load(seed_ptr)
        for j in tl.static_range(N):
            kept = _uniform(seed, offs, j) >= p
            tl.store(keep_ptr + j * numel + offs, kept, mask=inside)
            out = tl.where(kept, x * scale, 0.0).to(xd_ptr.dtype.element_ty)
            tl.store(xd_ptr + j * numel + offs, out, mask=inside)

    @triton.jit
    def _xa_kernel(
        x_ptr,
        a_ptr,
        part_ptr,
        seed_ptr,
        T,
        K,
        R,
        p,
        scale,
        per_split,
        N: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BR: tl.constexpr,
    ):
        # Program (token tile, projection j, slice s of the input features): a partial sum of
        # drop_j(x) A_j^T over the slice, in fp32.
        j, s = tl.program_id(1), tl.program_id(2)
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        rr = tl.arange(0, BR)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BT, BR), dtype=tl.float32)
        # Slices end where the next begins; the last one's tiles past K load nothing.
        for k0 in range(0, per_split, BK):
            ks = s * per_split + k0 + tl.arange(0, BK)
            idx = rows[:, None].to(tl.int64) * K + ks[None, :]
            x = tl.load(x_ptr + idx, mask=(rows[:, None] < T) & (ks[None, :] < K), other=0.0)
            xd = tl.where(_uniform(seed, idx, j) >= p, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            at = tl.load(
                a_ptr + (j * R + rr[None, :]).to(tl.int64) * K + ks[:, None],
                mask=(rr[None, :] < R) & (ks[:, None] < K),
                other=0.0,
            )
            acc = tl.dot(xd, at, acc)
        out = part_ptr + (s.to(tl.int64) * T + rows[:, None]) * (N * R) + j * R + rr[None, :]
        tl.store(out, acc, mask=(rows[:, None] < T) & (rr[None, :] < R))

    @triton.jit
    def _ga_kernel(
        g_ptr,
        x_ptr,
        part_ptr,
        seed_ptr,
        T,
        K,
        R,
        p,
        scale,
        per_split,
        N: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BR: tl.constexpr,
    ):
        # Program (feature tile, projection j, slice s of the tokens): a partial sum of
        # gxa_j^T drop_j(x) over the slice, in fp32.
        j, s = tl.program_id(1), tl.program_id(2)
        ks = tl.program_id(0) * BK + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        for t0 in range(0, per_split, BT):
            rows = s * per_split + t0 + tl.arange(0, BT)
            idx = rows[:, None].to(tl.int64) * K + ks[None, :]
            x = tl.load(x_ptr + idx, mask=(rows[:, None] < T) & (ks[None, :] < K), other=0.0)
            xd = tl.where(_uniform(seed, idx, j) >= p, x.to(tl.float32) * scale, 0.0).to(x.dtype)
            gt = tl.load(
                g_ptr + rows[None, :].to(tl.int64) * (N * R) + j * R + rr[:, None],
                mask=(rr[:, None] < R) & (rows[None, :] < T),
                other=0.0,
            )
            acc = tl.dot(gt, xd, acc)
        out = part_ptr + (s.to(tl.int64) * (N * R) + j * R + rr[:, None]) * K + ks[None, :]
        tl.store(out, acc, mask=(rr[:, None] < R) & (ks[None, :] < K))

    @triton.jit
    def _gx_kernel(
        gx_ptr,
        g_ptr,
        a_ptr,
        seed_ptr,
        T,
        K,
        R,
        p,
        scale,
        N: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BR: tl.constexpr,
    ):
        # Program (token tile, feature tile): gx += sum_j mask_j * scale * (gxa_j A_j), in fp32.
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        ks = tl.program_id(1) * BK + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        inside = (rows[:, None] < T) & (ks[None, :] < K)
        idx = rows[:, None].to(tl.int64) * K + ks[None, :]
        seed = tl.load(seed_ptr)
        out = tl.load(gx_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        for j in tl.static_range(N):
            gt = tl.load(
                g_ptr + rows[:, None].to(tl.int64) * (N * R) + j * R + rr[None, :],
                mask=(rows[:, None] < T) & (rr[None, :] < R),
                other=0.0,
            )
            a = tl.load(
                a_ptr + (j * R + rr[:, None]).to(tl.int64) * K + ks[None, :],
                mask=(rr[:, None] < R) & (ks[None, :] < K),
                other=0.0,
            )
            out += tl.where(_uniform(seed, idx, j) >= p, tl.dot(gt, a) * scale, 0.0)
        tl.store(gx_ptr + idx, out.to(gx_ptr.dtype.element_ty), mask=inside)
