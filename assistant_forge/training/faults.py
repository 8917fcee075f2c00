"""Test-only fault injection: FORGE_TEST_FAULT makes tests/faults reproduce failures for real on a CPU.

FORGE_TEST_FAULT="<what>@<step>[,...]":
  oom@N         raises a real torch.OutOfMemoryError as training step N begins (no GPU to exhaust on CPU)
  fsize=B@N     from training step N on, no file may grow past B bytes (RLIMIT_FSIZE: writes fail, EFBIG)
  pause_save@N  sleeps inside the save of checkpoint N, after its weights and before its optimizer state,
                so a test can kill the trainer while a checkpoint is half written

The trainer adds FaultInjection to its callbacks only when the variable is set.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

VARIABLE = "FORGE_TEST_FAULT"


def requested() -> dict[str, tuple[str, int]]:
    """{fault name: (argument, step)} from the environment; empty outside tests."""
    out = {}
    for item in filter(None, os.environ.get(VARIABLE, "").split(",")):
        what, _, step = item.partition("@")
        name, _, arg = what.partition("=")
        out[name.strip()] = (arg, int(step))
    return out


class FaultInjection(TrainerCallback):
    """Raises, limits or pauses at the steps FORGE_TEST_FAULT names."""

    def __init__(self, trainer: Trainer, faults: dict[str, tuple[str, int]]) -> None:
        self.faults = faults
        if "pause_save" in faults:
            # No callback runs between a checkpoint's weights and its optimizer state: wrap the one
            # method that writes the latter, on this trainer only.
            save_optimizer = trainer._save_optimizer_and_scheduler

            def pausing_save(output_dir: str) -> None:
                self._fire("pause_save", trainer.state.global_step)
                save_optimizer(output_dir)

            trainer._save_optimizer_and_scheduler = pausing_save

    def _fire(self, name: str, step: int) -> None:
        fault = self.faults.get(name)
        if fault is None or fault[1] != step:
            return
        arg = fault[0]
        print(f"test fault: {name} at step {step}", flush=True)
        if name == "oom":
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 20.00 GiB (injected by {VARIABLE})"
            )
        if name == "fsize":
            resource.setrlimit(
                resource.RLIMIT_FSIZE, (int(arg), resource.getrlimit(resource.RLIMIT_FSIZE)[1])
            )
        if name == "pause_save":
            time.sleep(float(arg or 600))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._fire("oom", state.global_step + 1)
        self._fire("fsize", state.global_step + 1)
