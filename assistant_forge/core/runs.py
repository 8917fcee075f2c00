"""The run directory contract shared by the trainer and everything that watches it.

<run>/config.toml    resolved config (never edited after start)
<run>/status.json    pid, state, reason, times, step/total
<run>/events.jsonl   one JSON object per logged step
<run>/samples.jsonl  sample answers (before, every N steps, after)
<run>/train.log      the trainer's stdout/stderr (a file: a full pipe would stall training)
<run>/error.log      the traceback of a failed run (train.log and status.json say it in one sentence)
<run>/checkpoints/checkpoint-N/  complete once it holds COMPLETE_MARKER; written as .saving-* and renamed
<run>/exports.json   adapter and merged folders made from the run (core.known_models; convert, merge)
<run>/.lock          held (flock) by the live trainer: a pid alone can be stale or reused
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from assistant_forge.core.config import ForgeConfig, load_config, save_config
from assistant_forge.core.fsutil import atomic_write_json
from assistant_forge.core.run_state import LIVE_STATES
from assistant_forge.core.tail import FileTail, json_objects
from assistant_forge.errors import ForgeError, did_you_mean
from assistant_forge.paths import runs_dir

COMPLETE_MARKER = "forge_complete.json"
LOCK_NAME = ".lock"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the lock -----------------------------------------------------------------------------------


class RunLock:
    """The trainer's exclusive lock on a run directory, held for the trainer's whole life."""

    def __init__(self, run: Path):
        self.path = run / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, wait_s: float = 2.0) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                # A watcher may hold a shared lock for an instant while it checks liveness.
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    self.fd = None
                    return False
                time.sleep(0.05)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def trainer_alive(run: Path) -> bool:
    """True while a trainer holds the run's lock (works even after a crash left a stale pid)."""
    path = run / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock if we got it
    return False


# --- status -------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(run: Path, **fields: Any) -> dict:
    status = read_json(run / "status.json")
    status.update(fields, updated=now_iso())
    atomic_write_json(run / "status.json", status)
    return status


def pid_alive(pid: Any) -> bool:
    """A live, non-zombie process with this pid (a zombie is a trainer that exited unreaped)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError, TypeError, ValueError):
        return False
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _live(run: Path, status: dict) -> bool:
    """Is a trainer working on this run? Between launch and taking the lock only its pid can tell."""
    if trainer_alive(run):
        return True
    if status.get("state") != "starting":
        return False
    pid = status.get("pid")
    return pid is None or pid_alive(pid)  # no pid yet: launch() is between its two writes


def read_status(run: Path) -> dict:
    """status.json, with a live state corrected to 'dead' when no trainer is working on the run."""
    status = read_json(run / "status.json")
    if status.get("state") in LIVE_STATES and not _live(run, status):
        # Re-read: the trainer may have finished between the two reads.
        status = read_json(run / "status.json")
        if status.get("state") in LIVE_STATES and not _live(run, status):
            status["state"] = "dead"
            status["reason"] = (
                "the trainer process is gone without finishing (killed or crashed); resume with `forge train --resume`"
            )
    return status


# --- finding runs -------------------------------------------------------------------------------


@dataclass
class RunInfo:
    path: Path
    status: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state(self) -> str:
        return self.status.get("state", "created")


def list_runs(parent: Path | None = None) -> list[RunInfo]:
    parent = parent or runs_dir()
    runs = (
        [RunInfo(p, read_status(p)) for p in parent.iterdir() if (p / "config.toml").is_file()]
        if parent.is_dir()
        else []
    )
    return sorted(runs, key=lambda r: r.status.get("started", ""), reverse=True)


def find_run(spec: str) -> Path:
    p = Path(spec).expanduser()
    if (p / "config.toml").is_file():
        return p.resolve()
    names = [r.name for r in list_runs()]
    if spec in names:
        return (runs_dir() / spec).resolve()
    prefixed = [n for n in names if n.startswith(spec)]
    if len(prefixed) == 1:
        return (runs_dir() / prefixed[0]).resolve()
    raise ForgeError(f"No run {spec!r}.{did_you_mean(spec, names)} See `forge runs`.")


def new_run_dir(cfg: ForgeConfig, run_dir: str | Path | None = None, label: str = "") -> Path:
    if run_dir:
        run = Path(run_dir).expanduser().resolve()
    else:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label or Path(cfg.model.path).name).strip("-")[:40] or "run"
        run = runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    if (run / "config.toml").exists():
        raise ForgeError(f"{run} already holds a run; use --resume to continue it or pick another --run-dir.")
    run.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_config(
        cfg, run / "config.toml", header="# The resolved config this run trained; not edited after start."
    )
    write_status(run, state="created", name=run.name, created=now_iso())
    if run.parent != runs_dir().resolve():
        _link_into_runs_dir(run)
    return run


def _link_into_runs_dir(run: Path) -> None:
    """A run made with --run-dir elsewhere gets a link in the runs folder, so `forge runs` and the app list it."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{run.parent.name}-{run.name}").strip("-") or "run"
    for n in range(1, 1000):
        link = runs_dir() / (base if n == 1 else f"{base}-{n}")
        if link.is_symlink() and not link.exists():
            link.unlink()  # its run was deleted: the name is free again
        try:
            link.symlink_to(run, target_is_directory=True)
            return
        except FileExistsError:
            continue


