"""Data-parallel training (`train.processes`, `forge train --gpus N`), run for real on the CPU: two
processes over gloo through torchrun, the demo model, the real detached trainer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from forge_testing import final_losses, forge, stop_if_alive, tiny_config, wait_for

from assistant_forge.core.dataset import write_records
from assistant_forge.core.identity import generate_identity_records
from assistant_forge.core.runs import complete_checkpoints, read_jsonl, read_status

pytestmark = pytest.mark.slow


def config(tmp: Path, name: str, *, processes: int, grad_accum: int, max_steps: int, save_steps: int) -> Path:
    if not (tmp / "data.jsonl").exists():
        # 24 chats pack into 15 rows, more than the 12 that 6 steps of 2 rows take: every compared step
        # stays inside the first epoch (at an epoch's end the distributed sampler pads, accumulation
        # does not). tiny_config's 16 chats gave 11 rows once the English bank grew.
        write_records(
            generate_identity_records("Forgey", "Alice", langs=["en"], count=24), tmp / "data.jsonl"
        )
    path = tiny_config(tmp, max_steps, save_steps=save_steps, name=name)
    text = path.read_text().replace("grad_accum = 1", f"grad_accum = {grad_accum}")
    text = text.replace("cpu_threads = 1", f'cpu_threads = 1\nprocesses = {processes}\ndevice = "cpu"')
    path.write_text(text)
    return path


def train(cfg: Path, run: Path) -> None:
    proc = forge("train", str(cfg), "--run-dir", str(run), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert read_status(run)["state"] == "finished"


def adapter(run: Path):
    from safetensors.torch import load_file

    step, path = complete_checkpoints(run)[-1]
    return step, load_file(path / "adapter_model.safetensors")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path) -> None:
    """2 processes x 1 row == 1 process x 2 accumulated rows: the same rows per step (the sampler is
    shared), gradients averaged across processes. A third run with half the global batch shows
    that the comparison can tell runs apart."""
    two = config(tmp_path, "two.toml", processes=2, grad_accum=1, max_steps=6, save_steps=3)
    one = config(tmp_path, "one.toml", processes=1, grad_accum=2, max_steps=6, save_steps=3)
    half = config(tmp_path, "half.toml", processes=1, grad_accum=1, max_steps=6, save_steps=3)
    losses, adapters = {}, {}
    for name, cfg in (("two", two), ("one", one), ("half", half)):
        train(cfg, tmp_path / name)
        losses[name] = final_losses(read_jsonl(tmp_path / name / "events.jsonl"))
        step, adapters[name] = adapter(tmp_path / name)
        assert step == 6 and sorted(losses[name]) == list(range(1, 7))
    assert all(abs(losses["two"][s] - losses["one"][s]) < 1e-4 for s in range(1, 7)), losses
    assert max(abs(losses["half"][s] - losses["one"][s]) for s in range(1, 7)) > 0.1, losses
    assert rel_diff(adapters["two"], adapters["one"]) < 1e-4
    assert rel_diff(adapters["half"], adapters["one"]) > 1e-3
    # rank 0 owns the run's files: one line per step in the log, each process's RNG state saved
    log = (tmp_path / "two" / "train.log").read_text()
    assert log.count("step 6/6 ") == 1 and "data parallel: 2 processes" in log
    ckpt = complete_checkpoints(tmp_path / "two")[-1][1]
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()


def rel_diff(a: dict, b: dict) -> float:
    """|a - b| / |b| over all the adapter's tensors."""
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def test_stop_and_resume_with_two_processes(tmp_path: Path) -> None:
    cfg = config(tmp_path, "cfg.toml", processes=2, grad_accum=1, max_steps=40, save_steps=100)
    run = tmp_path / "run"
    try:
        assert forge("train", str(cfg), "--run-dir", str(run), "--detach").returncode == 0

        def step() -> int:
            return read_status(run).get("step") or 0

        wait_for(lambda: step() >= 3, 300, "step 3")
        stopped = forge("runs", "stop", str(run), timeout=180)
        assert stopped.returncode == 0, stopped.stderr
        status = read_status(run)
        assert status["state"] == "stopped"
        at = complete_checkpoints(run)[-1][0]
        assert at == status["step"] and 3 <= at < 40  # both processes stopped at the same step and saved

        # no process of the run is left (torchrun and both ranks exit)
        def gone() -> bool:
            ps = subprocess.run(["pgrep", "-f", f"assistant_forge.training {run}"], capture_output=True)
            return ps.returncode == 1

        wait_for(gone, 30, "torchrun and both processes to exit")
        resumed = forge("train", "--resume", str(run), timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        status = read_status(run)
        assert status["state"] == "finished" and status["resumed"] and status["step"] == 40
        assert sorted(final_losses(read_jsonl(run / "events.jsonl"))) == list(range(1, 41))
    finally:
        stop_if_alive(run)
