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
