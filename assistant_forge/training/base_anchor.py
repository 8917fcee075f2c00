"""The KL anchor to the base model (train.kl_to_base): replay answers learnt as distributions.

Replay trains on one greedy answer the base model gave to each generic prompt, a hard label per token.
The anchor adds, on the answer tokens of replay samples only, the KL divergence from the base model's
next-token distribution (the same model with the LoRA adapter off) to the trained model's, so those
prompts pull toward everything the base model would have said there, not one sampled answer. Identity
samples carry no KL: there the model is meant to move away from the base.

Per step: a pass without gradients through the adapted layers with the adapter off (LayerCapture;
a whole forward where the adapter starts at layer 0), logits only at the anchored positions, and
`weight * KL` added to the loss, summed over the positions and divided like the cross-entropy (by the
step's labelled tokens), so a weight of 1 counts an anchored token's KL as much as its cross-entropy.
On the demo (bf16, one thread) a step went from 0.57 to 0.73-0.77 s (bench/RESULTS.md, round 10).

The rows carry which tokens are replay under REPLAY (training.data: a per-sample flag, repeated over
the sample's tokens when packed); the trainer's compute_loss pops it and passes a BaseTarget to the
model's training forward under KL_TARGET (labeled_loss.loss_only_forward adds the term; the CPU loss
takes the trained logits from its own cross-entropy logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from assistant_forge.core.encoding import IGNORE

REPLAY = "forge_replay"  # per token: 1 where the token belongs to a replay sample (not a model input)
KL_TARGET = "forge_kl_target"  # the base model's logits for the training forward (not a model input)


@dataclass
class BaseTarget:
    """What the training forward needs to add the anchor: where, how much, and the base logits there
    (given, or `resume` makes them from the layers the adapter leaves alone, see LayerCapture)."""

    positions: Any  # 1-D indices into the (flat, one-row) micro-batch: the anchored positions
    weight: float
    logits: Any = None  # (positions, vocab) fp32: the base model's next-token logits there
    capture: LayerCapture | None = None

    def term(self, hidden: Any, head: Any, num_items: Any, labels: Any, logits: Any = None) -> Any:
        """weight * sum over positions of KL(base || trained), divided like the cross-entropy.
        `logits`: the trained model's at the positions, when the caller has them already."""
        import torch
        from torch.nn import functional as F

        base_logits = self.logits if self.capture is None else self.capture.base_logits(head, self.positions)
        if logits is None:
            logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.positions))
        student = F.log_softmax(logits.float(), dim=-1)
        base = F.log_softmax(base_logits, dim=-1)
        kl = F.kl_div(student, base, log_target=True, reduction="sum")
        if num_items is None:  # the cross-entropy is then a mean over the labelled tokens
            num_items = (labels[..., 1:] != IGNORE).sum()
        if torch.is_tensor(num_items):
            num_items = num_items.to(kl.device)
        return self.weight * kl / num_items

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()


class LayerCapture:
    """The base forward from the first adapted layer on. Below it (the demo adapts layers 20-29 of
    30) base and trained model compute the same hidden states, so the training forward's input to
    that layer is kept (a pre-hook) and only the layers from there, the final norm and the head run
    again with the adapter off: a third of a forward instead of a whole one."""

    def __init__(self, peft_model: Any, body: Any, first: int) -> None:
        self.peft_model, self.body, self.first = peft_model, body, first
        self.args: tuple | None = None
        self.kwargs: dict = {}
        self.handle = body.layers[first].register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.args is None:  # the forward's call, not a checkpointed layer's recompute
            self.args, self.kwargs = args, dict(kwargs)

    def base_logits(self, head: Any, positions: Any) -> Any:
        import torch

        self.close()
        args, kwargs = self.args or (), dict(self.kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        with torch.no_grad(), self.peft_model.disable_adapter():
            h = h.detach()
            for layer in self.body.layers[self.first :]:
                out = layer(h, *rest, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
            h = self.body.norm(h)
            return head(h.reshape(-1, h.shape[-1]).index_select(0, positions)).float()

    def close(self) -> None:
        self.handle.remove()


def first_adapted_layer(peft_model: Any) -> tuple[Any, int]:
    """The decoder body and the index of its first layer holding a LoRA module (0: none to skip, or
    a body this shortcut does not know: no `layers` list or final `norm`)."""
    body = peft_model.get_base_model()
    body = getattr(body, getattr(body, "base_model_prefix", ""), None)
    layers = getattr(body, "layers", None)
    if layers is None or getattr(body, "norm", None) is None:
        return body, 0
    for i, layer in enumerate(layers):
        if any(hasattr(m, "lora_A") for m in layer.modules()):
            return body, i
    return body, 0


def anchored_positions(labels: Any, replay: Any) -> Any:
    """Positions whose next token is a labelled token of a replay sample (a one-row micro-batch)."""
    from torch.nn import functional as F

    nxt = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    return ((nxt != IGNORE) & (replay != 0)).reshape(-1).nonzero().squeeze(1)


def base_target(
    model: Any, peft_model: Any, inputs: dict, replay: Any, weight: float, *, reuse_layers: bool = True
) -> BaseTarget | None:
    """The anchor for this micro-batch (None: no replay answer in it). With `reuse_layers` (and an
    adapter that leaves the first layers alone) the base logits are made during the training forward
    from its hidden states (LayerCapture; the caller closes the target), else here by a whole forward
    with the adapter off. `model` is what the Trainer calls (under its autocast); `peft_model` the
    unwrapped PEFT model."""
    import torch

    positions = anchored_positions(inputs["labels"], replay)
    if not len(positions):
        return None
    body, first = first_adapted_layer(peft_model) if reuse_layers else (None, 0)
    if first > 0:
        return BaseTarget(positions, weight, capture=LayerCapture(peft_model, body, first))
    args = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad(), peft_model.disable_adapter():
        logits = model(**args, logits_to_keep=positions).logits
    return BaseTarget(positions, weight, logits=logits.reshape(-1, logits.shape[-1]).float())
