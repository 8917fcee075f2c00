"""Where a training step's time goes, for benchmarks: FORGE_PROFILE_STEPS="A-B" profiles optimizer
steps A to B with torch.profiler and writes `<run>/profile.txt` (bench/e2e_train.py --profile), the
timeline as `<run>/trace.json.gz` (chrome://tracing, Perfetto) and where the host waited for the GPU.

The table sorts operators by the GPU time they take themselves; the header says how much of the
profiled wall time the GPU was busy, which tells a step bound by the GPU (close to 100%) from one
bound by the host issuing work or waiting on syncs.
"""

from __future__ import annotations

import collections
import gzip
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

VARIABLE = "FORGE_PROFILE_STEPS"
MEMORY_VARIABLE = "FORGE_MEMORY_TRACE_STEP"


def requested(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """(first, last) optimizer step to profile, from the environment; None when not asked."""
    raw = environ.get(VARIABLE, "").strip()
    if not raw:
        return None
    first, _, last = raw.partition("-")
    return int(first), int(last or first)


class StepProfiler(TrainerCallback):
    def __init__(self, run: Path, steps: tuple[int, int]) -> None:
        self.run, (self.first, self.last) = run, steps
        self.prof: Any = None
        self.t0 = 0.0
        self.syncs: collections.Counter[str] = collections.Counter()
        self.shown: Any = None
        self.filters: list[Any] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # global_step counts finished steps: step N begins when N - 1 are done.
        if self.prof is None and state.global_step + 1 == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self._watch_syncs()
            self.t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.prof is None or state.global_step < self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self._unwatch_syncs()
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
        steps = self.last - self.first + 1
        head = (
            f"steps {self.first}-{self.last}: wall {wall * 1e3 / steps:.1f} ms a step, GPU busy "
            f"{device_us / 1e3 / steps:.1f} ms a step ({device_us / 1e6 / max(wall, 1e-9):.0%})\n"
        )
        by_gpu = events.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70)
        by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
        syncs = "\n".join(f"{n} x\n{where}" for where, n in self.syncs.most_common(12)) or "none seen"
        (self.run / "profile.txt").write_text(
            f"{head}\nby GPU time\n{by_gpu}\nby CPU time\n{by_cpu}\nwhere the host waited for the GPU\n{syncs}\n"
        )
        raw = self.run / "trace.json"
        self.prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f, gzip.open(self.run / "trace.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        raw.unlink()
        self.prof = None

    def _watch_syncs(self) -> None:
        """Count the Python stacks of synchronizing CUDA calls (torch's sync debug mode warns on each):
        a sync lets the GPU run dry while the host prepares the next work."""
        if not torch.cuda.is_available():
            return
        self.shown = warnings.showwarning

        def record(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
            if "synchronizing" not in str(message):
                self.shown(message, category, filename, lineno, *rest)
                return
            stack = traceback.format_stack()[-12:-1]
            self.syncs["".join(line for line in stack if "/profiling.py" not in line)] += 1

        warnings.showwarning = record
        self.filters = list(warnings.filters)
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def _unwatch_syncs(self) -> None:
        if self.shown is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self.shown
        warnings.filters[:] = self.filters
        self.shown = None


def memory_step_requested(environ: Mapping[str, str] = os.environ) -> int | None:
    """The optimizer step whose allocations to trace (FORGE_MEMORY_TRACE_STEP), None when not asked."""
    raw = environ.get(MEMORY_VARIABLE, "").strip()
    return int(raw) if raw else None


def _where(frames: list[dict]) -> str:
    """The innermost frame in forge's code (else in transformers or peft, else the innermost)."""
    for key in ("assistant_forge", "transformers", "peft", ""):
        for f in frames:
            if key in f.get("filename", ""):
                return f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}"
    return "?"


def peak_breakdown(snapshot: dict, allocated_at_start: int, rows: int = 30) -> str:
    """What was allocated at the traced step's peak, by the code that allocated it.

    Replays the allocator's trace (allocations and completed frees) from the allocated total when
    recording began; blocks older than the recording show up only as that starting total. Blocks
    inside a CUDA graph's private pool are marked: torch counts them as allocated, and the pool's
    reserved size already holds them."""
    pools = [
        (s["address"], s["address"] + s["total_size"])
        for s in snapshot.get("segments", [])
        if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0)
    ]
    trace = next((t for t in snapshot.get("device_traces", []) if t), [])
    # First the peak's place in the trace, then what was live there (one copy, not one per new peak).
    total = peak = allocated_at_start
    end = 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            total += e["size"]
            if total > peak:
                peak, end = total, i + 1
        elif e["action"] == "free_requested":  # where torch's allocated count drops
            total -= e["size"]
    at_peak: dict[int, tuple[int, str]] = {}
    for e in trace[:end]:
        if e["action"] == "alloc":
            at_peak[e["addr"]] = (e["size"], _where(e.get("frames", [])))
        elif e["action"] == "free_requested":
            at_peak.pop(e["addr"], None)
    by_where: collections.Counter[str] = collections.Counter()
    in_pool = 0
    for addr, (size, where) in at_peak.items():
        pooled = any(lo <= addr < hi for lo, hi in pools)
        in_pool += size if pooled else 0
        by_where[("[pool] " if pooled else "") + where] += size
    gib = 2**30
    lines = [
        f"peak allocated {peak / gib:.3f} GiB = {allocated_at_start / gib:.3f} allocated before the step "
        f"+ {(peak - allocated_at_start) / gib:.3f} allocated in it ({in_pool / gib:.3f} of that inside "
        f"graph pools); {len(trace)} trace entries",
    ]
    lines += [f"{size / gib:9.3f} GiB  {where}" for where, size in by_where.most_common(rows)]
    return "\n".join(lines) + "\n"


class MemoryTrace(TrainerCallback):
    """Records the allocator over one optimizer step with Python stacks (FORGE_MEMORY_TRACE_STEP=N)
    and writes `<run>/memory_step<N>.txt`: the step's peak by allocating code (peak_breakdown)."""

    def __init__(self, run: Path, step: int) -> None:
        self.run, self.step, self.start = run, step, 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.cuda.is_available() and state.global_step + 1 == self.step:
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not torch.cuda.is_available() or state.global_step != self.step:
            return
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(None)
        (self.run / f"memory_step{self.step}.txt").write_text(peak_breakdown(snap, self.start))
