"""A detached trainer as a real subprocess: refuse a second trainer, stop with a checkpoint, resume to the end."""

from __future__ import annotations

import json
import os

import pytest
from forge_testing import forge, tiny_config, wait_for

from assistant_forge.core.runs import complete_checkpoints, read_jsonl, read_status, trainer_alive

pytestmark = pytest.mark.slow


def test_detached_run_refuses_a_second_trainer_stops_and_resumes(tmp_path, demo_path):
    cfg = tiny_config(tmp_path, max_steps=400)
    run = tmp_path / "run"
    proc = forge("train", str(cfg), "--detach", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr
    assert str(run) in proc.stdout
    wait_for(lambda: len(complete_checkpoints(run)) >= 1, 240, "a first complete checkpoint")
    assert trainer_alive(run) and read_status(run)["state"] == "running"

    # A second trainer on the same directory is refused and the first goes on untouched.
    second = forge("train", str(run), "--resume")
    assert second.returncode == 2 and "in use by a live trainer" in second.stderr
    assert "Traceback" not in second.stderr
    steps_before = len(read_jsonl(run / "events.jsonl"))
    wait_for(lambda: len(read_jsonl(run / "events.jsonl")) > steps_before, 60, "training to go on")

    stopped = forge("runs", "stop", str(run))
    assert stopped.returncode == 0, stopped.stderr
    status = read_status(run)
    assert status["state"] == "stopped" and not trainer_alive(run)
    last_step = complete_checkpoints(run)[-1][0]
    assert last_step == status["step"]  # stopping saved a checkpoint at the step it stopped on

    listed = forge("runs")
    assert run.name in listed.stdout and "stopped" in listed.stdout

    # Resume continues from that checkpoint (not from zero) and keeps the step count.
    resumed = forge("train", str(run), "--resume", "--detach")
    assert resumed.returncode == 0, resumed.stderr
    wait_for(
        lambda: read_status(run).get("state") == "running" and read_status(run).get("step", 0) > last_step,
        120,
        "resumed progress",
    )
    events = read_jsonl(run / "events.jsonl")
    first_resumed = [e for e in events if e["step"] > last_step]
    assert first_resumed and first_resumed[0]["step"] == last_step + 1
    # Tokens seen go on from where the stopped run left them (the collator counts, not the Trainer).
    before = [e for e in events if e["step"] <= last_step][-1]
    assert first_resumed[0]["tokens_seen"] > before["tokens_seen"] > 0
    assert all(e["tokens_per_s"] > 0 for e in events)
    forge("runs", "stop", str(run))
    assert read_status(run)["state"] == "stopped"


def test_forge_runs_reports_a_killed_trainer_as_dead(tmp_path, demo_path):
    import signal

    cfg = tiny_config(tmp_path, max_steps=400)
    run = tmp_path / "run"
    assert forge("train", str(cfg), "--detach", "--run-dir", str(run)).returncode == 0
    wait_for(
        lambda: read_status(run).get("state") == "running" and (run / "events.jsonl").exists(),
        240,
        "training",
    )
    os.kill(read_status(run)["pid"], signal.SIGKILL)
    wait_for(lambda: not trainer_alive(run), 30, "the trainer to die")
    status = json.loads(forge("runs", "show", str(run), "--json").stdout)
    assert status["state"] == "dead" and "resume" in status["reason"]
