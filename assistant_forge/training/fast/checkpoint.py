"""The decoder layers' plan: which recompute in backward (forge's own checkpoint, inputs kept on the
device or in pinned host memory), which replay CUDA graphs (fast.graphs), and torch.compile of their
training forward. Each layer's choices sit in its LayerPlan; its forward becomes `_layer_forward`."""

from __future__ import annotations

import functools
import logging
import re
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from assistant_forge.core import memory as mem
from assistant_forge.core.config import ForgeConfig
from assistant_forge.training.fast import attention
from assistant_forge.training.fast import graphs as layer_graphs
from assistant_forge.training.fast.dequant import cache_absmax, make_dequant_rows_op
from assistant_forge.training.fast.dropout import make_dropped_grad_op
from assistant_forge.training.fast.host_embedding import offload_input_embedding
from assistant_forge.training.fast.lora import make_lora_fn, make_lora_op
from assistant_forge.training.fast.loss import make_ce_fn
from assistant_forge.training.fast.plumbing import (
    LayerPlan,
    decoder_layers,
    layer_plan,
    once,
    recomputing,
    report,
    unwrap,
    uses_rng,
)

Packed = tuple[torch.device, torch.Tensor, torch.cuda.Event]


class HostOffload:
    """saved_tensors hooks that park large CUDA tensors in pinned host memory.

    The device-to-host copy runs on a side stream (the forward keeps computing meanwhile); the
    tensor's memory is not reused until that copy is done (record_stream). The copy back is
    issued on the compute stream when backward needs it.
    """

    min_numel = 1 << 16

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor) -> torch.Tensor | Packed:
        if not t.is_cuda or t.numel() < self.min_numel:
            return t
        stream = self._stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)
        return (t.device, host, done)

    def unpack(self, packed: torch.Tensor | Packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


def make_recompute_fn() -> type[torch.autograd.Function]:
    class _Recompute(torch.autograd.Function):
        """Reentrant-style checkpoint of one decoder layer: the forward runs under no_grad (no
        autograd graph, no saved-tensor hooks: at short sequences the step is bound by the CPU
        issuing work, and torch's non-reentrant checkpoint runs Python hooks for every saved
        tensor twice); backward re-runs it with grad, under the same RNG and autocast state."""

        @staticmethod
        def forward(
            ctx: Any,
            run: Callable[..., torch.Tensor],
            offload: bool,
            rng: bool,
            anchor: torch.Tensor,
            hidden: torch.Tensor,
            *args: Any,
        ) -> torch.Tensor:
            dev = hidden.device
            ctx.run, ctx.args, ctx.dev, ctx.rng = run, args, dev, rng
            if rng:  # dropout masks must come out the same in the recompute
                ctx.cpu_rng = torch.get_rng_state()
                ctx.dev_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
            ctx.autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
            if offload:
                ctx.packed = once(HostOffload).pack(hidden.detach())
            else:
                ctx.packed = None
                ctx.save_for_backward(hidden)
            return run(hidden, *args)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            if ctx.packed is not None:
                hidden = once(HostOffload).unpack(ctx.packed)
                ctx.packed = None
            else:
                (hidden,) = ctx.saved_tensors
            hidden = hidden.detach().requires_grad_(True)
            dev = ctx.dev
            enabled, dtype = ctx.autocast
            if ctx.rng:
                with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                    torch.set_rng_state(ctx.cpu_rng)
                    if ctx.dev_rng is not None:
                        torch.cuda.set_rng_state(ctx.dev_rng, dev)
                    with (
                        torch.enable_grad(),
                        torch.autocast(dev.type, dtype=dtype, enabled=enabled),
                        recomputing(),
                    ):
                        out = ctx.run(hidden, *ctx.args)
            else:
                with (
                    torch.enable_grad(),
                    torch.autocast(dev.type, dtype=dtype, enabled=enabled),
                    recomputing(),
                ):
                    out = ctx.run(hidden, *ctx.args)
            torch.autograd.backward(out, grad)
            return (None, None, None, None, hidden.grad) + (None,) * len(ctx.args)

    return _Recompute


def _make_anchor(device: torch.device) -> torch.Tensor:
    """A grad-requiring empty tensor: makes autograd run the checkpoint's backward even when the
    layer input does not require grad (frozen embeddings), as LoRA parameters inside still do."""
    return torch.empty(0, device=device, requires_grad=True)


def _torch_checkpoint(fn: Callable[..., Any], offload: bool, *args: Any, **kwargs: Any) -> Any:
    if not offload:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    offloader = once(HostOffload)
    with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _make_checkpoint_func(offload: bool, rng: bool = True) -> Callable[..., Any]:
    """The checkpoint _layer_forward calls as f(partial(layer forward, **kw), hidden)."""
    # The reentrant-style path needs a layer that returns one tensor; the first call goes through
    # torch's checkpoint and tells us (transformers 5 decoder layers return a tensor).
    returns_tensor: list[bool] = []

    def func(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        hidden = args[0] if args else None
        if kwargs or not isinstance(hidden, torch.Tensor) or returns_tensor != [True]:
            out = _torch_checkpoint(fn, offload, *args, **kwargs)
            if not returns_tensor:
                returns_tensor.append(isinstance(out, torch.Tensor))
            return out
        anchor = once(_make_anchor, hidden.device)
        return once(make_recompute_fn).apply(fn, offload, rng, anchor, hidden, *args[1:])

    return func


def _layer_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's forward on the fast path: its own forward (compiled for training, see
    compile_layers), under forge's checkpoint when the plan recomputes this layer. transformers'
    checkpoint switch stays off: its wrapper would end up inside the compiled region."""
    plan: LayerPlan = self.__dict__["_forge_plan"]
    if not self.training or kwargs.get("past_key_values") is not None:
        # Sample answers during training: a KV cache, and shapes that change every token.
        return plan.eager(*args, **kwargs)
    run = plan.run
    if plan.checkpointed and torch.is_grad_enabled():
        if plan.graphs is not None and len(args) == 1:
            out = plan.graphs.call(run, args[0], kwargs, once(_make_anchor, args[0].device))
            if out is not None:
                return out
        return plan.checkpoint(functools.partial(run, **kwargs), *args)
    return run(*args, **kwargs)


def _own_layer_forward(layer: nn.Module) -> LayerPlan:
    """The layer's plan, made (and its forward routed through _layer_forward) on first use."""
    plan = layer_plan(layer)
    if plan is None:
        forward = layer.forward  # one bound method: compile_layers tells compiled by `run is eager`
        plan = layer.__dict__["_forge_plan"] = LayerPlan(eager=forward, run=forward)
        layer.forward = types.MethodType(_layer_forward, layer)
    layer.gradient_checkpointing = False
    return plan


_RAISED = re.compile(r"^[\w.]*(Error|Exception): ")


class CompileFailures(logging.Handler):
    """torch.compile's give-ups: under `suppress_errors` dynamo logs "WON'T CONVERT" and runs that
    code eager, several times slower, while the fast path's report still counts the layer as compiled
    (a kernel the compiled backward could not trace cost a whole 7B run its speed, session 10)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("WON'T CONVERT"):
            lines = msg.splitlines()
            # The innermost exception's own line ("RuntimeError: ..."), not dynamo's advice after it.
            raised = [line.strip() for line in lines if _RAISED.match(line.strip())]
            self.reasons.append((raised or lines)[-1][:300])


def compile_failures() -> list[str]:
    """Why torch.compile gave up, each reason once: what it logged since the last call."""
    failures = once(CompileFailures)
    reasons, failures.reasons = failures.reasons, []
    return reasons


def compile_layers(model: nn.Module, rng: bool) -> int:
    """torch.compile each decoder layer's training forward. The layers share the compiled graphs
    (the same code; parameters are graph inputs), so this costs one compile, not one per layer.
    Gains: fused norms, RoPE, SwiGLU and residual adds, and far fewer kernel launches from Python
    (at batch 1 and 2048 tokens the eager step is bound by the CPU issuing kernels)."""
    layers = decoder_layers(model)
    # Made before any trace: a compiled graph guards on what `once` has made so far, so anything made
    # later (the graphs' autograd function at their capture, the anchor at the first checkpoint)
    # would recompile every variant at the next call.
    # Custom operators too: a graph loaded from torch's compile cache (a second run) calls them by name.
    makers = (
        make_lora_fn,
        make_lora_op,
        make_dequant_rows_op,
        make_dropped_grad_op,
        make_ce_fn,
        make_recompute_fn,
        HostOffload,
    )
    for make in (*makers, layer_graphs.make_graphed_fn, attention.find_kernel):
        once(make)
    logging.getLogger("torch._dynamo.convert_frame").addHandler(once(CompileFailures))
    for device in {p.device for layer in layers for p in layer.parameters()}:
        once(_make_anchor, device)
    # Training and no-grad graphs, dropout on and off, a dynamic-length variant: a few each.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # A machine that cannot compile (no C compiler for Triton's launcher, an unsupported model
    # part) trains with the eager layers and a warning in train.log instead of failing at step 1.
    torch._dynamo.config.suppress_errors = True
    if rng:
        # Dropout draws from torch's generator as in eager mode, so a checkpointed layer's
        # recompute (same RNG state restored) draws the same masks as its forward did.
        torch._inductor.config.fallback_random = True
    for layer in layers:
        plan = _own_layer_forward(layer)
        if plan.run is plan.eager:
            plan.run = functools.partial(_without_autocast_cache, torch.compile(plan.eager))
    # The final norm runs eager between the last layer and the loss: its fp32 backward held ~20 bytes
    # per hidden element at the step's peak (0.16 GiB at 7B/2048, 0.63 GiB at 8192, traced on an H200).
    norm = final_norm(model)
    if norm is not None and "forward" not in norm.__dict__:
        norm.forward = functools.partial(_without_autocast_cache, torch.compile(norm.forward))
    return len(layers)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm between the decoder layers and the output head (`model.norm` in transformers'
    decoder-only models), None where the model has no such module."""
    norm = getattr(getattr(unwrap(model), "model", None), "norm", None)
    return norm if isinstance(norm, nn.Module) else None


def _without_autocast_cache(compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the compiled layer with autocast's weight cache off, as graph captures must run: the
    compiler guards on that switch, so calls with it on and off would compile twice as many variants
    (the cache only saves recasting fp32 weights, and the fast path's bf16 layers have none)."""
    if not torch.is_autocast_enabled("cuda") or not torch.is_autocast_cache_enabled():
        return compiled(*args, **kwargs)
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        return compiled(*args, **kwargs)


def memory_budget_bytes(cfg: ForgeConfig, device: torch.device | int | None = None) -> int:
    """train.memory_budget_gib, or (when 0) what the GPU can give this process, less a margin."""
    if cfg.train.memory_budget_gib:
        return int(cfg.train.memory_budget_gib * mem.GIB)
    if not torch.cuda.is_available():
        return 1 << 62
    free, _total = torch.cuda.mem_get_info(device)
    # Ours already allocated counts as ours; keep 10% for fragmentation and the CUDA context.
    return int((free + torch.cuda.memory_reserved(device)) * 0.9)


def configure_checkpointing(
    model: nn.Module,
    cfg: ForgeConfig,
    *,
    seq_len: int | None = None,
    budget_bytes: int | None = None,
    checkpointed_layers: int | None = None,
    offload: bool | None = None,
    optimizer_on_device: bool | None = None,
    absmax_cache: bool | None = None,
    graphs: bool | None = None,
) -> mem.MemoryEstimate | None:
    """Set which decoder layers recompute in backward (the first n), whether their inputs go to the
    host, whether a paged optimizer's state may live on the device (see fast.optimizer) and whether
    4-bit absmax is kept dequantized. Explicit arguments win; else train.checkpoint_policy decides
    (`auto` fits the budget). Returns the plan's estimate."""
    layers = decoder_layers(model)
    rep = report(model)
    if not layers:
        rep.notes.append("no decoder layers found: checkpointing left as transformers set it")
        return None
    policy = getattr(cfg.train, "checkpoint_policy", "auto") if cfg.train.gradient_checkpointing else "none"
    model_config = unwrap(model).config
    est: mem.MemoryEstimate | None = None
    rep.budget_gib = None
    if graphs is None:  # graphs replay what the compiler made, on a GPU
        graphs = mem.graphs_configured(cfg) and rep.compiled_layers > 0
        graphs = graphs and next(unwrap(model).parameters()).is_cuda
    if checkpointed_layers is None:
        # The same choice of plan the app shows (core.memory.planned_memory); only `auto` needs a budget.
        budget = 0
        if policy == "auto":
            budget = budget_bytes if budget_bytes is not None else memory_budget_bytes(cfg)
        est = mem.planned_memory(cfg, model_config, budget, seq_len=seq_len, graphs=graphs)
        checkpointed_layers = est.checkpointed_layers
        offload = est.offload if offload is None else offload  # explicit arguments win
        if policy == "auto":
            if optimizer_on_device is None:
                optimizer_on_device = est.optimizer_on_device
            if absmax_cache is None:
                absmax_cache = est.absmax_cache
            rep.budget_gib = round(budget / mem.GIB, 2)
    offload = bool(offload)
    optimizer_on_device = bool(optimizer_on_device) and cfg.train.optimizer.startswith("paged_")
    if absmax_cache is None:
        absmax_cache = policy != "offload"
    if (
        est is None
        or est.optimizer_on_device != optimizer_on_device
        or est.absmax_cache != absmax_cache
        or est.offload != offload
        or est.checkpointed_layers != checkpointed_layers
    ):
        est = mem.estimate_memory(
            cfg,
            model_config,
            seq_len=seq_len,
            checkpointed_layers=checkpointed_layers,
            offload=offload,
            optimizer_on_device=optimizer_on_device,
            absmax_cache=absmax_cache,
            # Offloaded inputs are graphed only where the budget's plan chose it.
            graphs=graphs and (not offload or (est is not None and est.graphs)),
        )
    rep.absmax_cache_gib = round(cache_absmax(model, est.absmax_cache) / mem.GIB, 3)
    if est.host_embedding and not rep.host_embedding_gib:
        rep.host_embedding_gib = round(offload_input_embedding(model) / mem.GIB, 3)
    rep.optimizer_on_device = optimizer_on_device
    rng = uses_rng(model)
    fn = _make_checkpoint_func(offload, rng)
    plans = [_own_layer_forward(layer) for layer in layers]
    # The estimate says whether graphs apply (checkpointed layers; inputs offloaded or not).
    graphed = layer_graphs.attach(layers, checkpointed_layers if est.graphs else 0, rng, offload)
    for i, plan in enumerate(plans):
        plan.checkpointed, plan.checkpoint = i < checkpointed_layers, fn
        plan.graphs = graphed[i] if i < len(graphed) else None
    rep.graphed_layers = len(graphed)
    rep.checkpointed_layers, rep.num_layers, rep.offload = checkpointed_layers, len(layers), offload
    rep.estimate_gib = round(est.total_gib, 2)
    if rep.budget_gib is not None and est.total_gib > rep.budget_gib:
        # The leanest plan runs anyway (it may still fit: the estimate is conservative), but say so.
        rep.notes.append(
            f"no plan fits the {rep.budget_gib} GiB memory budget: the leanest is estimated at "
            f"{est.total_gib:.2f} GiB"
        )
    return est


def graph_plan(model: nn.Module) -> layer_graphs.GraphPlan | None:
    """The CUDA graph plan the model's checkpointed layers share (None: no graphs)."""
    return layer_graphs.plan_of(decoder_layers(model))


def graph_pool_bytes(model: nn.Module) -> int:
    """Device memory the model's CUDA-graphed layers replay in (0 without graphs): torch's
    allocated figures do not see it while they run."""
    return layer_graphs.pool_bytes(graph_plan(model))
