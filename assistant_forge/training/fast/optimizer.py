"""The optimizer the fast path's plan chose: a paged optimizer moved on-device when the plan says
its state fits, else a bitsandbytes optimizer stepping one flat buffer (FlatParams)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from assistant_forge.core.config import ForgeConfig
from assistant_forge.training.fast.plumbing import report

# A paged optimizer whose state fits on the device is swapped for the same update run on-device.
_ON_DEVICE_OPTIM = {"paged_adamw_32bit": "adamw_torch_fused", "paged_adamw_8bit": "adamw_bnb_8bit"}


def training_args_overrides(cfg: ForgeConfig, model: nn.Module | None = None) -> dict[str, Any]:
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

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        total = sum(p.numel() for p in params)
        self.flat = nn.Parameter(torch.empty(total, dtype=params[0].dtype, device=params[0].device))
        off = 0
        for p in params:
            n = p.numel()
            self.flat.data[off : off + n].copy_(p.data.reshape(-1))
            p.data = self.flat.data[off : off + n].view_as(p)
            p._forge_flat = True  # a view of this buffer now: another FlatParams must not take it
            off += n

    def gather_grads(self, *_: Any) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.flat.grad = torch.cat([g.reshape(-1) for g in grads])
        # Consumed: the optimizer's zero_grad only knows the flat buffer, so per-tensor gradients
        # left here would add up across steps in a loop that clears grads through the optimizer.
        for p in self.params:
            p.grad = None

    def release_grads(self, *_: Any) -> None:
        self.flat.grad = None


def flat_params(model: nn.Module, params: list[nn.Parameter]) -> FlatParams | None:
    """The model's FlatParams over `params` (made once), or None when they cannot share a buffer."""
    rep = report(model)
    made: FlatParams | None = rep._flat
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


def make_optimizer(
    model: nn.Module, cfg: ForgeConfig, params: list[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer the plan chose for `params` (the trainable ones), for loops that build their
    own (the bench; the trainer passes it as Trainer(optimizers=(opt, None))).

    On the fast path a paged optimizer either moves on-device (plan says it fits: torch's fused
    AdamW, the same update) or steps one flat buffer (FlatParams), except in the low-memory
    (offload) plan, where it steps the tensors as they are."""
    rep = report(model)
    if rep.optimizer_on_device and cfg.train.optimizer == "paged_adamw_32bit":
        # Same update as bitsandbytes' AdamW 32-bit (betas 0.9/0.999, eps 1e-8), one fused kernel.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    # Imported here: bitsandbytes loads a native library, which may be missing or broken where
    # only the plain optimizer runs.
    import bitsandbytes as bnb

    cls = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }.get(cfg.train.optimizer)
    if cls is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    flat = flat_params(model, params) if not rep.offload else None
    if flat is None:
        return cls(params, lr=lr, weight_decay=weight_decay)
    opt = cls([flat.flat], lr=lr, weight_decay=weight_decay)
    opt.register_step_pre_hook(flat.gather_grads)
    opt.register_step_post_hook(flat.release_grads)
    return opt
