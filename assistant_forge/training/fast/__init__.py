"""forge's fast training path on a CUDA GPU: fused LoRA, fused cross-entropy, compiled decoder
layers (or Liger kernels), and a gradient-checkpointing plan fitted to the memory budget.

Plugged in by `training.modeling.build_model`:

    model = apply_speedups(model, cfg)   # right after loading the base model, before PEFT
    model = wrap_for_training(model, cfg)
    model = after_peft(model, cfg)       # last: re-does what prepare_model_for_kbit_training undid

and by the trainer, which takes `training_args_overrides` and `make_optimizer` from the plan.

What each piece does, where it lives, and why it is faster than the plain transformers + PEFT +
bitsandbytes step:

* The residual stream stays in bf16 (`after_peft`, here). `prepare_model_for_kbit_training` casts
  embeddings, norms and lm_head to fp32, which makes every activation, attention (no flash kernel in
  fp32) and the lm_head matmul run in fp32; `after_peft` casts those frozen weights back.
* Fused LoRA linear (`lora.py`, dense weights from `dequant.py`): one autograd node per adapted
  projection computes `x W^T + s (x A^T) B^T` with the 4-bit weight dequantized straight into a
  bf16 matmul, adapters kept in fp32 (the optimizer's master copy) but multiplied in bf16, and the
  LoRA product added in place (`addmm_`). PEFT runs the adapter in fp32 with a dropout copy, a scale
  and an add, about as much memory traffic as the base matmul. Dropout 0 skips the mask entirely.
  Projections that read one input (q/k/v, gate/up) run as one such node over their stacked
  weights, so a layer issues 4 LoRA ops instead of 7 (measured: a few percent at 7B/2048,
  bench/RESULTS.md).
* Fused linear cross-entropy (`loss.py`): logits are made a chunk of rows at a time, and the
  gradient for the hidden states is computed in the forward pass, so the fp32 logits (tokens x
  vocab x 4 bytes, 1 GiB at 8192 x 32000) never exist at once.
* Compiled decoder layers (`checkpoint.compile_layers`, `train.compile_layers`): torch.compile fuses
  norms, RoPE, SwiGLU and residual adds and launches far fewer kernels from Python; the LoRA
  projection stays one opaque custom op (`forge::lora_linear`) so the compiler cannot keep dense
  weights alive. The final norm is compiled with them (eager, its fp32 backward was 0.6 GiB of a
  7B/8192 step's peak). Without compiling: Liger's Triton RMSNorm, RoPE and SwiGLU kernels
  (`liger.py`, when installed).
* Checkpointing only as many decoder layers as the budget needs (`checkpoint.configure_checkpointing`,
  sized by `core.memory.fit_checkpointing`), and, in the low-memory plan, keeping checkpointed
  inputs in pinned host memory, copied on a side stream so the copies overlap compute. Each
  decoder layer's part of the plan is one `LayerPlan` (`plumbing.py`).
* CUDA graphs for the checkpointed compiled layers (`graphs.py`, `train.cuda_graphs`): each layer's
  forward and its recompute + backward are captured once and replayed as one launch each, so a
  checkpointed 7B step at 2048 tokens is no longer bound by the CPU issuing kernels (measured 2.9x
  the peer against 1.6-2.9x without, depending on the machine's CPU).
* Attention over packed rows (`attention.py`, `train.varlen_attention`): flash attention's
  variable-length kernel over the samples' boundaries, where SDPA would compute the whole row's
  scores under a block-diagonal mask (no flash kernel with a mask).
* In offloaded (low-memory) plans the frozen input embedding table stays in pinned host memory and
  the GPU gathers the rows a batch needs in place (`host_embedding.py`): 0.375 GiB less at 7B.
* The optimizer (`optimizer.py`): a paged optimizer moved on-device when the plan says it fits,
  else one bitsandbytes step over a flat buffer instead of one per LoRA matrix.

Everything here is a no-op on CPU or with `train.fused_kernels = false` (unless `force=True`,
which tests/core/test_speed_path.py uses to check the math on a CPU).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from assistant_forge.core import memory as mem
from assistant_forge.core.config import ForgeConfig
from assistant_forge.training.fast import attention
from assistant_forge.training.fast.checkpoint import (
    compile_failures,
    compile_layers,
    configure_checkpointing,
    final_norm,
    graph_plan,
    graph_pool_bytes,
    memory_budget_bytes,
)
from assistant_forge.training.fast.dequant import cache_absmax, dense_weight
from assistant_forge.training.fast.liger import apply_liger, set_rms_norm_impl
from assistant_forge.training.fast.lora import lora_linear, patch_lora_layers
from assistant_forge.training.fast.loss import fused_linear_cross_entropy, patch_fused_loss
from assistant_forge.training.fast.optimizer import FlatParams, make_optimizer, training_args_overrides
from assistant_forge.training.fast.plumbing import (
    SpeedReport,
    compute_dtype,
    decoder_layers,
    report,
    unwrap,
    uses_rng,
)

__all__ = [
    "FlatParams",
    "SpeedReport",
    "after_peft",
    "apply_speedups",
    "cache_absmax",
    "compile_failures",
    "compile_layers",
    "configure_checkpointing",
    "decoder_layers",
    "dense_weight",
    "enabled",
    "final_norm",
    "fused_linear_cross_entropy",
    "graph_plan",
    "graph_pool_bytes",
    "lora_linear",
    "make_optimizer",
    "memory_budget_bytes",
    "patch_lora_layers",
    "report",
    "set_rms_norm_impl",
    "training_args_overrides",
]

log = logging.getLogger(__name__)


def enabled(model: nn.Module, cfg: ForgeConfig) -> bool:
    """The fast path applies to CUDA models with train.fused_kernels on, without ZeRO."""
    # Under DeepSpeed ZeRO the fast path would fight DeepSpeed for the same things: its flat
    # optimizer buffer (FlatParams) re-points the LoRA weights that ZeRO partitions and steps
    # itself, its checkpointing plan is fitted to one GPU holding every weight, and under ZeRO-3
    # its fused LoRA op and compiled layers would read weights that DeepSpeed has released to
    # other processes. ZeRO runs take the plain transformers + PEFT path.
    if not mem.fast_path_configured(cfg):
        return False
    try:
        return next(unwrap(model).parameters()).device.type == "cuda"
    except StopIteration:
        return False


def apply_speedups(
    model: nn.Module, cfg: ForgeConfig, *, force: bool = False, liger: bool = True
) -> nn.Module:
    """Before PEFT: Liger kernels and the fused-loss forward on the base model."""
    if not (force or enabled(model, cfg)):
        return model
    rep = report(model)
    # Compiled layers get their norms, RoPE and SwiGLU fused by the compiler; Liger's kernels
    # would only break the compiled graph.
    if liger and cfg.lora.method != "full" and not mem.compiled_layers(cfg):
        rep.liger = apply_liger(model, rep)
    rep.fused_loss = patch_fused_loss(model, rep)
    return model


def after_peft(
    model: nn.Module, cfg: ForgeConfig, *, force: bool = False, seq_len: int | None = None
) -> nn.Module:
    """After PEFT wrapping: bf16 frozen weights, fused LoRA forwards, the checkpointing plan."""
    if not (force or enabled(model, cfg)):
        return model
    rep = report(model)
    rep.recast_to_half = _recast_frozen_to_half(model)
    rep.fused_lora_modules = patch_lora_layers(model)
    if cfg.train.varlen_attention:  # before compiling: the compiled layers trace the attention it picks
        attention.enable(model, cfg.data.packing)
    if mem.compiled_layers(cfg):
        rep.compiled_layers = compile_layers(model, uses_rng(model))
    configure_checkpointing(model, cfg, seq_len=seq_len)
    log.info("forge fast path: %s", rep.as_dict())
    return model


def _recast_frozen_to_half(model: nn.Module) -> int:
    """Undo prepare_model_for_kbit_training's fp32 upcast of frozen embeddings, norms and lm_head."""
    dtype = compute_dtype(model)
    if dtype == torch.float32:
        return 0
    n = 0
    for p in unwrap(model).parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(dtype)
            n += 1
    return n
