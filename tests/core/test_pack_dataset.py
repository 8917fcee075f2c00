"""Tokenizing and packing through `datasets` give exactly the list path's rows, and are cached."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from assistant_forge.core.mixing import build_mix
from assistant_forge.training.data import encode_dataset, encode_records, length_stats, pack, pack_dataset

DATA = Path(__file__).parent.parent / "fixtures" / "data"
SOURCES = ["guanaco.jsonl", "sharegpt.json", "alpaca.json", "xtuner.jsonl", "messages.jsonl", "qa.tsv"]


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.mark.parametrize("max_length, packing", [(96, True), (256, True), (96, False)])
def test_datasets_path_equals_the_list_path(demo_tok, max_length, packing):
    mix, _ = build_mix([str(DATA / s) for s in SOURCES], [], None, seed=3)
    records = [{"messages": m} for m in mix["messages"]]
    expected = pack(encode_records(demo_tok, records, max_length), max_length, packing, seed=7)
    samples = encode_dataset(mix, demo_tok, max_length)
    rows = pack_dataset(samples, max_length, packing, seed=7)
    assert rows.to_list() == expected
    assert all(len(r["input_ids"]) <= max_length for r in rows)
    stats = length_stats(samples, max_length)
    assert stats["samples"] + stats["dropped"] == len(mix) == 15
    assert stats["samples"] == len(encode_records(demo_tok, records, max_length))


def test_a_second_run_reads_the_cache(demo_tok):
    mix, _ = build_mix([str(DATA / "guanaco.jsonl"), str(DATA / "alpaca.json")], [], None, seed=1)
    rows = pack_dataset(encode_dataset(mix, demo_tok, 128), 128, True, seed=1)
    packed_file = rows.cache_files[0]["filename"]
    assert Path(packed_file).name.startswith("forge-packed-")
    mtime = Path(packed_file).stat().st_mtime_ns
    t0 = time.perf_counter()
    again_mix, _ = build_mix([str(DATA / "guanaco.jsonl"), str(DATA / "alpaca.json")], [], None, seed=1)
    again = pack_dataset(encode_dataset(again_mix, demo_tok, 128), 128, True, seed=1)
    assert again.cache_files[0]["filename"] == packed_file and Path(packed_file).stat().st_mtime_ns == mtime
    assert again.to_list() == rows.to_list() and time.perf_counter() - t0 < 5
    other = pack_dataset(encode_dataset(again_mix, demo_tok, 128), 128, True, seed=2)
    assert other.cache_files[0]["filename"] != packed_file  # another seed, another order