def preflight(cfg: ForgeConfig) -> None:
    """Fail before launching, with file:line, rather than inside the detached trainer."""
    from assistant_forge.core.mixing import build_mix
    from assistant_forge.core.models import check_model_code, resolve_model

    if not cfg.data.files:
        raise ForgeError("The config lists no training data; set data.files.")
    # Converts and validates every source into the datasets cache, which the trainer then reuses.
    build_mix(cfg.data.files, cfg.data.general_files, cfg.data.columns, cfg.train.seed)
    check_model_code(resolve_model(cfg.model.path), cfg.model.path, cfg.model.trust_remote_code)
    if cfg.lora.method == "qlora":
        from assistant_forge.core.hardware import check_4bit_available

        check_4bit_available("", installed_only=True)
    n = cfg.train.processes
    if n > 1 and cfg.train.device != "cpu":
        import torch

        have = torch.cuda.device_count()
        if have < n:
            raise ForgeError(
                f"train.processes = {n} needs {n} CUDA GPUs, this machine has {have}"
                + ('; to run CPU processes set train.device = "cpu"' if not have else "")
                + "."
            )
    zero_preflight(cfg)


def zero_preflight(cfg: ForgeConfig) -> None:
    """A ZeRO stage needs processes to shard across, and DeepSpeed to do it."""
    stage = cfg.train.zero_stage
    if not stage:
        return
    if cfg.train.processes < 2:
        raise ForgeError(
            f"train.zero_stage = {stage} shards training state across processes; it needs "
            "train.processes (forge train --gpus N) of 2 or more."
        )
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ForgeError(
            f"train.zero_stage = {stage} needs DeepSpeed, which is not installed here; "
            "install it with pip install 'assistant-forge[multigpu]' (or pip install deepspeed)."
        )


def run_config(run: Path) -> ForgeConfig:
    return load_config(run / "config.toml")


# --- launching and stopping ---------------------------------------------------------------------


def trainer_command(run: Path, resume: bool, processes: int) -> list[str]:
    """The detached trainer's command: one Python process, or `processes` of them through torchrun."""
    args = ["-m", "assistant_forge.training", str(run)] + (["--resume"] if resume else [])
    if processes <= 1:
        return [sys.executable, *args]
    # --standalone: a private rendezvous on a free port, so two runs on one machine never meet.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *args,
    ]


def launch(run: Path, resume: bool = False) -> int:
    """Start the trainer in its own session, output to train.log; returns its pid at once."""
    if trainer_alive(run):
        pid = read_json(run / "status.json").get("pid")
        raise ForgeError(
            f"Run directory {run} is in use by a live trainer (pid {pid}); stop it first with `forge runs stop`."
        )
    if resume and not complete_checkpoints(run):
        raise ForgeError(f"Run {run.name} has no complete checkpoint to resume from.")
    cmd = trainer_command(run, resume, run_config(run).train.processes)
    # 'starting' is written before the trainer exists, so it can never overwrite the trainer's 'running'.
    write_status(run, state="starting", reason="", resumed=resume)
    with open(run / "train.log", "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(
            cmd,
            stdin=devnull,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=run,
            close_fds=True,
        )
    write_status(run, pid=proc.pid)
    return proc.pid


def stop(run: Path, wait_s: float = 60.0) -> dict:
    """Ask the trainer to save and stop (SIGTERM); returns the final status."""
    status = read_status(run)
    if status.get("state") not in LIVE_STATES:
        raise ForgeError(f"Run {run.name} is not running (state: {status.get('state', 'unknown')}).")
    pid = int(status["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return read_status(run)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and trainer_alive(run):
        time.sleep(0.2)
    return read_status(run)


# --- checkpoints and events ---------------------------------------------------------------------


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of checkpoints whose save finished, oldest first."""
    out = []
    for d in (run / "checkpoints").glob("checkpoint-*"):
        if (d / COMPLETE_MARKER).is_file() and d.name.split("-")[-1].isdigit():
            out.append((int(d.name.split("-")[-1]), d))
    return sorted(out)


def checkpoint_for(run: Path, step: int | None = None) -> Path:
    done = complete_checkpoints(run)
    if not done:
        raise ForgeError(f"Run {run.name} has no complete checkpoint yet.")
    if step is None:
        return done[-1][1]
    for s, d in done:
        if s == step:
            return d
    raise ForgeError(
        f"Run {run.name} has no complete checkpoint at step {step} (have: {', '.join(str(s) for s, _ in done)})."
    )


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a run's JSONL file (events, samples); a line still being written is not one yet."""
    return json_objects(FileTail(path).read_all_lines())


def follow_file(path: Path, run: Path, poll_s: float = 0.5) -> Iterator[str]:
    """Yield lines of a growing file until the run's trainer is gone and the file is drained."""
    tail = FileTail(path)
    while True:
        alive = _live(run, read_json(run / "status.json"))  # before reading: a dead trainer's file is whole
        lines = tail.read_all_lines()
        if not alive and (rest := tail.partial_line()):
            lines.append(rest)  # the trainer is gone: its unfinished last line is final
        for line in lines:
            yield from line.split("\r")  # tqdm redraws a line with \r: each redraw is printed as a line
        if not alive:
            return
        time.sleep(poll_s)
