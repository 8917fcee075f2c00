"""Helpers for tests that run the real `forge` CLI and the detached trainer on the demo model (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FORGE = [sys.executable, "-m", "assistant_forge"]


def forge(*args: str, timeout: int = 600, env: dict | None = None, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FORGE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        **kw,
    )


def tiny_config(
    tmp: Path,
    max_steps: int,
    *,
    save_steps: int = 4,
    save_total_limit: int = 3,
    model: str = "demo",
    name: str = "cfg.toml",
    extra: str = "",
) -> Path:
    """The smallest real training: 16 identity chats, 64 tokens, LoRA r 4 on the top layers, one thread."""
    from assistant_forge.core.dataset import write_records
    from assistant_forge.core.identity import generate_identity_records

    if not (tmp / "data.jsonl").exists():
        write_records(
            generate_identity_records("Forgey", "Alice", langs=["en"], count=16), tmp / "data.jsonl"
        )
    (tmp / name).write_text(f"""
[model]
path = "{model}"
[data]
files = ["data.jsonl"]
max_length = 64
[lora]
method = "lora"
r = 4
alpha = 8
dropout = 0.0
layers_from = 26
[train]
max_steps = {max_steps}
micro_batch_size = 1
grad_accum = 1
learning_rate = 5e-4
save_steps = {save_steps}
save_total_limit = {save_total_limit}
optimizer = "adamw_torch"
gradient_checkpointing = false
cpu_threads = 1
[eval]
prompts = []
{extra}""")
    return tmp / name


def until_timeout(timeout: float, what: str) -> Iterator[None]:
    """Yields until `timeout` seconds have passed, then fails the test naming what it waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        yield
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    """Poll pred() until it returns something true, and return that. (In an app: tui/helpers.wait_in_app.)"""
    for _ in until_timeout(timeout, what):
        if value := pred():
            return value
        time.sleep(poll)


def final_losses(events: list[dict]) -> dict[int, float]:
    """step -> loss, the last event of each step winning (a resume re-trains the steps after its checkpoint)."""
    return {e["step"]: e["loss"] for e in events}


def stop_if_alive(run: Path) -> None:
    """Leave no trainer behind when a test fails half-way (they run detached, in their own sessions)."""
    import signal

    from assistant_forge.core.runs import read_json, trainer_alive

    if run.exists() and trainer_alive(run):
        pid = read_json(run / "status.json").get("pid")
        if pid:
            os.kill(int(pid), signal.SIGKILL)


def bench_cfg(seq: int, dropout: float, compiled: bool = False) -> Any:
    """The settings bench/gpu_train.py measures (and the peer runs): QLoRA r 64 on all projections,
    batch 1, paged AdamW 32-bit. compiled: forge's compiled layers (the measured eager rows: off)."""
    from assistant_forge.core.config import ForgeConfig

    cfg = ForgeConfig()
    cfg.data.max_length = seq
    cfg.lora.method, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = "qlora", 64, 16, dropout
    cfg.train.micro_batch_size = 1
    cfg.train.optimizer = "paged_adamw_32bit"
    cfg.train.compile_layers = compiled
    return cfg


def cache_as_hub_download(
    hf_home: Path, repo_id: str, splits: dict[str, list[dict]], config: str = "default"
) -> None:
    """Leave in HF_HOME what `datasets.load_dataset(repo_id)` leaves after downloading a Parquet dataset
    online: `<owner>___<name>/default/0.0.0/<revision>/` holding dataset_info.json and `<name>-<split>.arrow`.
    datasets' own Parquet builder writes the files; they are then moved to the hub dataset's place, the
    one place datasets 5.2 looks for `owner/name` when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo_id.split("/")
    raw = hf_home / "raw"
    raw.mkdir(parents=True)
    files = {}
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), raw / f"{split}.parquet")
        files[split] = [str(raw / f"{split}.parquet")]
    cache = hf_home / "datasets"
    builder = Parquet(cache_dir=str(cache), dataset_name=name, data_files=DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / config / "0.0.0" / "0123456789abcdef"
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    info = json.loads((target / "dataset_info.json").read_text(encoding="utf-8"))
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": config}), encoding="utf-8")
    shutil.rmtree(cache / name)
    shutil.rmtree(raw)
