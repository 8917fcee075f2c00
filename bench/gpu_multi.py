"""Multi-GPU scaling of the real trainer: `forge train --gpus 2 --zero 2` against one GPU with the same
global batch (1 process x 2 accumulated rows), through the CLI, on a random-weight Llama that uses the
demo tokenizer (no weights can be downloaded on the device machine).

    PYTHONPATH=$PWD python3 bench/gpu_multi.py --tokenizer .gpu_smoke --out $OUT [--steps 24]

Runs, in this order: `one` (1 GPU, the plain transformers + PEFT path that ZeRO runs take), `zero2`
(2 GPUs, ZeRO-2), then `fast` (1 GPU, forge's fast path, for reference). Each is QLoRA r 64 on all
projections, packed rows of --seq tokens. Prints per-run median tokens/s over the steps after the
first 4, the ratio to `one`, peak memory per GPU (events.jsonl) and the largest loss difference
per step against `one`; writes $OUT/gpu_multi.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def forge_config(work: Path, model: Path, seq: int, steps: int, *, accum: int, fused: bool) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {"files": [str(work / "data.jsonl")], "max_length": seq, "packing": True},
        "lora": {"method": "qlora", "r": 64, "alpha": 16, "dropout": 0.0},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 1,
            "grad_accum": accum,
            "save_steps": steps,
            "learning_rate": 2e-4,
            "lr_scheduler": "constant",
            "fused_kernels": fused,
        },
        "eval": {"prompts": [], "sample_every": 0},
    }


def run(work: Path, out: Path, name: str, raw: dict, extra: list[str]) -> dict:
    from assistant_forge.core.config import parse_config, save_config
    from assistant_forge.core.runs import read_jsonl, read_status

    cfg_path = work / f"{name}.toml"
    save_config(parse_config(raw), cfg_path)
    run_dir = work / name
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "assistant_forge", "train", str(cfg_path), "--run-dir", str(run_dir), *extra],
        capture_output=True,
        text=True,
        timeout=400,
    )
    wall = time.time() - t0
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    (out / f"{name}.out").write_text(proc.stdout + "\n" + proc.stderr + "\n" + log)
    events = read_jsonl(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
    rec = {
        "run": name,
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "state": read_status(run_dir).get("state"),
        # What the fast path did (its report names graphed_layers) and any graph fallback.
        "notes": [ln[:400] for ln in log.splitlines() if "graph" in ln.lower()][:4],
    }
    if proc.returncode != 0 or not events:
        rec["error"] = (proc.stderr or proc.stdout)[-1500:]
        return rec
    tps = [e["tokens_per_s"] for e in events[4:]] or [e["tokens_per_s"] for e in events]
    rec.update(
        tokens_per_s=round(statistics.median(tps), 1),
        mem_gib=max(e.get("mem_gib") or 0 for e in events),
        losses={e["step"]: e["loss"] for e in events},
    )
    return rec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/forge_multi")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--runs", default="one,zero2,fast", help="also: ckpt-graphs, ckpt-plain")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the plumbing on a CPU")
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from assistant_forge.core.dataset import write_records
    from assistant_forge.core.identity import generate_identity_records

    # The model and runs stay out of --out (only logs and the table come back from the device).
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    # ~1B parameters: enough GPU work per step that the all-reduce is not the whole story.
    dims = (2048, 5632, 16) if not a.tiny else (128, 256, 2)
    cfg = LlamaConfig(
        hidden_size=dims[0],
        intermediate_size=dims[1],
        num_hidden_layers=dims[2],
        num_attention_heads=16 if not a.tiny else 4,
        num_key_value_heads=16 if not a.tiny else 4,
        vocab_size=49152,
        max_position_embeddings=max(4096, a.seq),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    for f in Path(a.tokenizer).iterdir():
        shutil.copy(f, model_dir / f.name)
    # Enough chats that every step's rows come from the first pass over the data.
    write_records(
        generate_identity_records("Forgey", "Alice", count=4000 if not a.tiny else 200), work / "data.jsonl"
    )
    gpus = torch.cuda.device_count()
    plans = {
        "one": (forge_config(work, model_dir, a.seq, a.steps, accum=2, fused=False), []),
        "zero2": (
            forge_config(work, model_dir, a.seq, a.steps, accum=1, fused=False),
            ["--gpus", "2", "--zero", "2"],
        ),
        "fast": (forge_config(work, model_dir, a.seq, a.steps, accum=2, fused=True), []),
    }
    # Every layer checkpointed: with CUDA graphs (the default) and without, same data.
    for name, graphs in (("ckpt-graphs", True), ("ckpt-plain", False)):
        raw = forge_config(work, model_dir, a.seq, a.steps, accum=2, fused=True)
        raw["train"].update(checkpoint_policy="all", cuda_graphs=graphs)
        plans[name] = (raw, [])
    results = []
    for name in a.runs.split(","):
        if a.tiny:  # the CPU plumbing check: processes over gloo
            plans[name][0]["train"]["device"] = "cpu"
        elif name == "zero2" and gpus < 2:
            results.append({"run": name, "error": f"needs 2 GPUs, {gpus} visible"})
            continue
        raw, extra = plans[name]
        rec = run(work, out, name, raw, extra)
        results.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "losses"}), flush=True)
    base = next((r for r in results if r["run"] == "one" and "tokens_per_s" in r), None)
    lines = [
        "| run | tokens/s | x one | peak GiB per GPU | max abs loss diff vs one | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['run']} | error: {str(r.get('error', ''))[-120:]!r} | | | | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        diff = (
            max(abs(r["losses"][s] - base["losses"][s]) for s in r["losses"] if s in base["losses"])
            if base
            else float("nan")
        )
        lines.append(
            f"| {r['run']} | {r['tokens_per_s']:.0f} | {ratio:.2f} | {r['mem_gib']} | {diff:.4f} | {r['wall_s']} |"
        )
    (out / "gpu_multi.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the device machines' rule: no NVLink multicast
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    sys.exit(main())
