"""Logits only where a label is: the CPU trainer's causal-LM loss without the full-vocabulary head.

Loss is on assistant tokens only, so most positions of a packed row (system prompt, questions, the
first token of each sample) carry no label, yet the stock forward applies the lm_head to every
position. On the demo model that head (576 x 49k) is about a fifth of the CPU forward pass. Here the
model body runs as before, the hidden states are gathered where the shifted label is not -100, and
only those rows go through the head and the cross-entropy: the same loss (transformers'
ForCausalLMLoss: fp32 logits, sum / num_items_in_batch or mean), the same gradients, less work.

The GPU fast path (training.fast) plugs its chunked fused loss into the same forward
(`install_loss`); this loss is for models on the CPU.
Generation and evaluation (no labels, or not training) take the model's own forward untouched.
"""

from __future__ import annotations

import types
from typing import Any

from assistant_forge.training.base_anchor import KL_TARGET

IGNORE_INDEX = -100
# Config attributes of models that scale or cap their logits; their forward is left alone.
_LOGIT_SCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def flat_targets(hidden: Any, labels: Any | None, shift_labels: Any | None) -> tuple[Any, Any]:
    """Hidden states as (tokens, dim) and each one's target: the next token's label (-100: none)."""
    from torch.nn import functional as F

    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    return h, shift_labels.reshape(-1).to(h.device)


def labeled_cross_entropy(
    hidden: Any,
    head: Any,
    labels: Any | None = None,
    *,
    shift_labels: Any | None = None,
    num_items_in_batch: Any | None = None,
    anchor: Any = None,
) -> Any:
    """transformers' causal-LM loss of `head(hidden)`, computing logits only at labelled positions;
    plus `anchor`'s KL term (training.base_anchor) from the same logits, when given."""
    import torch
    from torch.nn import functional as F

    h, y = flat_targets(hidden, labels, shift_labels)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    logits = head(h.index_select(0, keep)).float()
    target = y.index_select(0, keep)
    if num_items_in_batch is None:
        loss = F.cross_entropy(logits, target, reduction="mean")
    else:
        loss = F.cross_entropy(logits, target, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    if anchor is None:
        return loss
    # The anchored positions are labelled ones: their rows of `logits`, no second pass through the head.
    rows = torch.searchsorted(keep, anchor.positions.to(keep.device))
    denominator = len(keep) if num_items_in_batch is None else num_items_in_batch
    return loss + anchor.term(hidden, head, denominator, labels, logits.index_select(0, rows))


def loss_only_forward(self: Any, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
    """*ForCausalLM.forward that, when training with labels, returns `self._forge_loss`'s loss of the
    body's hidden states and no logits; anything else (generation, eval) takes the model's own."""
    import torch

    orig = self._forge_plain_forward
    # train.kl_to_base: the base model's logits at the replay answers (training.base_anchor).
    anchor = kwargs.pop(KL_TARGET, None)
    if labels is None or not self.training or not torch.is_grad_enabled():
        return orig(*args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    outputs = getattr(self, self.base_model_prefix)(*args, **kwargs)
    if anchor is not None and self._forge_loss is _labeled_loss:
        loss = _labeled_loss(outputs[0], self, labels, shift_labels, num_items, anchor)
    else:
        loss = self._forge_loss(outputs[0], self, labels, shift_labels, num_items)
        if anchor is not None:
            loss = loss + anchor.term(outputs[0], self.lm_head, num_items, labels)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def install_loss(model: Any, loss: Any, *, needs_bias_free_head: bool = False) -> str | None:
    """Route a (not yet PEFT-wrapped) *ForCausalLM's training forward through
    `loss(hidden, model, labels, shift_labels, num_items_in_batch)`. Returns None, or why it cannot."""
    import torch

    head = getattr(model, "lm_head", None)
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, torch.nn.Linear) or body is None or body is model:
        return "no plain lm_head"
    if needs_bias_free_head and head.bias is not None:
        return "the lm_head has a bias"
    for attr in _LOGIT_SCALING:
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            return f"model scales logits ({attr})"
    if "_forge_plain_forward" not in model.__dict__:
        model._forge_plain_forward = model.forward
        model.forward = types.MethodType(loss_only_forward, model)
    model._forge_loss = loss
    return None


def _labeled_loss(
    hidden: Any, model: Any, labels: Any, shift_labels: Any, num_items: Any, anchor: Any = None
) -> Any:
    return labeled_cross_entropy(
        hidden, model.lm_head, labels, shift_labels=shift_labels, num_items_in_batch=num_items, anchor=anchor
    )


def patch_labeled_loss(model: Any) -> bool:
    """Give a (not yet PEFT-wrapped) *ForCausalLM the labelled-positions-only loss; False if it cannot."""
    return install_loss(model, _labeled_loss) is None
