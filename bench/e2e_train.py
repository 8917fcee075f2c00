"""`forge train` end to end, as a user runs it: the whole command, fast path against the peer stack.

    PYTHONPATH=$PWD python3 bench/e2e_train.py --tokenizer .gpu_smoke --out $OUT \
        [--shape 7b|1.5b] [--seq 2048] [--steps 60] [--runs plain,fast,fast@peer,fast@5.4]

The model is random-weight (no weights reach the device machine) in a real shape: `7b` is Llama-2-7B's
(4096 x 11008, 32 layers), `1.5b` Qwen2.5-1.5B's (1536 x 8960, 28 layers, 2 KV heads), with the demo
tokenizer (vocab 49152). Speed does not depend on weight values; the loss curve on random weights only
shows the two stacks learn the same thing.

Data is real-shaped: the identity records `forge data identity` writes (short, a few hundred tokens)
mixed 1:1 with general conversations of log-normal length (median ~450 tokens, up to several thousand,
like oasst/ShareGPT turns), so packed rows have varying lengths, as in real training. The config is a
QLoRA preset's (NF4, r 64, alpha 16, dropout 0.1, all projections, packing, replay 0.3, cosine, paged
AdamW) with the presets' gradient accumulation (16; --grad-accum), sample answers every --sample-every
steps (64 new tokens), checkpoints at half and at the end. A 100-step run at 16 micro-batches is ~15
minutes of the peer's time, more than one device call: the table also projects each run to 100 steps
(its measured wall time plus the missing steps at its median step time; walls leave out what the
profiler added to the steps --profile traced).

Runs (each a real `python -m assistant_forge train CONFIG --run-dir DIR` subprocess, output timed line by line
as the user sees it):
  plain      train.fused_kernels = false: the HF Trainer + PEFT + bitsandbytes stack XTuner and
             LLaMA-Factory run (gradient checkpointing on every layer)
  fast       forge's fast path, default budget (the whole GPU)
  fast@peer  the fast path with memory_budget_gib = the plain run's peak (needs `plain` first)
  fast@G     the fast path with memory_budget_gib = G (e.g. fast@5.4)
  .../sdpa   without varlen attention (train.varlen_attention = false): SDPA with a block mask
  .../discard  with FORGE_DISCARD_RECOMPUTED_OUTPUT=1 (the recompute skips the down projection)
A run name may end in `+` to run it again in the same call (warm caches: torch's compile cache, the
replay cache): `fast,fast+`.

Reports per run: CLI start -> trainer launched (preflight), -> first step done (load, quantize, replay
answers, encode/pack, compile, capture), steady tokens/s (median and p10 of the per-step figures after
step 3), time in sample answers and in checkpoint saves (from the trainer's log lines), total wall time,
peak GPU memory (torch's peak plus the graph pool, as events.jsonl reports it), and the loss curve's
difference from `plain`. Writes $OUT/e2e_<shape>_<seq>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads
    "7b": (4096, 11008, 32, 32, 32),
    "1.5b": (1536, 8960, 28, 12, 2),
    "tiny": (128, 256, 2, 4, 4),
}

TEXT = (
    "the model learns a new answer when data shows it many times and the loss falls while memory stays "
    "within budget so training runs fast on one GPU over a long night with checkpoints saved to disk each "
    "hour people ask questions about history science cooking travel code poems stories numbers music art "
    "explain why how what where when which because therefore however although example step first second "
    "finally result value function class table list river mountain city country language book film game"
)
WORDS = TEXT.split()


def general_conversations(n: int, seed: int) -> list[dict]:
    """Conversations of log-normal length (median ~450 tokens), one to three turns."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        for _turn in range(rng.choice((1, 1, 2, 3))):
            q = " ".join(rng.choices(WORDS, k=max(4, int(rng.lognormvariate(3.0, 0.7)))))
            a = " ".join(rng.choices(WORDS, k=max(8, int(rng.lognormvariate(5.6, 0.8)))))
            msgs += [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a + "."}]
        out.append({"messages": msgs})
    return out


def truncate_bpe(tokenizer: Path, vocab: int, out: Path) -> None:
    """Write into `out` the BPE tokenizer `tokenizer` cut to its first `vocab` ids: the tokens and the
    merges that make them (a BPE vocabulary is numbered in merge order, so the cut is a tokenizer that
    simply stops merging earlier). For a model with Llama-2's vocabulary (32000) from the demo's 49152."""
    tj = json.loads((tokenizer / "tokenizer.json").read_text())
    model = tj["model"]
    keep = {t: i for t, i in model["vocab"].items() if i < vocab}
    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in model["merges"]]
    model["vocab"] = keep
    model["merges"] = [m for m in merges if m[0] in keep and m[1] in keep and m[0] + m[1] in keep]
    if any(t["id"] >= vocab for t in tj.get("added_tokens", [])):
        raise SystemExit(f"--vocab {vocab} would drop the tokenizer's special tokens")
    (out / "tokenizer.json").write_text(json.dumps(tj))


