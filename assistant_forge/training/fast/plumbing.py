"""What every part of the fast path shares: the one cache of made-once objects, the model's parts
(the model inside PEFT, its decoder layers), the SpeedReport, and the per-layer plan."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

if TYPE_CHECKING:
    from assistant_forge.training.fast.graphs import LayerGraphs
    from assistant_forge.training.fast.optimizer import FlatParams

T = TypeVar("T")

_MADE: dict[Any, Any] = {}


def once(make: Callable[..., T], key: Any = None) -> T:
    """make() on the first call (per key), the same object after. A plain dict rather than
    functools.cache: torch.compile traces a dict lookup, but would re-run the factory inside a
    compiled layer."""
    k = make if key is None else (make, key)
    made = _MADE.get(k)
    if made is None:
        made = _MADE[k] = make() if key is None else make(key)
    return made


# FORGE_DISCARD_RECOMPUTED_OUTPUT=1: a checkpointed layer's recompute skips the products whose output
# only feeds the layer's output (fast.lora). Off until a GPU run has measured it.
DISCARD_RECOMPUTED_OUTPUT = os.environ.get("FORGE_DISCARD_RECOMPUTED_OUTPUT", "0") != "0"


class _Recompute:
    """Whether a checkpointed layer is being recomputed for its backward right now. Its output's
    value is then never read (only the gradient given for it flows back), so a projection whose
    output goes straight into the residual add (the MLP's down projection in Llama-style layers)
    need not be computed, only its backward. Read while tracing: the compiler keeps one variant
    for the recompute and one for the forward."""

    def __init__(self) -> None:
        # An instance attribute from the start: the compiler guards on where it finds it.
        self.active = False


RECOMPUTE = _Recompute()


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the layer call inside as a recompute whose output is not read (see _Recompute)."""
    before, RECOMPUTE.active = RECOMPUTE.active, DISCARD_RECOMPUTED_OUTPUT
    try:
        yield
    finally:
        RECOMPUTE.active = before


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks (transformers' GradientCheckpointingLayer instances)."""
    return [m for m in unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def uses_rng(model: nn.Module) -> bool:
    """Whether a forward in training mode draws random numbers (a dropout with p > 0)."""
    cfg = getattr(unwrap(model), "config", None)
    if getattr(cfg, "attention_dropout", 0) or getattr(cfg, "hidden_dropout", 0):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its 4-bit weights' compute dtype, else its embeddings'
    (bf16 on a GPU where they were upcast to fp32)."""
    for m in unwrap(model).modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            return qs.dtype
    emb = unwrap(model).get_input_embeddings()
    dtype = emb.weight.dtype if emb is not None else torch.float32
    return torch.bfloat16 if dtype == torch.float32 and torch.cuda.is_available() else dtype


@dataclass
class SpeedReport:
    """What the fast path changed on a model (kept on the model as `_forge_speed`)."""

    liger: list[str] = field(default_factory=list)
    fused_loss: bool = False
    fused_lora_modules: int = 0
    compiled_layers: int = 0
    graphed_layers: int = 0  # checkpointed layers replaying CUDA graphs (fast.graphs)
    varlen_attention: bool = False  # packed samples attend through flash's varlen kernel (fast.attention)
    recast_to_half: int = 0
    checkpointed_layers: int = 0
    num_layers: int = 0
    offload: bool = False
    optimizer_on_device: bool = False
    absmax_cache_gib: float = 0.0
    host_embedding_gib: float = 0.0  # input embedding table moved to pinned host memory (offloaded plans)
    estimate_gib: float | None = None
    budget_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The optimizer's flat buffer (fast.optimizer.FlatParams), made once; not a field, so
        # as_dict leaves it out.
        self._flat: FlatParams | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(model: nn.Module) -> SpeedReport:
    """The SpeedReport of `model` (a fresh one if the fast path has not touched it)."""
    base = unwrap(model)
    rep = base.__dict__.get("_forge_speed")
    if rep is None:
        rep = base._forge_speed = SpeedReport()
    return rep


@dataclass(eq=False)
class LayerPlan:
    """What the fast path decided for one decoder layer, kept on it as `_forge_plan` (the one
    attribute forge sets on a decoder layer besides its `forward`)."""

    eager: Callable[..., Any]  # the layer's own forward
    run: Callable[..., Any]  # what a training forward calls: `eager`, or its torch.compile
    checkpointed: bool = False  # recomputed in backward
    checkpoint: Callable[..., Any] | None = None  # how: f(partial(run, **kw), hidden)
    graphs: LayerGraphs | None = None  # CUDA graphs replaying the checkpointed call


def layer_plan(layer: nn.Module) -> LayerPlan | None:
    return layer.__dict__.get("_forge_plan")
