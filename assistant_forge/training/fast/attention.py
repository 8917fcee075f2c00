"""Attention over packed rows on the fast path: each sample attends only to itself, and flash
attention's variable-length kernel does only that work.

Why: a packed row holds several samples. Through SDPA, transformers turns their position ids into a
block-diagonal mask the size of the row squared, which rules out the flash kernel: the masked
kernel computes every score of the row (the mask throws most away), in the forward, in each
checkpointed layer's recompute and in the backward. `torch.nn.attention.varlen` (torch >= 2.10) runs
flash attention over the samples' boundaries instead (`cu_seq_lens`, which training.data's collator
sends with each micro-batch), computing only each sample's own causal triangle.

Under the name `forge_varlen` the function is registered with transformers' attention interface, and
SDPA's mask function under the same name: calls without the boundaries (sample answers with a KV
cache, left-padded batches) take SDPA with its mask, as before. Calls with them skip the mask: a
pre-hook hands the model a placeholder 4-D mask, which transformers passes through as given. Left to
itself, transformers would build the row-squared mask nobody reads, check on the host whether the row
holds several samples (a GPU sync on every micro-batch) and, for a row of one sample, pass no mask:
another input signature, on which the CUDA graphs do not replay (3 of 16 micro-batches of a 7B step
on real data ran the slow path, ~650 ms instead of ~210).

For CUDA graphs and compiled layers every micro-batch must look alike: the collator pads the
boundary list to one length (empty samples at the end) and passes the row length as the longest
sample, an upper bound the kernel accepts.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from assistant_forge.core import memory as mem
from assistant_forge.errors import one_line
from assistant_forge.training.data import CU_SEQ_K, CU_SEQ_Q, MAX_K, MAX_Q
from assistant_forge.training.fast.plumbing import once, report, unwrap

NAME = "forge_varlen"


@dataclass(frozen=True)
class _Kernel:
    """torch's varlen_attn and what this torch version's signature offers."""

    fn: Callable[..., torch.Tensor]
    causal: tuple[str, Any]  # ("is_causal", True) in torch 2.10, ("window_size", (-1, 0)) later
    has_scale: bool
    has_gqa: bool  # takes fewer key/value heads than query heads (torch >= 2.12); else they are repeated

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
    ) -> torch.Tensor:
        kw: dict[str, Any] = dict([self.causal])
        if self.has_scale:
            kw["scale"] = scale
        if k.shape[1] != q.shape[1]:
            if self.has_gqa:
                kw["enable_gqa"] = True
            else:  # torch 2.11's kernel takes as many key/value heads as query heads
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return self.fn(q, k, v, cu, cu, max_len, max_len, **kw)


def find_kernel() -> _Kernel | None:
    """torch's varlen attention (None: this torch has none, or one whose causal switch we do not know)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal: tuple[str, Any] = ("is_causal", True)
    elif "window_size" in params:
        causal = ("window_size", (-1, 0))
    else:
        return None
    return _Kernel(varlen_attn, causal, "scale" in params, "enable_gqa" in params)


def _usable(kernel: _Kernel | None, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> bool:
    """Whether the kernel computes what SDPA would for these shapes and this scale."""
    if kernel is None or not query.is_cuda or query.shape[1] % key.shape[1]:
        return False
    default = query.shape[-1] ** -0.5
    return kernel.has_scale or scaling is None or abs(scaling - default) <= 1e-6 * default


def varlen_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, heads, T, dim] and key/value with their
    own head count; returns [1, T, heads, dim] as SDPA's function does."""
    cu = kwargs.get(CU_SEQ_Q)
    kernel = once(find_kernel)
    if cu is None or query.shape[0] != 1 or dropout or not _usable(kernel, query, key, scaling):
        if attention_mask is not None and attention_mask.shape[-1] == 1 and cu is not None:
            # The placeholder stands for no mask at all: SDPA would attend across samples.
            raise RuntimeError("varlen attention cannot serve this call and it carries no real mask")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        rest = {k: v for k, v in kwargs.items() if k not in (CU_SEQ_Q, CU_SEQ_K, MAX_Q, MAX_K)}
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **rest
        )
    # [1, H, T, D] -> [T, H, D]: the projections wrote [T, H, D] and attention saw it transposed.
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = kernel(q, k, v, cu, int(kwargs.get(MAX_Q) or q.shape[0]), scale)
    return out.unsqueeze(0), None