def make_model(work: Path, shape: str, seq: int, tokenizer: Path, vocab: int | None = None) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = work / (f"model-{shape}" + (f"-v{vocab}" if vocab else ""))
    if (model_dir / "config.json").exists():
        return model_dir
    h, inter, layers, heads, kv = SHAPES[shape]
    full = len(AutoTokenizer.from_pretrained(tokenizer))
    if vocab and vocab < full:
        model_dir.mkdir(parents=True, exist_ok=True)
        truncate_bpe(tokenizer, vocab, model_dir)
    vocab = vocab or full
    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=max(4096, seq),
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # a 7B initialised on the GPU takes seconds, on the CPU minutes
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    for f in tokenizer.iterdir():
        if f.is_file() and not (model_dir / f.name).exists():
            shutil.copy(f, model_dir / f.name)
    return model_dir


def forge_config(
    work: Path,
    model: Path,
    seq: int,
    steps: int,
    *,
    fused: bool,
    budget: float,
    varlen: bool = True,
    grad_accum: int = 16,
    sample_every: int = 20,
) -> dict:
    return {
        "model": {"path": str(model)},
        "data": {
            "files": [str(work / "identity.jsonl"), str(work / "general.jsonl")],
            "max_length": seq,
            "packing": True,
            "replay_ratio": 0.3,
            "replay_prompts": 64,
        },
        "lora": {"method": "qlora", "r": 64, "alpha": 16, "dropout": 0.1},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 1,
            "grad_accum": grad_accum,
            "save_steps": max(1, steps // 2),
            "learning_rate": 2e-4,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.03,
            "optimizer": "paged_adamw_32bit",
            "fused_kernels": fused,
            "memory_budget_gib": budget,
            "varlen_attention": varlen,
        },
        "eval": {
            "prompts": ["Who are you?", "你是谁？", "What is the capital of France?"],
            "sample_every": sample_every,
            "max_new_tokens": 64,
        },
    }


# Lines of the trainer's log (as `forge train` prints them) that mark the phases.
STEP = re.compile(r"^step (\d+)/(\d+) ")
TIMED = re.compile(r"^(samples at step|checkpoint-)\S* .*?([\d.]+) s\b")


def run(work: Path, out: Path, name: str, raw: dict, env: dict[str, str] | None = None) -> dict:
    from assistant_forge.core.config import parse_config, save_config
    from assistant_forge.core.run_state import speed_summary
    from assistant_forge.core.runs import read_jsonl, read_status
    from assistant_forge.training import profiling

    tag = name.replace("@", "_at_").replace("+", "_again").replace("/", "_")
    cfg_path = work / f"{tag}.toml"
    save_config(parse_config(raw), cfg_path)
    run_dir = work / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "assistant_forge", "train", str(cfg_path), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.time() - t0, line.rstrip("\n")))
    rc = proc.wait()
    wall = time.time() - t0
    (out / f"{tag}.log").write_text("\n".join(f"{t:7.1f} {s}" for t, s in lines))
    events = read_jsonl(run_dir / "events.jsonl") if (run_dir / "events.jsonl").exists() else []
    rec: dict = {"run": name, "rc": rc, "wall_s": round(wall, 1), "state": read_status(run_dir).get("state")}
    if rc != 0 or not events:
        rec["error"] = "\n".join(s for _, s in lines[-15:])
        return rec
    launched = next((t for t, s in lines if s.startswith("run ") and "trainer pid" in s), math.nan)
    first = next((t for t, s in lines if STEP.match(s)), math.nan)
    timed = {"samples": 0.0, "saves": 0.0}
    for _, s in lines:
        m = TIMED.match(s)
        if m:
            timed["samples" if m.group(1).startswith("samples") else "saves"] += float(m.group(2))
    shutil.copy(run_dir / "events.jsonl", out / f"{tag}.events.jsonl")
    for kept in ("profile.txt", "trace.json.gz", *(p.name for p in run_dir.glob("memory_step*.txt"))):
        if (run_dir / kept).exists():
            shutil.copy(run_dir / kept, out / f"{tag}.{kept}")
    speed = speed_summary(events)  # what `forge runs show` reports
    # The profiled steps run several times slower (tracing, the timeline's export): time the run
    # would not have spent, left out of the walls the table compares.
    steps = profiling.requested(env or {})
    profiled = range(steps[0], steps[1] + 1) if steps else range(0)
    profiler_s = sum(
        max(e["step_s"] - speed["step_s"], 0) for e in events if e["step"] in profiled and speed["step_s"]
    )
    rec.update(
        preflight_s=round(launched, 1),
        first_step_s=round(first, 1),
        tokens_per_s=speed["tokens_per_s"],
        p10_tokens_per_s=speed["p10_tokens_per_s"],
        samples_s=round(timed["samples"], 1),
        saves_s=round(timed["saves"], 1),
        mem_gib=speed["peak_mem_gib"] or 0,
        resident_gib=max(e.get("mem_resident_gib") or 0 for e in events),
        pool_gib=max(e.get("mem_pool_gib") or 0 for e in events),
        step_s=round(speed["step_s"], 3) if speed["step_s"] else None,
        profiler_s=round(profiler_s, 1),
        steps=speed["steps"],
        plan=[s for _, s in lines if s.startswith("fast path:")][:1],
        losses={e["step"]: e["loss"] for e in events},
    )
    return rec


