"""GPU memory estimate for one training step, and the checkpointing plan that fits a budget.

Pure arithmetic (no torch import): the app's Config screen shows `planned_memory` as you edit, and
`assistant_forge.training.fast` uses it to decide how many decoder layers to checkpoint.

The numbers model forge's own fast path (bf16 residual stream, fused LoRA, chunked fused
cross-entropy, Liger RMSNorm/RoPE/SwiGLU) and, with `fused=False`, the plain transformers + PEFT
path. They estimate torch's *peak allocated* memory (`torch.cuda.max_memory_allocated`, plus the
private pool of CUDA-graphed layers, which that figure does not see while graphs replay); the
CUDA context (~0.5 GiB) and allocator slack come on top of that in `nvidia-smi`. Constants were
checked against measured peaks on an H200 (bench/gpu_notes.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from assistant_forge.core.config import ForgeConfig

GIB = 1024**3
BF16 = 2
FP32 = 4
# Bytes per weight of a bitsandbytes 4-bit linear: packed 4-bit codes, one absmax per block of 64,
# and with double quantization that absmax is itself 8-bit with an fp32 scale per 256 blocks.
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
# Optimizer state bytes per trainable parameter; paged states live in CUDA unified memory, which
# torch's allocator does not count and which spills to the host under pressure.
OPTIMIZER_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2}
FUSED_CE_ROWS_X_VOCAB = 1 << 23  # rows of a fused cross-entropy chunk times vocab (fast/loss.py uses it)
# FORGE_GRAPHED_OFFLOAD=0 keeps `auto` from picking the graphed offload plan (fit_checkpointing): 7B/2048
# at 6.24 GiB ran 3.38x the peer (bench/RESULTS.md, session 11), the ungraphed offload 1.65x at 5.63.
GRAPHED_OFFLOAD = os.environ.get("FORGE_GRAPHED_OFFLOAD", "1") != "0"
OVERHEAD = int(0.15 * GIB)  # cuBLAS workspaces, RoPE tables, masks, small tensors
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# Sibling projections that read one input: the fast path runs each adapted set as one fused op
# (training/fast/lora.py), its weights dequantized into one block.
SIBLING_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# The model shapes the estimate was checked against on an H200 (bench/gpu_train.py builds them with
# random weights; tests/core/test_memory.py keeps the measured peaks as a regression).
REFERENCE_SHAPES: dict[str, dict[str, Any]] = {
    # Llama-2-7B, exactly what the peer baseline builds.
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    # Qwen2.5-1.5B's dimensions in Llama form: GQA, tied embeddings, 152k vocab.
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """The handful of numbers of a decoder-only transformer that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one decoder layer."""
        d, f = self.hidden, self.intermediate
        return {
            "q_proj": (d, self.q_dim),
            "k_proj": (d, self.kv_dim),
            "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def total_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * self.linear_params_per_layer() + self.embedding_params() + norms


def model_shape(model_config: dict[str, Any] | Any) -> ModelShape:
    """Read a transformers config (object or dict) into a ModelShape."""

    def get(key: str, default: Any = None) -> Any:
        if isinstance(model_config, dict):
            return model_config.get(key, default)
        return getattr(model_config, key, default)

    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    return ModelShape(
        hidden=hidden,
        intermediate=int(get("intermediate_size")),
        layers=int(get("num_hidden_layers")),
        heads=heads,
        kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or hidden // heads),
        vocab=int(get("vocab_size")),
        tied=bool(get("tie_word_embeddings", False)),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device memory of one training step, in bytes, by what holds it."""

    weights: int  # frozen base weights (4-bit or bf16 linears, bf16 embeddings and norms)
    trainable: int  # trainable parameters (LoRA adapters in fp32, or the whole model)
    gradients: int
    optimizer: int  # optimizer state counted on the device
    checkpoint_inputs: int  # the input kept for each checkpointed layer (0 when offloaded to the host)
    saved_activations: int  # everything kept by the layers that are not checkpointed
    layer_workspace: int  # one layer's recomputed activations and backward temporaries
    loss: int  # logits / fused cross-entropy working set
    overhead: int
    optimizer_paged: int  # paged optimizer state (unified memory: not in the total)
    seq_len: int
    num_layers: int
    checkpointed_layers: int
    offload: bool
    per_layer_activations: int  # what one non-checkpointed layer keeps
    optimizer_on_device: bool = False  # paged optimizer replaced by a fused on-device one
    absmax_cache: bool = False  # 4-bit absmax kept dequantized (counted in weights)
    zero_stage: int = 0  # DeepSpeed ZeRO stage; the estimate is then per process
    processes: int = 1
    # Checkpointed layers replay CUDA graphs (training.fast.graphs): their inputs and two gradient
    # buffers are static (in graph_buffers, never freed), and the graphs' private pool holds one
    # layer's workspace for good, beside the loss's.
    graphs: bool = False
    graph_buffers: int = 0
    # Offloaded plans keep a frozen, untied input embedding table in pinned host memory, read in
    # place (training.fast.host_embedding): not in `weights`.
    host_embedding: bool = False

    @property
    def static(self) -> int:
        return self.weights + self.trainable + self.optimizer + self.overhead + self.graph_buffers

    @property
    def total(self) -> int:
        if self.graphs:
            held, work = self.gradients + self.checkpoint_inputs, self.layer_workspace + self.loss
        else:
            # Backward frees checkpointed inputs as it allocates adapter gradients, layer by layer
            # (both about the same size per layer): their sum stays near the larger of the two.
            held, work = max(self.gradients, self.checkpoint_inputs), max(self.layer_workspace, self.loss)
        backward = self.static + held + self.saved_activations + work
        # A paged optimizer stepping one flat buffer (fast.optimizer.FlatParams) gathers a second copy of the
        # gradients at step time, once activations are gone (a graph pool stays).
        pool = self.layer_workspace if self.graphs else 0
        flat_step = (
            self.static + 2 * self.gradients + pool if self.optimizer_paged and not self.offload else 0
        )
        return max(backward, flat_step)

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def breakdown_gib(self) -> dict[str, float]:
        skip = {
            "seq_len",
            "num_layers",
            "checkpointed_layers",
            "offload",
            "optimizer_on_device",
            "absmax_cache",
            "zero_stage",
            "processes",
            "graphs",
            "host_embedding",
        }
        out = {f.name: round(getattr(self, f.name) / GIB, 3) for f in fields(self) if f.name not in skip}
        out["total"] = round(self.total_gib, 3)
        return out

    def summary(self) -> str:
        plan = f"{self.checkpointed_layers}/{self.num_layers} layers checkpointed" + (
            ", inputs offloaded to host" if self.offload else ""
        )
        if self.graphs:
            plan += ", replayed as CUDA graphs"
        if self.host_embedding:
            plan += ", input embedding on the host"
        if self.zero_stage:
            plan += f", per process of {self.processes} under ZeRO-{self.zero_stage}"
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.breakdown_gib().items() if v and k != "total")
        return f"~{self.total_gib:.2f} GiB peak at {self.seq_len} tokens ({plan}): {parts}"


