"""InternLM2 on a GPU through forge's native loader: the hub-format tiny checkpoint (tests/fixtures) is
converted, trained with QLoRA on the fast path (fused LoRA + loss, compiled layers, CUDA graphs) and on
the plain transformers + PEFT path, the same steps and data, then converted, merged and chatted with.

Usage (on a GPU): python bench/gpu_internlm2.py --out DIR [--steps 12]
Prints a table of per-step losses (fast vs plain) and the pipeline's exit codes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "internlm2" / "tiny-a"


def forge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "assistant_forge", *args], capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()

    from assistant_forge.core.config import parse_config
    from assistant_forge.core.dataset import write_records
    from assistant_forge.core.identity import generate_identity_records
    from assistant_forge.core.runs import new_run_dir, read_jsonl, read_status

    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    write_records(generate_identity_records("Forgey", "Alice", count=96), work / "data.jsonl")
    losses: dict[str, list[float]] = {}
    ok = True
    # "graphed": every layer checkpointed, so the checkpointed layers replay as CUDA graphs.
    for name, fast, policy in (("fast", True, "auto"), ("graphed", True, "all"), ("plain", False, "auto")):
        cfg = parse_config(
            {
                "model": {"path": str(FIXTURE), "chat_template": "internlm2_5"},
                "data": {"files": [str(work / "data.jsonl")], "max_length": 256, "packing": True},
                # Dropout 0: the two paths draw dropout masks differently, so only then are losses comparable.
                "lora": {"method": "qlora", "r": 16, "alpha": 32, "dropout": 0.0},
                "train": {
                    "max_steps": a.steps,
                    "grad_accum": 2,
                    "save_steps": a.steps,
                    "learning_rate": 1e-3,
                    "fused_kernels": fast,
                    "checkpoint_policy": policy,
                    "device": "cuda",
                },
                "eval": {"prompts": ["Who are you?"], "max_new_tokens": 8, "sample_every": 0},
            }
        )
        run = new_run_dir(cfg, work / f"run-{name}")
        proc = subprocess.run(
            [sys.executable, "-m", "assistant_forge.training", str(run)], capture_output=True, text=True
        )
        status = read_status(run)
        print(f"== {name}: exit {proc.returncode}, state {status.get('state')} {status.get('reason') or ''}")
        if proc.returncode != 0:
            print(
                (run / "train.log").read_text()[-3000:]
                if (run / "train.log").exists()
                else proc.stderr[-3000:]
            )
            ok = False
            continue
        log = proc.stdout + proc.stderr  # run directly, the trainer prints instead of writing train.log
        print("\n".join(line for line in log.splitlines() if "fast path" in line or "graph" in line)[-1500:])
        losses[name] = [e["loss"] for e in read_jsonl(run / "events.jsonl") if "loss" in e]
        if name == "fast":
            steps = [
                forge("convert", str(run), "-o", str(work / "adapter")),
                forge("merge", str(FIXTURE), str(work / "adapter"), "-o", str(work / "merged")),
                forge("chat", str(work / "merged"), "--prompt", "Who are you?", "--max-new-tokens", "8"),
                forge(
                    "chat", str(FIXTURE), "--adapter", str(work / "adapter"), "--bits", "4", "--prompt", "hi"
                ),
            ]
            for label, p in zip(("convert", "merge", "chat merged", "chat 4-bit + adapter"), steps):
                print(
                    f"{label}: exit {p.returncode} {p.stderr.strip().splitlines()[-1:] if p.returncode else ''}"
                )
                ok = ok and p.returncode == 0
    print("\n| step | fast loss | graphed loss | plain loss | max diff |\n|---|---|---|---|---|")
    for i, (f, g, p) in enumerate(
        zip(losses.get("fast", []), losses.get("graphed", []), losses.get("plain", [])), 1
    ):
        print(f"| {i} | {f:.4f} | {g:.4f} | {p:.4f} | {max(abs(f - p), abs(g - p)):.4f} |")
    (work / "losses.json").write_text(json.dumps(losses))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