def _placeholder_mask(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook of the decoder: a micro-batch with sample boundaries gets the placeholder mask
    (see the module's docstring)."""
    if kwargs.get(CU_SEQ_Q) is not None and kwargs.get("attention_mask") is None and not args[1:]:
        kwargs["attention_mask"] = module._forge_placeholder_mask
    return args, kwargs


def register() -> None:
    """Make `forge_varlen` an attention implementation transformers models can be switched to."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def self_test(
    device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> str | None:
    """Check the kernel against SDPA on each sample alone (forward and input gradients), with the
    empty trailing samples the collator pads with. None when it agrees, else why not."""
    kernel = once(find_kernel)
    if kernel is None:
        return "torch has no varlen attention (needs torch >= 2.10)"
    g = torch.Generator(device=device).manual_seed(0)
    lens = [37, 150, 69]
    total = sum(lens)
    # Two empty samples at the end, as the collator pads.
    bounds = [0, *itertools.accumulate(lens), total, total]
    q = torch.randn(total, heads, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(total, kv_heads, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(total, kv_heads, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    try:
        out = kernel(q, k, v, cu, 256, scale)
        out.float().square().sum().backward()
        got = (out.detach(), q.grad.clone(), k.grad.clone())
        q.grad = k.grad = v.grad = None
        refs = []
        for a, b in zip(bounds, bounds[1 : len(lens) + 1]):
            qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            refs.append(
                torch.nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale, enable_gqa=kv_heads != heads
                )[0].transpose(0, 1)
            )
        ref = torch.cat(refs)
        ref.float().square().sum().backward()
        want = (ref.detach(), q.grad, k.grad)
    except Exception as e:  # noqa: BLE001 - any failure means: stay on SDPA
        return f"varlen attention failed its check: {one_line(e)}"
    for name, a, b in zip(("output", "query grad", "key grad"), got, want):
        err = (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)
        if not err < 2e-2:
            return f"varlen attention disagrees with SDPA ({name}: relative error {err:.3g})"
    return None


def enable(model: nn.Module, packing: bool) -> bool:
    """Switch a CUDA model on SDPA to forge_varlen when its kernel passes the self-test; the
    SpeedReport notes why not otherwise."""
    rep = report(model)
    base = unwrap(model)
    config = base.config
    if not packing or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "attention_dropout", 0.0):
        rep.notes.append("packed attention stays on SDPA: the model has attention dropout")
        return False
    param = next(base.parameters())
    dtype = torch.bfloat16 if param.dtype == torch.float32 else param.dtype
    try:
        shape: mem.ModelShape | None = mem.model_shape(config)
    except (TypeError, ValueError):  # a config without the usual sizes
        shape = None
    if param.device.type != "cuda":
        why: str | None = "flash attention needs a CUDA GPU"
    elif shape is None or not shape.heads:
        why = "no attention heads found"
    else:
        why = self_test(param.device, shape.heads, shape.kv_heads, shape.head_dim, dtype)
    if why:
        rep.notes.append(f"packed attention stays on SDPA: {why}")
        return False
    register()
    try:
        base.set_attn_implementation(NAME)
    except Exception as e:  # noqa: BLE001 - an architecture that refuses: keep SDPA
        rep.notes.append(f"packed attention stays on SDPA: {one_line(e)}")
        return False
    skip_mask_with_boundaries(getattr(base, base.base_model_prefix, base), param.device)
    rep.varlen_attention = True
    return True


def skip_mask_with_boundaries(decoder: nn.Module, device: torch.device) -> None:
    """Hand the decoder the placeholder mask whenever a call carries sample boundaries (once)."""
    if getattr(decoder, "_forge_placeholder_mask", None) is None:
        decoder._forge_placeholder_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        decoder.register_forward_pre_hook(_placeholder_mask, with_kwargs=True)
