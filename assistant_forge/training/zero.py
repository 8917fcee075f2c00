"""DeepSpeed ZeRO across the data-parallel processes (`train.zero_stage`, `forge train --zero`).

The processes are still started by torchrun (training.distributed); with a ZeRO stage the trainer
hands transformers' Trainer a DeepSpeed config, and DeepSpeed shards across the processes:

* stage 2: the optimizer state and the gradients of the trainable weights;
* stage 3: also the weights themselves, frozen (4-bit) base weights included.

Batch sizes, accumulation, clipping and precision are left "auto", so the Trainer fills them from
the same TrainingArguments a plain run uses: one process with grad_accum 2k takes the same steps as
2 processes with grad_accum k (tests/e2e/test_zero.py checks it on CPU processes).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# A paged optimizer pages its state out of a single GPU's memory; under ZeRO the state is sharded
# across the processes instead, and DeepSpeed steps the client optimizer on flat partitions. Their
# unpaged twins do the same update.
_UNPAGED = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_bnb_8bit"}


def shards_weights(stage: int) -> bool:
    """ZeRO-3: every process must take part in each forward (generation included), since each
    holds only a slice of every weight."""
    return stage == 3


def deepspeed_config(stage: int) -> dict[str, Any]:
    """The DeepSpeed config for TrainingArguments(deepspeed=...): "auto" wherever the Trainer's own
    arguments decide, so one set of forge settings drives both."""
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Without this a full fine-tune's checkpoint holds no weights, only DeepSpeed's shards
        # (LoRA adapters are gathered either way); `forge convert`/`forge chat` read the weights.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        # The Trainer's optimizer (train.optimizer) is stepped by DeepSpeed; allowed explicitly.
        "zero_allow_untested_optimizer": True,
        # train.log gets forge's own line per step; DeepSpeed's periodic line only repeats it.
        "steps_per_print": 2**31 - 1,
    }


def optimizer(name: str) -> str:
    """The TrainingArguments optimizer to use under ZeRO for forge's `train.optimizer`."""
    return _UNPAGED.get(name, name)


def prepare(device: str) -> None:
    """Before the Trainer starts DeepSpeed: pick its accelerator, and skip a compile it does not need.

    DeepSpeed picks its accelerator once, at its first use, by probing; DS_ACCELERATOR makes it the
    device forge trains on (a CPU run on a GPU box stays on the CPU). Its CPU accelerator talks over
    torch.distributed (gloo, already set up by training.distributed) when oneCCL is absent.
    """
    os.environ.setdefault("DS_ACCELERATOR", device)
    if device != "cpu":
        return
    # On the CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce kernel
    # when it starts (~50 s with g++, and a C++ toolchain the machine may not have). Only DeepSpeed's
    # inference all-reduce uses it, and that falls back to torch.distributed without it; training's
    # collectives go through torch.distributed either way.
    comm = importlib.import_module("deepspeed.comm.torch")  # `import a.b.torch` would bind torch
    if hasattr(comm, "build_shm_op"):
        comm.build_shm_op = _no_shm_op


def _no_shm_op() -> None:
    return None
