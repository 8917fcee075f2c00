"""Fused linear cross-entropy: the causal-LM loss of `hidden @ lm_head.T` made a chunk of rows at a
time, the hidden states' gradient computed in the forward, so the fp32 logits (tokens x vocab x 4
bytes, 1 GiB at 8192 x 32000) never exist at once."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from assistant_forge.core import memory as mem
from assistant_forge.training.fast.plumbing import SpeedReport, once
from assistant_forge.training.labeled_loss import IGNORE_INDEX, flat_targets, install_loss


def make_ce_fn() -> type[torch.autograd.Function]:
    class _LinearCrossEntropy(torch.autograd.Function):
        """Mean (or sum / denom) token cross-entropy of `h @ w.T` against `y`, chunked over rows.

        Logits are rounded to h's dtype before the fp32 softmax, as transformers does (bf16 lm_head
        output, then `.float()`), so the loss matches the unfused path to rounding.
        """

        @staticmethod
        def forward(
            ctx: Any, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, denom: torch.Tensor | int | None
        ) -> torch.Tensor:
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
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            (gh,) = ctx.saved_tensors
            return gh * g.to(gh.dtype), None, None, None

    return _LinearCrossEntropy


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss (labels shifted by one, -100 ignored, mean or sum / num_items)
    of `hidden @ weight.T`, without materialising the logits."""
    h, y = flat_targets(hidden, labels, shift_labels)
    denom = num_items_in_batch
    if isinstance(denom, torch.Tensor):
        denom = denom.to(h.device)
    return once(make_ce_fn).apply(h, weight, y, denom)


def _fused_loss(
    hidden: torch.Tensor,
    model: nn.Module,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    num_items: torch.Tensor | int | None,
) -> torch.Tensor:
    return fused_linear_cross_entropy(
        hidden, model.lm_head.weight, labels, shift_labels=shift_labels, num_items_in_batch=num_items
    )


def patch_fused_loss(model: nn.Module, rep: SpeedReport) -> bool:
    """Have the model's forward compute its loss with fused_linear_cross_entropy (see labeled_loss)."""
    why = install_loss(model, _fused_loss, needs_bias_free_head=True)
    if why:
        rep.notes.append(f"fused loss skipped: {why}")
    return why is None