def net_wall(r: dict) -> float:
    """The run's wall time without what the profiler added to its profiled steps."""
    return r["wall_s"] - r.get("profiler_s", 0.0)


def projected(r: dict, steps: int) -> float:
    """Wall time of the same run at `steps` optimizer steps: the measured run (its fixed costs, samples
    and saves as they fell) plus or minus whole steps at the median step time."""
    return net_wall(r) + (steps - r["steps"]) * r["step_s"]


def table(results: list[dict], at: int = 100) -> str:
    base = next((r for r in results if r["run"] == "plain" and r.get("tokens_per_s")), None)
    out = [
        "| run | preflight s | first step s | step s | median tok/s | p10 tok/s | x plain | samples s | saves s "
        f"| wall s | x plain wall | {at}-step wall s (projected) | x plain ({at}) | peak GiB | resident GiB "
        "| loss diff vs plain (mean/max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.get("tokens_per_s"):
            out.append(f"| {r['run']} | error: {str(r.get('error', ''))[-160:]!r} |" + " |" * 14)
            continue
        x = r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
        xw = net_wall(base) / net_wall(r) if base else math.nan
        p100 = projected(r, at)
        x100 = projected(base, at) / p100 if base else math.nan
        diffs = [abs(v - base["losses"][s]) for s, v in r["losses"].items() if base and s in base["losses"]]
        d = f"{statistics.mean(diffs):.3f}/{max(diffs):.3f}" if diffs else "-"
        out.append(
            f"| {r['run']} | {r['preflight_s']} | {r['first_step_s']} | {r['step_s']} | {r['tokens_per_s']:.0f} | "
            f"{r['p10_tokens_per_s']:.0f} | {x:.2f} | {r['samples_s']} | {r['saves_s']} | {net_wall(r):.1f} | "
            f"{xw:.2f} | {p100:.0f} | {x100:.2f} | {r['mem_gib']} | {r['resident_gib']} | {d} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with the demo model's tokenizer files")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--work", default="/tmp/forge_e2e")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument(
        "--vocab", type=int, default=0, help="model vocabulary (default: the tokenizer's; 32000 = Llama-2's)"
    )
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--runs", default="plain,fast,fast@peer")
    ap.add_argument("--conversations", type=int, default=3000, help="identity + general, half each")
    ap.add_argument("--grad-accum", type=int, default=16, help="micro-batches a step (the presets': 16)")
    ap.add_argument("--sample-every", type=int, default=20, help="sample answers every N steps")
    ap.add_argument("--profile", default="", help="optimizer steps A-B to profile in fast runs (profile.txt)")
    ap.add_argument("--torch-logs", default="", help="TORCH_LOGS for fast runs, e.g. recompiles")
    a = ap.parse_args()

    from assistant_forge.core.dataset import write_records
    from assistant_forge.core.identity import generate_identity_records

    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    model = make_model(work, a.shape, a.seq, Path(a.tokenizer), a.vocab or None)
    print(f"model {a.shape} ready in {time.time() - t:.0f} s", flush=True)
    half = a.conversations // 2
    write_records(generate_identity_records("Forgey", "Alice", count=half), work / "identity.jsonl")
    write_records(general_conversations(half, seed=0), work / "general.jsonl")
    results: list[dict] = []
    for name in a.runs.split(","):
        kind, _, flag = name.rstrip("+").partition("/")  # fast@peer/sdpa, fast@peer/discard
        budget = 0.0
        if kind.startswith("fast@"):
            arg = kind.split("@", 1)[1]
            if arg == "peer":
                plain = next((r for r in results if r["run"] == "plain" and r.get("mem_gib")), None)
                if plain is None:
                    results.append({"run": name, "error": "fast@peer needs a plain run before it"})
                    continue
                budget = plain["mem_gib"]
            else:
                budget = float(arg)
        raw = forge_config(
            work,
            model,
            a.seq,
            a.steps,
            fused=kind != "plain",
            budget=budget,
            varlen=flag != "sdpa",
            grad_accum=a.grad_accum,
            sample_every=a.sample_every,
        )
        env = {}
        if kind != "plain":
            env = {k: v for k, v in (("FORGE_PROFILE_STEPS", a.profile), ("TORCH_LOGS", a.torch_logs)) if v}
            if flag == "discard":
                env["FORGE_DISCARD_RECOMPUTED_OUTPUT"] = "1"
        rec = run(work, out, name, raw, env)
        results.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "losses"}), flush=True)
    (out / f"e2e_{a.shape}_{a.seq}.json").write_text(json.dumps(results, indent=1))
    print(f"\n`forge train`, {a.shape} shape, seq {a.seq}, {a.steps} steps x {a.grad_accum} rows\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