def _targets(cfg: ForgeConfig) -> set[str]:
    targets = set(cfg.lora.target_modules)
    if targets & {"all-linear", "all_linear"}:
        targets = set(ATTN_TARGETS + MLP_TARGETS)
    return targets


def _widest_dense(cfg: ForgeConfig, shape: ModelShape, fused: bool) -> int:
    """Elements of the largest dense weight a backward step dequantizes at once: one projection,
    or on the fast path a set of adapted sibling projections (run as one op, one weight block)."""
    shapes = shape.linear_shapes()
    widest = max(i * o for i, o in shapes.values())
    if fused:
        targets = _targets(cfg)
        for names in SIBLING_PROJECTIONS:
            group = [shapes[n] for n in names if n in targets]
            if len(group) > 1:
                widest = max(widest, sum(i * o for i, o in group))
    return widest


def _lora_params(cfg: ForgeConfig, shape: ModelShape) -> int:
    targets = _targets(cfg)
    per_layer = sum(cfg.lora.r * (i + o) for n, (i, o) in shape.linear_shapes().items() if n in targets)
    adapted_layers = max(0, shape.layers - cfg.lora.layers_from)
    return per_layer * adapted_layers


def _layer_activations(shape: ModelShape, tokens: int, fused: bool, dropout: float, eager: bool) -> int:
    """Bytes one decoder layer keeps for backward when it is not checkpointed (its input excluded)."""
    d, f, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    if fused:
        # norm1 out, rotated q and k, v, attention out, h + attn / norm2 out, gate, up and
        # silu(gate)*up; fitted to peaks measured on an H200 (bench/gpu_notes.md).
        elems = 2.5 * d + 2 * q + 2 * kv + 3 * f
    else:
        # HF RMSNorm keeps fp32 copies (counted as 2 bf16 each), PEFT keeps dropout outputs, SiLU keeps
        # its input and output separately.
        elems = 3 * d + 3 * q + 2 * kv + 4 * f + 2 * 2 * 2 * d
        if dropout > 0:
            elems += 5 * d + q + f  # dropout outputs of the LoRA inputs
    total = elems * BF16 * tokens
    if dropout > 0:
        total += (5 * d + q + f) * tokens  # one bool mask per LoRA input
    if eager:
        total += shape.heads * tokens * tokens * BF16 * 2  # attention probabilities and their grad
    return int(total)


