"""A real tiny training whose data mixes identity JSONL, a hub dataset (offline, from the datasets cache)
and a Parquet file, through `forge train` as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from forge_testing import cache_as_hub_download, forge, tiny_config

from assistant_forge.core.runs import read_status

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent.parent / "fixtures" / "data"


def test_train_on_identity_data_mixed_with_hub_and_parquet_sources(tmp_path, demo_path):
    guanaco = [json.loads(x) for x in (DATA / "guanaco.jsonl").read_text(encoding="utf-8").splitlines()]
    cache_as_hub_download(tmp_path / "hf", "timdettmers/openassistant-guanaco", {"train": guanaco})
    pq.write_table(
        pa.Table.from_pylist([{"question": f"What is {i} + {i}?", "answer": f"{2 * i}."} for i in range(40)]),
        tmp_path / "sums.parquet",
    )
    cfg = tiny_config(tmp_path, max_steps=3)
    cfg.write_text(
        cfg.read_text().replace(
            'files = ["data.jsonl"]\n',
            'files = ["data.jsonl"]\ncolumns = {prompt = "question", response = "answer"}\n'
            'general_files = [{path = "hf:timdettmers/openassistant-guanaco", max_rows = 3}, '
            '{path = "sums.parquet", ratio = 0.5}]\n',
        )
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    check = forge("data", "check", str(cfg), "--no-tokens", env=env)
    assert check.returncode == 0, check.stderr
    assert "general hf:timdettmers/openassistant-guanaco:train: 4 conversations OK, 3 used" in check.stdout
    run = tmp_path / "run"
    proc = forge("train", str(cfg), "--run-dir", str(run), env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert read_status(run)["state"] == "finished"
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "data: hf:timdettmers/openassistant-guanaco:train: 3 of 4 conversations" in log
    assert f"data: {tmp_path / 'sums.parquet'}: 8 of 40 conversations" in log  # 16 identity chats x 0.5
    assert "27 conversations" in log  # 16 + 3 + 8
