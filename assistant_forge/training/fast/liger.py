"""Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) for eager decoder layers, and a switch between
Liger's RMSNorm and torch's fused one."""

from __future__ import annotations

import types

import torch
from torch import nn

from assistant_forge.training.fast.plumbing import SpeedReport, unwrap


def apply_liger(model: nn.Module, rep: SpeedReport) -> list[str]:
    """Liger's RoPE, RMSNorm and SwiGLU kernels on the model; returns the parts patched."""
    try:
        # Imported here: liger-kernel is an optional extra ([gpu]) and needs triton and a GPU.
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


def _torch_rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, eps)


def set_rms_norm_impl(model: nn.Module, impl: str) -> int:
    """Switch the decoder's RMSNorms between Liger's Triton kernel and torch's fused
    `F.rms_norm` (one dispatcher call; Liger's Python wrapper costs ~150 us a call on the CPU,
    which matters when the step is CPU-bound). Returns how many modules were switched."""
    n = 0
    for m in unwrap(model).modules():
        if not type(m).__name__.endswith("RMSNorm") or getattr(m, "weight", None) is None:
            continue
        if "_forge_prev_forward" not in m.__dict__:
            m._forge_prev_forward = m.__dict__.get("forward")  # Liger's, or None: the class's
        if impl == "torch":
            m.forward = types.MethodType(_torch_rms_norm_forward, m)
        elif m._forge_prev_forward is not None:
            m.forward = m._forge_prev_forward
        else:
            m.__dict__.pop("forward", None)
        n += 1
    return n
