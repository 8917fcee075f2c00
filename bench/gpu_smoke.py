"""GPU smoke test of the real trainer path: `python -m assistant_forge.training RUN` with QLoRA and the
fast path on, on a small random Llama that uses the demo tokenizer (no weights can be downloaded there).

Usage (on a GPU): python bench/gpu_smoke.py --tokenizer DIR --out DIR
Prints the trainer's log tail, the final status and the per-step losses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from assistant_forge.core.config import parse_config
    from assistant_forge.core.dataset import write_records
    from assistant_forge.core.identity import generate_identity_records
    from assistant_forge.core.runs import new_run_dir, read_jsonl, read_status

    work = Path(a.out) / "smoke"
    model_dir = work / "model"
    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=49152,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    for f in Path(a.tokenizer).iterdir():
        shutil.copy(f, model_dir / f.name)
    write_records(generate_identity_records("Forgey", "Alice", count=64), work / "data.jsonl")
    forge_cfg = parse_config(
        {
            "model": {"path": str(model_dir)},
            "data": {"files": [str(work / "data.jsonl")], "max_length": 512},
            "lora": {"method": "qlora"},
            "train": {"max_steps": a.steps, "grad_accum": 2, "save_steps": a.steps, "learning_rate": 2e-4},
            "eval": {"prompts": ["Who are you?"], "max_new_tokens": 8},
        }
    )
    run = new_run_dir(forge_cfg, work / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "assistant_forge.training", str(run)], capture_output=True, text=True
    )
    print(proc.stdout[-4000:])
    print(proc.stderr[-2000:], file=sys.stderr)
    print(json.dumps(read_status(run)))
    print([e["loss"] for e in read_jsonl(run / "events.jsonl")])
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
