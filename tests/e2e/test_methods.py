"""Full fine-tuning and QLoRA (4-bit NF4 via bitsandbytes on the CPU) train for real and export what they should."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from forge_testing import forge, tiny_config

from assistant_forge.core.config import load_config
from assistant_forge.core.runs import complete_checkpoints, new_run_dir, read_jsonl, read_status

pytestmark = pytest.mark.slow


def train_in_foreground(tmp_path, method: str):
    cfg = load_config(tiny_config(tmp_path, max_steps=2, save_steps=2))
    cfg.lora.method = method
    if method == "full":
        cfg.lora.layers_from = 0
    run = new_run_dir(cfg, tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "assistant_forge.training", str(run)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert read_status(run)["state"] == "finished"
    losses = [e["loss"] for e in read_jsonl(run / "events.jsonl")]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    return run, proc.stdout


def test_full_fine_tuning_saves_whole_weights_and_convert_explains(tmp_path, demo_path):
    run, _ = train_in_foreground(tmp_path, "full")
    ckpt = complete_checkpoints(run)[-1][1]
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "adapter_config.json").exists()
    proc = forge("convert", str(run), "-o", str(tmp_path / "adapter"))
    assert proc.returncode == 2 and "already full models" in proc.stderr


def test_qlora_trains_4bit_nf4_and_exports_an_adapter(tmp_path, demo_path):
    run, log = train_in_foreground(tmp_path, "qlora")
    assert "(qlora)" in log
    proc = forge("convert", str(run), "-o", str(tmp_path / "adapter"))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "adapter" / "forge_adapter.json").read_text())
    assert meta["chat_template"] == "model"
    # The adapter loads on a 4-bit base for chat, as a user with a small GPU would run it.
    chat = forge(
        "chat",
        "demo",
        "--adapter",
        str(tmp_path / "adapter"),
        "--bits",
        "4",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "5",
    )
    assert chat.returncode == 0, chat.stderr