def estimate_memory(
    cfg: ForgeConfig,
    model_config: dict[str, Any] | Any,
    *,
    seq_len: int | None = None,
    checkpointed_layers: int | None = None,
    offload: bool | None = None,
    fused: bool | None = None,
    optimizer_on_device: bool = False,
    absmax_cache: bool | None = None,
    graphs: bool | None = None,
) -> MemoryEstimate:
    """Peak device memory of one training step of `cfg` on the model `model_config` describes.

    seq_len: tokens per micro-batch (default: data.max_length x train.micro_batch_size, as packing
    fills each row). checkpointed_layers / offload: the plan (default: what cfg asks for, with
    `auto` meaning every layer). fused: forge's fast path (default: train.fused_kernels). graphs:
    checkpointed layers replay CUDA graphs (default: train.cuda_graphs with compiled layers, and
    not with offload unless asked: the graphed offload plan is one `auto` picks, fit_checkpointing).
    """
    shape = model_shape(model_config)
    t = cfg.train
    tokens = seq_len or cfg.data.max_length * t.micro_batch_size
    stage = getattr(t, "zero_stage", 0)
    procs = max(1, getattr(t, "processes", 1)) if stage else 1
    fused = fast_path_configured(cfg) if fused is None else fused and not stage
    policy = getattr(t, "checkpoint_policy", "auto")
    if checkpointed_layers is None:
        checkpointed_layers = shape.layers if t.gradient_checkpointing and policy != "none" else 0
    checkpointed_layers = max(0, min(shape.layers, checkpointed_layers))
    if offload is None:
        offload = policy == "offload"

    linear = shape.layers * shape.linear_params_per_layer()
    other = shape.total_params() - linear
    method = cfg.lora.method
    opt_bytes = OPTIMIZER_BYTES.get(t.optimizer, 8)
    per_weight = BF16
    if method == "full":
        weights = 0
        trainable = shape.total_params() * BF16
        gradients = trainable
        n_trainable = shape.total_params()
    else:
        per_weight = NF4_BYTES[cfg.lora.double_quant] if method == "qlora" else BF16
        weights = int(linear * per_weight + other * BF16)
        n_trainable = _lora_params(cfg, shape)
        trainable = n_trainable * FP32
        gradients = trainable
    opt_state = n_trainable * opt_bytes
    # ZeRO runs a paged optimizer unpaged (training.zero.optimizer) and shards its state and the
    # gradients across the processes from stage 2, the frozen weights too at stage 3 (each process
    # then gathers one layer's weights at a time). DeepSpeed's communication buckets are not counted.
    paged = t.optimizer.startswith("paged_") and not optimizer_on_device and not stage
    if stage >= 2:
        opt_state //= procs
        gradients //= procs
    if stage == 3:  # each process keeps its share, plus the one layer it has gathered
        one_layer = int(shape.linear_params_per_layer() * per_weight)
        trainable //= procs
        if method == "full":
            trainable += one_layer
        else:
            weights = weights // procs + one_layer
    host_embedding = offload and fused and method != "full" and not shape.tied
    if host_embedding:
        weights -= shape.vocab * shape.hidden * BF16
    dropout = cfg.lora.dropout if method != "full" else 0.0
    eager = cfg.model.attn_implementation == "eager"

    per_layer = _layer_activations(shape, tokens, fused, dropout, eager)
    d_in = tokens * shape.hidden * BF16
    if graphs is None:
        graphs = graphs_configured(cfg, fused) and not offload
    graphs = graphs and checkpointed_layers > 0
    # Graphed layers keep their inputs in static buffers (graph_buffers below).
    ckpt_inputs = 0 if offload or graphs else checkpointed_layers * d_in
    # Graphs: every layer's input buffer (the last layer's output too; offloaded, three used in turn
    # and two the backward reads), two output-gradient buffers and one layer's adapter gradients
    # (fp32), allocated once.
    inputs = 5 if offload else shape.layers + 1
    graph_buffers = (inputs + 2) * d_in + _lora_params(cfg, shape) // shape.layers * FP32 if graphs else 0
    saved = (shape.layers - checkpointed_layers) * (per_layer + d_in)
    # Backward of one layer: gradient buffers of its widest activations, a dequantized weight, and
    # (when checkpointed) its recomputed activations.
    widest = _widest_dense(cfg, shape, fused)
    bwd_temp = tokens * (shape.intermediate + 2 * shape.hidden) * BF16
    bwd_temp += (widest * BF16) if method == "qlora" else 0
    if not fused:
        bwd_temp *= 2
    workspace = bwd_temp + (per_layer + (d_in if offload and not graphs else 0) if checkpointed_layers else 0)
    if absmax_cache is None:  # the fast path keeps it except in the low-memory (offload) policy
        absmax_cache = policy != "offload"
    # Compiled layers dequantize the double-quantized absmax inside the graph: no cache needed.
    absmax_cache = absmax_cache and fused and method == "qlora" and cfg.lora.double_quant
    absmax_cache = absmax_cache and not compiled_layers(cfg, fused)
    absmax = int(linear * 4 / 64) if absmax_cache else 0
    if fused:
        rows = max(1, min(tokens, FUSED_CE_ROWS_X_VOCAB // shape.vocab))
        loss = rows * shape.vocab * (BF16 + FP32 + FP32) + 2 * d_in
    else:
        loss = tokens * shape.vocab * (BF16 + FP32 + FP32 + BF16)
    return MemoryEstimate(
        weights=weights + absmax,
        trainable=trainable,
        gradients=gradients,
        optimizer=0 if paged else opt_state,
        checkpoint_inputs=ckpt_inputs,
        saved_activations=saved,
        layer_workspace=workspace,
        loss=loss,
        overhead=OVERHEAD,
        optimizer_paged=opt_state if paged else 0,
        seq_len=tokens,
        num_layers=shape.layers,
        checkpointed_layers=checkpointed_layers,
        offload=offload,
        per_layer_activations=per_layer + d_in,
        optimizer_on_device=optimizer_on_device and t.optimizer.startswith("paged_"),
        absmax_cache=absmax_cache,
        zero_stage=stage,
        processes=procs,
        graphs=graphs,
        graph_buffers=graph_buffers,
        host_embedding=host_embedding,
    )


def fast_path_configured(cfg: ForgeConfig) -> bool:
    """Whether the config lets forge's GPU fast path run (training.fast.enabled adds: on CUDA).

    Under DeepSpeed ZeRO it is off: DeepSpeed partitions and steps the weights the fast path reworks.
    """
    return bool(getattr(cfg.train, "fused_kernels", True)) and not getattr(cfg.train, "zero_stage", 0)


def compiled_layers(cfg: ForgeConfig, fused: bool | None = None) -> bool:
    """Whether the fast path compiles the decoder layers (training.fast.compile_layers)."""
    fused = fast_path_configured(cfg) if fused is None else fused
    return bool(fused and cfg.lora.method != "full" and getattr(cfg.train, "compile_layers", True))


def graphs_configured(cfg: ForgeConfig, fused: bool | None = None) -> bool:
    """Whether the config has checkpointed layers replay CUDA graphs (training.fast.graphs): with
    compiled layers and train.cuda_graphs on (on a GPU; the estimate assumes one)."""
    return bool(getattr(cfg.train, "cuda_graphs", True)) and compiled_layers(cfg, fused)


def fit_checkpointing(
    cfg: ForgeConfig,
    model_config: dict[str, Any] | Any,
    budget_bytes: int,
    *,
    seq_len: int | None = None,
    fused: bool | None = None,
    margin: float = 0.97,
    graphs: bool | None = None,
    graphed_offload: bool | None = None,
) -> MemoryEstimate:
    """The fastest plan whose estimate fits `margin * budget_bytes`.

    With CUDA graphs (`graphs`, default: train.cuda_graphs with compiled layers) first: optimizer on
    the device, then paged, each with the fewest checkpointed layers (graphed) that fit; a
    graphed 7B/2048 step at 32/32 ran 2.9x the peer against 1.6-1.8x without (bench/RESULTS.md).
    Then every layer graphed with its input offloaded to the host (optimizer on the device, then
    paged). Then, or without graphs, these tiers, fastest first (measured on an H200, bench/gpu_notes.md:
    at batch 1 x 2048 tokens a 7B step is bound by the CPU issuing kernels, so what removes
    launches beats what removes FLOPs):
    1. optimizer state on the device (one fused AdamW kernel instead of bitsandbytes' per-tensor
       paged step) and dequantized absmax, with the fewest checkpointed layers (each one skipped
       saves that layer's recompute);
    2. the same with every layer checkpointed and its input kept on the host;
    3. paged optimizer, dequantized absmax, fewest checkpointed layers;
    4. the low-memory plan: paged optimizer, no absmax cache, inputs on the host.
    """
    layers = model_shape(model_config).layers
    budget = int(budget_bytes * margin)
    fused = fast_path_configured(cfg) if fused is None else fused

    if graphs is None:
        graphs = graphs_configured(cfg, fused)

    def est(n: int, off: bool, dev_opt: bool, absmax: bool = True, graphed: bool = False) -> MemoryEstimate:
        return estimate_memory(
            cfg,
            model_config,
            seq_len=seq_len,
            checkpointed_layers=n,
            offload=off,
            fused=fused,
            optimizer_on_device=dev_opt,
            absmax_cache=absmax,
            graphs=graphed,
        )

    def fewest(dev_opt: bool, graphed: bool = False) -> MemoryEstimate | None:
        if est(layers, False, dev_opt, graphed=graphed).total > budget:
            return None
        lo, hi = 0, layers  # memory falls as n grows: bisect for the smallest n that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if est(mid, False, dev_opt, graphed=graphed).total <= budget:
                hi = mid
            else:
                lo = mid + 1
        return est(lo, False, dev_opt, graphed=graphed)

    can_move_opt = fused and cfg.train.optimizer.startswith("paged_")
    optimizer_places = (True, False) if can_move_opt else (False,)  # on the device first
    if graphs:
        for dev_opt in optimizer_places:
            if (plan := fewest(dev_opt, graphed=True)) is not None:
                return plan
        # Every layer graphed with its input on the host: copies beside the replays, not instead.
        if GRAPHED_OFFLOAD if graphed_offload is None else graphed_offload:
            for dev_opt in optimizer_places:
                if (plan := est(layers, True, dev_opt, graphed=True)).total <= budget:
                    return plan
    if can_move_opt and (plan := fewest(True)) is not None:
        return plan
    if can_move_opt and (plan := est(layers, True, True)).total <= budget:
        return plan
    if (plan := fewest(False)) is not None:
        return plan
    return est(layers, True, False, absmax=False)


def planned_memory(
    cfg: ForgeConfig,
    model_config: dict[str, Any] | Any,
    budget_bytes: int,
    *,
    seq_len: int | None = None,
    graphs: bool | None = None,
) -> MemoryEstimate:
    """The plan the trainer runs for `cfg`, with its estimate: train.checkpoint_policy `none`, `all` or
    `offload` as named, `auto` the fastest plan that fits `budget_bytes` (fit_checkpointing)."""
    policy = getattr(cfg.train, "checkpoint_policy", "auto") if cfg.train.gradient_checkpointing else "none"
    if policy == "auto":
        return fit_checkpointing(cfg, model_config, budget_bytes, seq_len=seq_len, graphs=graphs)
    layers = 0 if policy == "none" else model_shape(model_config).layers
    return estimate_memory(
        cfg,
        model_config,
        seq_len=seq_len,
        checkpointed_layers=layers,
        offload=policy == "offload",
        graphs=graphs if policy != "offload" else False,  # asked for offload: the leanest plan
    )
