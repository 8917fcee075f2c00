"""DeepSpeed ZeRO (`train.zero_stage`, `forge train --gpus N --zero 2|3`), run for real on the CPU:
two processes over gloo through torchrun, real DeepSpeed, the demo model, the real detached trainer.

One process with 2 accumulated rows is the reference; ZeRO-2 and ZeRO-3 with 2 processes x 1 row
must take the same steps (same rows per step: the sampler is shared). ZeRO-3 runs fewer steps: on CPU
processes it gathers every weight over gloo for each forward and backward (~7 s a step here).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from forge_testing import final_losses, forge
from test_data_parallel import adapter, config, rel_diff, train

from assistant_forge.core.runs import complete_checkpoints, read_jsonl, read_status

# Skipped only where DeepSpeed is not installed (the test extra installs it). Looked up rather than
# imported: importing DeepSpeed here would make it probe for an accelerator in the test process.
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("DeepSpeed is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

STEPS = 4  # 8 rows of the 15 the data packs into: every step stays inside the first epoch
ZERO3_STEPS = 2


def zero_config(tmp: Path, name: str, *, processes: int, grad_accum: int, max_steps: int, stage: int) -> Path:
    path = config(tmp, name, processes=processes, grad_accum=grad_accum, max_steps=max_steps, save_steps=2)
    text = path.read_text()
    # A constant rate: the shorter ZeRO-3 run then takes the reference's first steps exactly (a
    # cosine schedule depends on the total).
    text = text.replace("learning_rate = 5e-4", 'learning_rate = 5e-4\nlr_scheduler = "constant"')
    # fp32 for all three: on a CPU with AMX "auto" is bf16, which DeepSpeed runs on bf16 weights and
    # the plain Trainer as autocast over fp32 ones; the comparison here is of the sharding alone.
    zero = f'device = "cpu"\nzero_stage = {stage}\nprecision = "fp32"'
    path.write_text(text.replace('device = "cpu"', zero))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three runs every test here compares, trained once."""
    tmp = tmp_path_factory.mktemp("zero")
    # Made before the per-test isolation fixture runs: keep these runs out of the real runs folder.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_RUNS_DIR", str(tmp / "runs"))
        mp.setenv("FORGE_CONFIG_DIR", str(tmp / "config"))
        for name, processes, accum, steps, stage in (
            ("one", 1, 2, STEPS, 0),
            ("zero2", 2, 1, STEPS, 2),
            ("zero3", 2, 1, ZERO3_STEPS, 3),
        ):
            cfg = zero_config(
                tmp, f"{name}.toml", processes=processes, grad_accum=accum, max_steps=steps, stage=stage
            )
            train(cfg, tmp / name)
    return tmp


def losses(run: Path) -> dict[int, float]:
    return final_losses(read_jsonl(run / "events.jsonl"))


def test_zero2_matches_one_process_with_the_same_global_batch(runs: Path) -> None:
    one, z2 = losses(runs / "one"), losses(runs / "zero2")
    assert sorted(z2) == list(range(1, STEPS + 1))
    assert all(abs(z2[s] - one[s]) < 1e-4 for s in z2), (z2, one)
    step, weights = adapter(runs / "zero2")
    assert step == STEPS and rel_diff(weights, adapter(runs / "one")[1]) < 1e-4
    log = (runs / "zero2" / "train.log").read_text()
    assert "data parallel: 2 processes, DeepSpeed ZeRO-2" in log and log.count(f"step {STEPS}/{STEPS} ") == 1
    # DeepSpeed's own checkpoint (each process's optimizer shard) sits inside forge's checkpoint.
    ckpt = complete_checkpoints(runs / "zero2")[-1][1]
    shards = sorted(p.name for p in (ckpt / f"global_step{STEPS}").glob("*optim_states.pt"))
    assert len(shards) == 2 and (ckpt / "latest").read_text().strip() == f"global_step{STEPS}"


def test_zero3_matches_one_process_and_exports_the_adapter(runs: Path, tmp_path: Path) -> None:
    one, z3 = losses(runs / "one"), losses(runs / "zero3")
    assert sorted(z3) == list(range(1, ZERO3_STEPS + 1))
    assert all(abs(z3[s] - one[s]) < 1e-4 for s in z3), (z3, one)
    # Each process held half of every weight; the saved adapter is gathered whole.
    step, weights = adapter(runs / "zero3")
    reference = dict(complete_checkpoints(runs / "one"))[ZERO3_STEPS]
    from safetensors.torch import load_file

    assert step == ZERO3_STEPS
    assert rel_diff(weights, load_file(reference / "adapter_model.safetensors")) < 1e-4
    assert "DeepSpeed ZeRO-3" in (runs / "zero3" / "train.log").read_text()
    proc = forge("convert", str(runs / "zero3"), "-o", str(tmp_path / "adapter"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_from_a_zero2_checkpoint_continues_the_same_run(runs: Path, tmp_path: Path) -> None:
    """Resuming from step 2 (DeepSpeed reloads its optimizer shards) gives the uninterrupted run's
    steps 3-4 and adapter."""
    run = tmp_path / "zero2"
    shutil.copytree(runs / "zero2", run, symlinks=True)
    shutil.rmtree(run / "checkpoints" / f"checkpoint-{STEPS}")
    assert complete_checkpoints(run)[-1][0] == 2
    resumed = forge("train", "--resume", str(run), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    status = read_status(run)
    assert status["state"] == "finished" and status["resumed"] and status["step"] == STEPS
    again, first = losses(run), losses(runs / "zero2")
    assert all(abs(again[s] - first[s]) < 1e-4 for s in (3, 4)), (again, first)
    assert rel_diff(adapter(run)[1], adapter(runs / "zero2")[1]) < 1e-4
