"""CUDA graphs for the checkpointed decoder layers of forge's fast path (used by fast.checkpoint).

Why: at batch 1 and 2048 tokens a 7B QLoRA step is bound by the CPU issuing kernels (about 200 ms
of GPU work in a 310 ms step, bench/RESULTS.md): every compiled layer call evaluates ~1700 dynamo
guards, runs the AOT-autograd wrappers, launches its Triton kernels one by one from Python and
calls bitsandbytes' dequant wrapper. A checkpointed layer does the same work every step, so each
is captured once as two CUDA graphs and replayed after:

* forward: the layer under no_grad, reading its input from a static buffer and writing its output
  into the next layer's (those buffers are the checkpointed inputs: nothing else is kept);
* backward: the recompute with grad and `torch.autograd.grad` for the input and the layer's LoRA
  weights, reading the output gradient from a static buffer.

Each replay is one launch. Every graph shares one memory pool: all that lives across graphs sits
in static buffers outside it, so a graph's temporaries are free to overlap any other's and the
pool holds about one layer's workspace. Dropout masks come out the same in the recompute as in the
forward: the backward replay runs from the generator state the forward replay started at.

With the inputs offloaded (the low-memory plan), the layers' inputs rotate through three device
buffers instead of one each: each layer's input is copied to pinned host memory on a side stream
while the layer runs, and copied back into one of two backward buffers while the layer above it
runs its backward; the copies sit outside the graphs, so the graphs still replay every micro-batch.

What is graphed: one input signature per model (shapes, dtypes and the layer's non-tensor
arguments; packed training rows all have one), first seen in a step that ran the plain path
(which compiles the layer), captured the next time. Anything else (another row length, a KV cache,
a tensor argument that needs grad, moved weights) takes the plain checkpoint, as does every call
after a capture fails (noted in the speed report).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from assistant_forge.errors import one_line
from assistant_forge.training.fast.plumbing import layer_plan, once, recomputing

log = logging.getLogger(__name__)


def _signature(hidden: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """A hashable description of one layer call, or None when it cannot be graphed."""
    if not isinstance(hidden, torch.Tensor):
        return None
    leaves, spec = tree_flatten(kwargs)
    sig: list[Any] = [tuple(hidden.shape), hidden.dtype, hidden.device, str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.requires_grad or leaf.device != hidden.device:
                return None
            sig.append((tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            sig.append(leaf)
        else:  # a KV cache, a mask function: not a fixed computation
            return None
    return tuple(sig)


class GraphPlan:
    """What the graphed layers of one model share: the pool, the capture stream, the static
    buffers of the one graphed signature, and whether graphs are still on."""

    def __init__(self, num_layers: int, device: torch.device, rng: bool, offload: bool = False) -> None:
        self.num_layers = num_layers
        self.offload = offload
        self.scratch_numel = 1  # the largest graphed layer's adapter size (attach sets it)
        self.device = device
        self.rng = rng
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self.signature: tuple[Any, ...] | None = None
        self.hidden: list[torch.Tensor] = []  # layer i reads hidden[i] and its forward writes hidden[i + 1]
        self.grad: list[torch.Tensor] = []  # output gradients, two buffers used in turn
        self.scratch: torch.Tensor | None = None  # one layer's LoRA weight gradients, flat
        self.kwargs: dict[str, Any] | None = None  # static copies of the layers' tensor arguments
        self._kw_static: list[Any] = []
        self._kw_source: list[Any] = []
        self.failed: str | None = None
        self.captured = 0  # graphs made (forward and backward each count)
        # Offload: pinned host copies of the inputs, the backward's two input buffers, the copy
        # stream, and the events that say a layer's input reached the host / came back.
        self.host: list[torch.Tensor] = []
        self.bwd_in: list[torch.Tensor] = []
        self.copies = torch.cuda.Stream(device) if offload else None
        self._on_host: dict[int, torch.cuda.Event] = {}
        self._back: dict[int, torch.cuda.Event] = {}

    # -- static buffers --------------------------------------------------------------------

    def adopt(self, signature: tuple[Any, ...], hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        self.signature = signature
        ring = self.num_layers + 1 if not self.offload else min(3, self.num_layers + 1)
        bufs = [torch.empty_like(hidden, memory_format=torch.contiguous_format) for _ in range(ring)]
        self.hidden = [bufs[i % ring] for i in range(self.num_layers + 1)]
        if self.offload:
            self.host = [
                torch.empty_like(bufs[0], device="cpu", pin_memory=True) for _ in range(self.num_layers)
            ]
            self.bwd_in = [torch.empty_like(bufs[0]) for _ in range(2)]
        self.grad = [torch.empty_like(self.hidden[0]) for _ in range(2)]
        self.scratch = torch.empty(self.scratch_numel, dtype=torch.float32, device=self.device)
        leaves, spec = tree_flatten(kwargs)
        self._kw_static = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        self._kw_source = list(leaves)
        self.kwargs = tree_unflatten(self._kw_static, spec)

    def load_kwargs(self, kwargs: dict[str, Any], first: bool) -> None:
        """Copy this call's tensor arguments into the static ones: always at the first layer (a
        tensor reused across steps may have changed in place), after that only tensors other than
        the ones copied (every layer of a step normally gets the same ones)."""
        for j, leaf in enumerate(tree_leaves(kwargs)):
            if isinstance(leaf, torch.Tensor) and (first or leaf is not self._kw_source[j]):
                self._kw_static[j].copy_(leaf)
                self._kw_source[j] = leaf

    # -- offload (outside the graphs) ------------------------------------------------------

    def to_host(self, i: int) -> None:
        """Before layer i's forward replay: its input goes to the host while the layer runs, and the
        buffer the layer writes (which held layer i - 2's input) must have reached the host."""
        current = torch.cuda.current_stream(self.device)
        if i == 0:
            self._back.clear()  # a new micro-batch: nothing fetched for the last one is pending
        if (ev := self._on_host.get(i - 2)) is not None and self.hidden[i + 1] is self.hidden[i - 2]:
            current.wait_event(ev)
        self.copies.wait_stream(current)
        with torch.cuda.stream(self.copies):
            self.host[i].copy_(self.hidden[i], non_blocking=True)
            self._on_host[i] = self.copies.record_event()

    def _fetch(self, i: int) -> None:
        # After what the current stream has queued (the backward that read this buffer last).
        self.copies.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copies):
            self.bwd_in[i % 2].copy_(self.host[i], non_blocking=True)
            self._back[i] = self.copies.record_event()

    def from_host(self, i: int) -> None:
        """Before layer i's backward replay: its input back on the device (fetched now unless the
        layer above fetched it), and layer i - 1's fetched while this one runs."""
        if i not in self._back:
            self._fetch(i)
        torch.cuda.current_stream(self.device).wait_event(self._back.pop(i))
        if i > 0:
            self._fetch(i - 1)

    def disable(self, why: str) -> None:
        self.failed = why
        log.warning("CUDA graphs for the checkpointed layers are off: %s", why, exc_info=True)

    # -- capture ---------------------------------------------------------------------------

    def _warm_up(self, work: Callable[[], None]) -> None:
        """Run `work` once on the capture stream, uncaptured: libraries set up per-stream state
        (cuBLAS workspaces) on first use, and the compiler compiles for the capture's global state
        (autocast cache off), neither of which may land inside a graph."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.random.fork_rng(devices=[self.device]), torch.cuda.stream(self.stream):
            work()
        current.wait_stream(self.stream)

    def capture(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph:
        self._warm_up(work)
        rng = torch.cuda.get_rng_state(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # A recompile inside a capture would run the compiler's own GPU work into the graph:
            # fail cleanly instead (the warm-up above compiled what this call needs).
            set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
            no_recompile = set_stance("fail_on_recompile") if set_stance else contextlib.nullcontext()
            with no_recompile, torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                work()
        except Exception:
            _reset_generator(self.device, rng)
            raise
        self.captured += 1
        return graph


def _reset_generator(device: torch.device, state: torch.Tensor) -> None:
    """After a failed capture the default generator still counts offsets as inside a graph (its
    capture epilogue never ran) and refuses every later random op: give it a fresh state."""
    gen = torch.cuda.default_generators[
        device.index if device.index is not None else torch.cuda.current_device()
    ]
    try:
        gen.graphsafe_set_state(torch.Generator(device=device).graphsafe_get_state())
        gen.set_state(state)
    except Exception as e:  # noqa: BLE001 - best effort; the caller reports the capture failure
        log.warning("could not reset the CUDA generator after a failed capture: %s", e)


def _describe(e: BaseException) -> str:
    """The exception and what it was raised during (a failed capture reports a later error)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(one_line(e))
        e = e.__context__
    return " <- ".join(parts)


