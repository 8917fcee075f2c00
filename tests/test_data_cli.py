"""`forge data check|convert` as a user runs them (real subprocesses): hub ids from an offline cache,
a config's mixed sources with token lengths, and bad input as one line with nothing written half."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from forge_testing import cache_as_hub_download, forge

DATA = Path(__file__).parent / "fixtures" / "data"
GUANACO = [json.loads(line) for line in (DATA / "guanaco.jsonl").read_text(encoding="utf-8").splitlines()]


def _env(tmp: Path, offline: bool = True) -> dict:
    env = {"HF_HOME": str(tmp / "hf")}
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def test_hub_dataset_loads_offline_from_the_datasets_cache(tmp_path):
    cache_as_hub_download(
        tmp_path / "hf", "timdettmers/openassistant-guanaco", {"train": GUANACO, "test": GUANACO[:1]}
    )
    env = _env(tmp_path)
    proc = forge("data", "check", "hf:timdettmers/openassistant-guanaco", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hf:timdettmers/openassistant-guanaco: 4 conversations OK")
    assert "formats: oasst1 4" in proc.stdout
    proc = forge("data", "check", "hf:timdettmers/openassistant-guanaco:test", env=env)
    assert proc.returncode == 0 and ": 1 conversations OK" in proc.stdout, proc.stderr
    out = tmp_path / "guanaco.jsonl"
    proc = forge("data", "convert", "hf:timdettmers/openassistant-guanaco", "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[1])["messages"][3]["content"].startswith(
        "外滩"
    )
    err = _one_error_line(forge("data", "check", "hf:timdettmers/openassistant-guanaco:validation", env=env))
    assert "Unknown split" in err and "validation" in err
    # A second configuration (subset) of a dataset, chosen with --hf-config.
    cache_as_hub_download(tmp_path / "hf", "someone/multi", {"train": GUANACO[:2]}, config="zh")
    cache_as_hub_download(tmp_path / "hf", "someone/multi", {"train": GUANACO[:3]}, config="en")
    proc = forge("data", "check", "hf:someone/multi", "--hf-config", "zh", env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("hf:someone/multi: 2 conversations OK"), (
        proc.stderr
    )
    err = _one_error_line(forge("data", "check", "hf:someone/multi", "--hf-config", "fr", env=env))
    assert (
        "hf:someone/multi (fr):train: no configuration 'fr' in the local datasets cache (it has en, zh)"
        in err
    )
    err = _one_error_line(forge("data", "check", "hf:someone/never-downloaded", env=env))
    assert "hf:someone/never-downloaded:train is not in the local datasets cache" in err
    assert str(tmp_path / "hf" / "datasets") in err


def test_check_a_config_mixes_its_sources_and_measures_tokens(tmp_path, demo_path):
    shutil.copy(DATA / "messages.jsonl", tmp_path / "me.jsonl")
    general = [
        {"text": f"### Human: Tell me fact {i}.### Assistant: Fact {i} is {'very ' * i}true."}
        for i in range(30)
    ]
    general.append(general[0])  # a duplicate
    pq.write_table(pa.Table.from_pylist(general), tmp_path / "general.parquet")
    (tmp_path / "c.toml").write_text(
        f'[model]\npath = "{demo_path}"\n[data]\nfiles = ["me.jsonl"]\nmax_length = 64\n'
        'general_files = [{path = "general.parquet", max_rows = 20}, "qa.csv"]\n'
        'columns = {prompt = "question", response = "answer"}\n'
    )
    shutil.copy(DATA / "qa.csv", tmp_path / "qa.csv")
    proc = forge("data", "check", str(tmp_path / "c.toml"), env=_env(tmp_path, offline=False))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"data {tmp_path / 'me.jsonl'}: 2 conversations OK, 2 used (formats: messages 2)"
    assert lines[1].startswith(
        f"general {tmp_path / 'general.parquet'}: 31 conversations OK, 20 used, 1 duplicates"
    )
    assert lines[2].endswith("3 conversations OK, 3 used (formats: prompt_response 3)")
    assert lines[3] == "total: 25 conversations"
    assert lines[4].startswith(f"tokens ({demo_path}, max_length 64): ")
    kept = int(lines[4].split("): ")[1].split()[0])
    truncated, dropped = (
        int(w) for w in re.findall(r"truncates (\d+) samples .* in (\d+) \(dropped\)", lines[5])[0]
    )
    # The "very very ..." answers grow past max_length: some are cut (the longest may lose every answer token).
    assert kept + dropped == 25 and truncated > 0 and kept > truncated
    assert len(lines) == 6 + 10 and all("-" in h for h in lines[6:])  # a 10-bin text histogram
    proc = forge(
        "data", "check", str(tmp_path / "c.toml"), "--json", "--no-tokens", env=_env(tmp_path, offline=False)
    )
    out = json.loads(proc.stdout)
    assert [s["used"] for s in out["sources"]] == [2, 20, 3] and "tokens" not in out


def test_bad_files_of_each_kind_are_one_line_and_nothing_is_written_half(tmp_path):
    env = _env(tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "bad.csv").write_text('question,answer\n"unclosed,x\n')
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "late.jsonl").write_text(
        (DATA / "messages.jsonl").read_text(encoding="utf-8")
        + '{"messages": [{"role": "user", "content": "?"}]}\n'
    )
    for source, expected in [
        ("bad.parquet", "cannot be read as a Parquet file"),
        ("bad.csv", "cannot be read as a CSV file"),
        ("empty_folder", "the folder holds no data files"),
        ("late.jsonl", "late.jsonl:3: the conversation has no assistant turn"),
        ("missing.parquet", "does not exist"),
    ]:
        assert expected in _one_error_line(forge("data", "check", str(tmp_path / source), env=env)), source
    out = tmp_path / "out.jsonl"
    out.write_text("kept\n")
    before = sorted(os.listdir(tmp_path))
    err = _one_error_line(forge("data", "convert", str(tmp_path / "late.jsonl"), "-o", str(out), env=env))
    assert "late.jsonl:3" in err
    assert out.read_text() == "kept\n" and sorted(os.listdir(tmp_path)) == before  # no temp file left


def test_the_scale_benchmark_runs_small(tmp_path):
    """bench/data_scale.py --check: 2k conversations cold then warm; the warm run reuses the cache."""
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "data_scale.py"), "--check", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["run"] for r in runs] == ["cold", "warm"]
    assert runs[0]["conversations"] == runs[1]["conversations"] == 2000
    assert runs[1]["tokenize_s"] < runs[0]["tokenize_s"] and runs[0]["rows"] == runs[1]["rows"] > 0


def test_preview_reads_a_csv_with_a_column_map(tmp_path, demo_path):
    proc = forge(
        "data", "preview", str(DATA / "qa.csv"), "--preset", "demo-cpu-lora", "-n", "3",
        "--column", "prompt=question", "--column", "response=answer", env=_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- sample") == 3
    assert "[[约两万一千公里。" in proc.stdout  # the answer carries loss, the question does not
    assert "[[长城有多长" not in proc.stdout
