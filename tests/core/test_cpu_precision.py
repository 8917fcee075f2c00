"""CPU precision: bf16 trains the demo model under bf16 autocast with fp32 LoRA weights; fp32 does not
autocast; "auto" follows the CPU's bf16 matrix units (AMX), fp32 without them.

A real model (the demo model's top layers) trained two steps through forge's own Trainer and arguments;
nothing here depends on this machine having AMX.
"""

from __future__ import annotations

import math

import pytest
from forge_testing import tiny_config

from assistant_forge.core.config import ForgeConfig, load_config
from assistant_forge.core.identity import generate_identity_records
from assistant_forge.training.data import FlatCollator, encode_records, pack
from assistant_forge.training.modeling import build_model, pick_dtype, resolve_precision
from assistant_forge.training.saving import ForgeTrainer
from assistant_forge.training.trainer import training_args


@pytest.mark.parametrize(("precision", "compute"), [("bf16", "bfloat16"), ("fp32", "float32")])
def test_cpu_training_autocasts_only_in_bf16(tmp_path, demo_path, torch_one_thread, precision, compute):
    torch = torch_one_thread
    cfg = load_config(tiny_config(tmp_path, max_steps=2))
    cfg.train.device, cfg.train.precision = "cpu", precision
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    records = generate_identity_records("Forgey", "Alice", langs=["en"], count=4)
    rows = pack(encode_records(tok, records, 64), 64, True, seed=0)
    # LoRA's A matrix is fp32 and PEFT casts its input to fp32: it outputs bf16 only under autocast.
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    seen: list = []
    lora_a.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    trainer = ForgeTrainer(
        model=model,
        args=training_args(tmp_path / "run", cfg, "cpu"),
        train_dataset=rows,
        data_collator=FlatCollator(),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert seen and set(seen) == {getattr(torch, compute)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_auto_precision_follows_the_cpus_bf16_units() -> None:
    import torch

    assert resolve_precision("auto", "cpu", cpu_bf16=False) == "fp32"
    assert resolve_precision("auto", "cpu", cpu_bf16=True) == "bf16"
    assert resolve_precision("fp32", "cpu", cpu_bf16=True) == "fp32"
    assert resolve_precision("bf16", "cpu", cpu_bf16=False) == "bf16"
    # "auto" keeps fp32 weights on a CPU whatever it computes in: the base model's replay answers
    # (cached and shipped by runtime) are generated in fp32 either way.
    cfg = ForgeConfig()
    assert pick_dtype(cfg, "cpu") == torch.float32
    cfg.train.precision = "bf16"
    assert pick_dtype(cfg, "cpu") == torch.bfloat16