class LayerGraphs:
    """One checkpointed decoder layer's forward and backward graphs."""

    def __init__(self, plan: GraphPlan, index: int, layer: nn.Module) -> None:
        self.plan = plan
        self.index = index
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.fwd: torch.cuda.CUDAGraph | None = None
        self.bwd: torch.cuda.CUDAGraph | None = None
        self._ptrs: list[int] = []
        self._seen = False  # this layer ran the signature once on the plain path
        self._rng: torch.Tensor | None = None
        self._autocast: tuple[bool, torch.dtype | None] = (False, None)

    @property
    def _x(self) -> torch.Tensor:
        return self.plan.hidden[self.index]

    @property
    def _y(self) -> torch.Tensor:
        return self.plan.hidden[self.index + 1]

    @property
    def _xb(self) -> torch.Tensor:
        """The input the backward graph recomputes from: its own buffer when inputs are offloaded."""
        return self.plan.bwd_in[self.index % 2] if self.plan.offload else self._x

    @property
    def _gy(self) -> torch.Tensor:
        return self.plan.grad[(self.index + 1) % 2]

    @property
    def _gx(self) -> torch.Tensor:
        return self.plan.grad[self.index % 2]

    def _ready(self, run: Callable[..., torch.Tensor], hidden: torch.Tensor, kwargs: dict[str, Any]) -> bool:
        """Whether this call can replay graphs (capturing them now if needed)."""
        plan = self.plan
        if plan.failed is not None or not self.params:
            return False
        if any(p.dtype != torch.float32 for p in self.params):
            return False
        sig = _signature(hidden, kwargs) if hidden.device == plan.device else None
        if sig is None:
            return False
        if plan.signature is None:
            if not self._seen:  # the plain path compiles the layer for this signature first
                self._seen = True
                return False
            plan.adopt(sig, hidden, kwargs)
        elif sig != plan.signature:
            return False
        ptrs = [p.data_ptr() for p in self.params]
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        # Weights moved (an optimizer's flat buffer) or autocast changed: the graphs read old ones.
        if self.fwd is not None and (ptrs != self._ptrs or autocast != self._autocast):
            log.warning(
                "layer %d: CUDA graphs captured again (%s changed)",
                self.index,
                "weights" if ptrs != self._ptrs else "autocast",
            )
            self.fwd = self.bwd = None
        if self.fwd is not None:
            return True
        self._ptrs, self._autocast = ptrs, autocast
        self._load(hidden, kwargs)
        if plan.offload:
            # The warm-up runs write this layer's output buffer, which may still be on its way to
            # the host (layer i - 2's input); the backward's warm-up reads real data.
            torch.cuda.current_stream(plan.device).wait_stream(plan.copies)
            self._xb.copy_(self._x)
        try:
            self.fwd = plan.capture(lambda: self._forward_work(run))
            self.bwd = plan.capture(lambda: self._backward_work(run))
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to the plain path
            self.fwd = self.bwd = None
            torch.cuda.synchronize(plan.device)
            plan.disable(_describe(e))
            return False
        return True

    def _load(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if hidden.data_ptr() != self._x.data_ptr():
            self._x.copy_(hidden)
        self.plan.load_kwargs(kwargs, first=self.index == 0)

    def _autocast_ctx(self) -> torch.autocast:
        enabled, dtype = self._autocast
        return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)

    def _forward_work(self, run: Callable[..., torch.Tensor]) -> None:
        with torch.no_grad(), self._autocast_ctx():
            out = run(self._x, **self.plan.kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the layer returned {type(out).__name__}, not a tensor")
            self._y.copy_(out)

    def _backward_work(self, run: Callable[..., torch.Tensor]) -> None:
        x = self._xb.detach().requires_grad_(True)
        with torch.enable_grad(), self._autocast_ctx(), recomputing():
            out = run(x, **self.plan.kwargs)
        grads = torch.autograd.grad(out, [x, *self.params], self._gy, allow_unused=True)
        self._gx.copy_(grads[0])
        off = 0
        for p, g in zip(self.params, grads[1:]):
            view = self.plan.scratch[off : off + p.numel()]
            if g is None:
                view.zero_()
            else:
                view.copy_(g.reshape(-1))
            off += p.numel()

    # -- replay (called by _GraphedLayer) --------------------------------------------------

    def replay_forward(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        self._load(hidden, kwargs)
        if self.plan.offload:
            self.plan.to_host(self.index)
        if self.plan.rng:
            self._rng = torch.cuda.get_rng_state(self.plan.device)
        self.fwd.replay()
        return self._y.detach()

    def replay_backward(self, gy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if gy.data_ptr() != self._gy.data_ptr():
            self._gy.copy_(gy)
        if self.plan.offload:
            self.plan.from_host(self.index)
        if self.plan.rng:
            now = torch.cuda.get_rng_state(self.plan.device)
            torch.cuda.set_rng_state(self._rng, self.plan.device)
            self.bwd.replay()
            torch.cuda.set_rng_state(now, self.plan.device)
        else:
            self.bwd.replay()
        # One copy per layer: the scratch is overwritten by the next layer's replay; autograd keeps
        # (steals) these views of a fresh tensor as the weights' .grad.
        flat = self.plan.scratch[: self.numel].clone()
        grads, off = [], 0
        for p in self.params:
            grads.append(flat[off : off + p.numel()].view_as(p))
            off += p.numel()
        return self._gx.detach(), grads

    def call(
        self,
        run: Callable[..., torch.Tensor],
        hidden: torch.Tensor,
        kwargs: dict[str, Any],
        anchor: torch.Tensor,
    ) -> torch.Tensor | None:
        """The layer's output through its graphs, or None for the plain path."""
        if not self._ready(run, hidden, kwargs):
            return None
        return once(make_graphed_fn).apply(self, kwargs, anchor, hidden, *self.params)


def make_graphed_fn() -> type[torch.autograd.Function]:
    class _GraphedLayer(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any,
            lg: LayerGraphs,
            kwargs: dict[str, Any],
            anchor: torch.Tensor,
            hidden: torch.Tensor,
            *params: torch.Tensor,
        ) -> torch.Tensor:
            ctx.lg = lg
            return lg.replay_forward(hidden, kwargs)

        @staticmethod
        def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            gx, grads = ctx.lg.replay_backward(gy)
            return (None, None, None, gx, *grads)

    return _GraphedLayer


def attach(layers: list[nn.Module], checkpointed: int, rng: bool, offload: bool = False) -> list[LayerGraphs]:
    """Graphs for the first `checkpointed` layers, sharing a fresh plan (their inputs offloaded to the
    host with `offload`). Layers on a CPU (or a machine without CUDA) get none."""
    if not checkpointed or not torch.cuda.is_available():
        return []
    try:
        device = next(p for p in layers[0].parameters()).device
    except StopIteration:
        return []
    if device.type != "cuda":
        return []
    plan = GraphPlan(len(layers), device, rng, offload)
    graphs = [LayerGraphs(plan, i, layer) for i, layer in enumerate(layers[:checkpointed])]
    plan.scratch_numel = max([plan.scratch_numel, *(g.numel for g in graphs)])
    return graphs


def plan_of(layers: list[nn.Module]) -> GraphPlan | None:
    """The graph plan the layers share (None: no layer replays graphs)."""
    lp = layer_plan(layers[0]) if layers else None
    return lp.graphs.plan if lp is not None and lp.graphs is not None else None


def pool_bytes(plan: GraphPlan | None) -> int:
    """Device memory the graphs' private pool holds (not in torch's allocated figures while the
    graphs replay: count it on top of max_memory_allocated)."""
    if plan is None:
        return 0
    pool = tuple(plan.pool)
    segs = torch.cuda.memory._snapshot(plan.device).get("segments", [])
    return sum(s["total_size"] for s in segs if tuple(s.get("segment_pool_id", ())) == pool)
