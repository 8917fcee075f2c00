"""Data at scale: N conversations of ~300 tokens through check (convert + validate), tokenize and pack.

    python bench/data_scale.py                 # 200k conversations, the figures in bench/RESULTS.md
    python bench/data_scale.py --check         # 2k conversations: a quick run that the tests use

Writes a guanaco-style JSONL (`### Human: … ### Assistant: …`, two turns, made-up English words) into
--work, then runs the same pipeline twice in a fresh process each: cold (an empty datasets cache) and
warm (the cache from the cold run). Each run does what a training run does before step 1:
core.mixing.build_mix (every row converted and validated), training.data.encode_dataset (the demo
model's tokenizer and ChatML, map with processes), pack_dataset (rows of max_length 2048) and the
token-length statistics of `forge data check`. Wall time and the peak RSS of the process and its
pool workers together (PSS, sampled every 0.5 s) are reported; one JSON line per run, and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    *[
        "the",
        "model",
        "learns",
        "from",
        "data",
        "and",
        "answers",
        "questions",
        "about",
        "science",
        "history",
        "music",
        "cooking",
        "travel",
    ],
    *[
        "code",
        "a",
        "river",
        "mountain",
        "city",
        "language",
        "number",
        "system",
        "energy",
        "light",
        "water",
        "garden",
        "market",
        "story",
    ],
    *[
        "because",
        "when",
        "while",
        "after",
        "before",
        "under",
        "over",
        "between",
        "through",
        "simple",
        "careful",
        "quick",
        "gentle",
        "bright",
    ],
]


def write_data(path: Path, n: int, seed: int = 0) -> None:
    """n two-turn conversations of about 300 tokens (SmolLM2's tokenizer), each different."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):

            def said(k: int) -> str:
                return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

            text = (
                f"### Human: Question {i}: {said(20)}### Assistant: {said(120)}"
                f"### Human: {said(15)}### Assistant: {said(100)}"
            )
            f.write(json.dumps({"text": text}) + "\n")


def stage(data: str, max_length: int) -> dict:
    """One run of the pipeline in this process; timings per step."""
    from assistant_forge.core.encoding import load_tokenizer
    from assistant_forge.core.mixing import build_mix
    from assistant_forge.core.models import demo_model_dir
    from assistant_forge.training.data import encode_dataset, length_stats, pack_dataset

    t0 = time.perf_counter()
    tok = load_tokenizer(str(demo_model_dir()), "model")  # SmolLM2's own template (ChatML)
    t1 = time.perf_counter()
    mix, reports = build_mix([data], [], None, seed=42)
    t2 = time.perf_counter()
    samples = encode_dataset(mix, tok, max_length)
    t3 = time.perf_counter()
    stats = length_stats(samples, max_length)
    rows = pack_dataset(samples, max_length, True, seed=42)
    t4 = time.perf_counter()
    return {
        "conversations": len(mix),
        "samples": stats["samples"],
        "mean_tokens": stats["mean"],
        "rows": len(rows),
        "load_s": round(t1 - t0, 2),
        "check_s": round(t2 - t1, 2),
        "tokenize_s": round(t3 - t2, 2),
        "pack_s": round(t4 - t3, 2),
    }


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            # PSS: pages shared with the forked pool workers are counted once, not once per process.
            total += q.memory_full_info().pss
    return total


def timed_run(data: Path, cache: Path, max_length: int) -> dict:
    """The pipeline in a fresh process with its own datasets cache: wall time, peak RSS of the tree."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--stage", str(data), "--max-length", str(max_length)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"stage failed:\n{err[-3000:]}")
    return {
        **json.loads(out.strip().splitlines()[-1]),
        "wall_s": round(wall, 2),
        "peak_pss_gib": round(peak / 2**30, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="conversations")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--work", default="/tmp/forge-data-scale", help="folder for the data and caches")
    ap.add_argument("--check", action="store_true", help="2k conversations: a quick correctness run")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage:
        print(json.dumps(stage(a.stage, a.max_length)))
        return 0
    n = 2000 if a.check else a.n
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"guanaco-{n}.jsonl"
    if not data.exists():
        write_data(data, n)
    cache = work / f"cache-{n}"
    shutil.rmtree(cache, ignore_errors=True)
    results = {"n": n, "file_mib": round(data.stat().st_size / 2**20, 1)}
    for run in ("cold", "warm"):
        r = timed_run(data, cache, a.max_length)
        results[run] = r
        print(json.dumps({"run": run, **r}), flush=True)
    c, w = results["cold"], results["warm"]
    print("| conversations | file | run | wall s | check s | tokenize s | pack s | peak PSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for run, r in (("cold", c), ("warm", w)):
        print(
            f"| {n} | {results['file_mib']} MiB | {run} | {r['wall_s']} | {r['check_s']} | {r['tokenize_s']} "
            f"| {r['pack_s']} | {r['peak_pss_gib']} |"
        )
    if a.check:
        assert c["conversations"] == w["conversations"] == n and c["rows"] == w["rows"] > 0, results
        assert w["check_s"] + w["tokenize_s"] < c["check_s"] + c["tokenize_s"], results
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
