"""Real-shaped files of every format and every kind of source, read the way a new user would hand them in.

Fixtures in tests/fixtures/data/ are small hand-written files in each format (guanaco rows with
Chinese and multi-turn, ShareGPT with system/human/gpt, Alpaca with input and history, XTuner
conversation); Parquet files, folders and save_to_disk folders are written here with pyarrow and
`datasets` from those same rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assistant_forge.core.dataset import DatasetError, check_records, load_records
from assistant_forge.core.mixing import build_mix
from assistant_forge.core.sources import Source

DATA = Path(__file__).parent.parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own datasets cache: nothing read from or left in ~/.cache/huggingface."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _roles(rec: dict) -> list[str]:
    return [m["role"] for m in rec["messages"]]


def test_guanaco_text_rows_split_into_turns_like_xtuner():
    recs, stats = load_records(DATA / "guanaco.jsonl")
    assert dict(stats.formats) == {"oasst1": 4}
    assert _roles(recs[0]) == ["user", "assistant", "user", "assistant"]
    assert recs[0]["messages"][2]["content"].startswith("I didn't understand how pulling")
    assert recs[1]["messages"][3]["content"] == "外滩最适合晚上去，可以欣赏浦江两岸的夜景。"
    # A Markdown heading inside an answer stays in the answer (XTuner's split on "###" would drop it).
    assert recs[2]["messages"][1]["content"].startswith("### Steps\n1. Boil water.")
    assert "### Tips" in recs[2]["messages"][1]["content"]
    # A last question without an answer is dropped, as XTuner's oasst1_map_fn drops it.
    assert _roles(recs[3]) == ["user", "assistant"] and recs[3]["messages"][1]["content"] == "Paris."


def test_sharegpt_alpaca_xtuner_and_messages_fixtures():
    sg, s = load_records(DATA / "sharegpt.json")
    assert dict(s.formats) == {"sharegpt": 2}
    assert _roles(sg[0]) == ["system", "user", "assistant", "user", "assistant"]
    assert sg[1]["messages"][0] == {"role": "system", "content": "请用中文回答。"}
    al, s = load_records(DATA / "alpaca.json")
    assert dict(s.formats) == {"alpaca": 3}
    assert (
        al[1]["messages"][0]["content"]
        == "Translate the sentence into Chinese.\n\nThe weather is nice today."
    )
    assert _roles(al[2]) == ["user", "assistant", "user", "assistant"]
    xt, s = load_records(DATA / "xtuner.jsonl")
    assert dict(s.formats) == {"xtuner": 2}
    assert _roles(xt[0]) == ["system", "user", "assistant", "user", "assistant"]
    assert _roles(xt[1]) == ["user", "assistant"]  # an empty system is no system turn
    ms, s = load_records(DATA / "messages.jsonl")
    assert dict(s.formats) == {"messages": 2}


def test_prompt_response_rows_with_a_column_map(tmp_path):
    tsv, s = load_records(DATA / "qa.tsv")  # default names prompt/response, tab separated
    assert dict(s.formats) == {"prompt_response": 2} and tsv[1]["messages"][1]["content"] == "7"
    cols = {"prompt": "question", "response": "answer"}
    csv, s = load_records(DATA / "qa.csv", cols)
    assert [m["content"] for m in csv[1]["messages"]] == [
        'Say "hi", politely, in two lines.',
        "Hello,\nnice to meet you.",
    ]
    assert csv[2]["messages"][1]["content"] == "约两万一千公里。"
    p = tmp_path / "sys.jsonl"
    p.write_text(json.dumps({"q": "Hi", "a": "Hello!", "sys": "Be brief."}) + "\n")
    recs, _ = load_records(p, {"prompt": "q", "response": "a", "system": "sys"})
    assert _roles(recs[0]) == ["system", "user", "assistant"]


def test_an_unknown_row_names_its_place_and_the_fields_it_saw(tmp_path):
    with pytest.raises(
        DatasetError, match=r"qa\.csv: row 1: unrecognised record \('answer', 'id', 'question'\)"
    ):
        load_records(DATA / "qa.csv")
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps({"text": "### Human: hi### Assistant: hello"}) + "\n" + json.dumps({"body": "x"}) + "\n"
    )
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: unrecognised record \('body'\)"):
        load_records(p)
    p.write_text(json.dumps({"text": "just some pretraining text"}) + "\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: 'text' has no '### Human:'"):
        load_records(p)


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every column in every row (pyarrow takes the columns from the first row alone), null where missing.
    names = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows]), path)
    return path


def _jsonl_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def test_parquet_files_read_like_their_json(tmp_path):
    sharegpt = json.loads((DATA / "sharegpt.json").read_text(encoding="utf-8"))
    p = _parquet(tmp_path / "sg.parquet", sharegpt)  # nested list<struct<from,value>>, a null system
    assert load_records(p)[0] == load_records(DATA / "sharegpt.json")[0]
    g = _parquet(tmp_path / "g.parquet", _jsonl_rows("guanaco.jsonl"))
    assert load_records(g)[0] == load_records(DATA / "guanaco.jsonl")[0]


def test_a_downloaded_hub_folder_and_save_to_disk_folders(tmp_path):
    import datasets

    rows = _jsonl_rows("guanaco.jsonl")
    hub = tmp_path / "openassistant-guanaco"
    _parquet(hub / "data" / "train-00000-of-00002.parquet", rows[:2])
    _parquet(hub / "data" / "train-00001-of-00002.parquet", rows[2:])
    _parquet(hub / "data" / "test-00000-of-00001.parquet", rows[:1])
    assert check_records(Source(str(hub))).records == 4  # the train split by default
    assert check_records(Source(str(hub), split="test")).records == 1
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))  # one column: text
    assert load_records(saved)[0] == load_records(DATA / "guanaco.jsonl")[0]
    dd = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(dd))
    assert check_records(Source(str(dd), split="test")).records == 1
    with pytest.raises(DatasetError, match=r"no split 'validation' \(it has train, test\)"):
        check_records(Source(str(dd), split="validation"))


@pytest.mark.parametrize(
    "name, body, message",
    [
        (
            "bad.parquet",
            b"PAR1 this is not parquet",
            r"bad\.parquet: cannot be read as a Parquet file \(.+\)\.",
        ),
        ("bad.csv", b'a,b\n1,"2\n', r"bad\.csv: (cannot be read as a CSV file|row 1: unrecognised record)"),
        ("empty.csv", b"", r"empty\.csv: cannot be read as a CSV file"),
    ],
)
def test_bad_table_files_are_one_sentence(tmp_path, name, body, message):
    (tmp_path / name).write_bytes(body)
    with pytest.raises(DatasetError, match=message) as e:
        load_records(tmp_path / name)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_a_broken_save_to_disk_folder_is_one_sentence(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(_jsonl_rows("guanaco.jsonl")).save_to_disk(str(saved))
    for arrow in saved.glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(DatasetError, match=r"saved: cannot be read as a save_to_disk folder"):
        load_records(saved)


def test_mixing_caps_weights_dedups_and_follows_the_seed(tmp_path):
    own = tmp_path / "own.jsonl"
    shutil.copy(DATA / "messages.jsonl", own)
    general = _parquet(
        tmp_path / "general.parquet",
        [{"text": f"### Human: question {i}### Assistant: answer {i}"} for i in range(40)]
        + [{"text": "### Human: question 3### Assistant: answer 3"}]  # a duplicate
        + [{"text": "### Human: Who are you?### Assistant: I am Forgey, made by Alice."}],
    )
    mix, reports = build_mix([str(own)], [{"path": str(general), "max_rows": 10}], None, seed=1)
    assert [r.used for r in reports] == [2, 10] and reports[1].duplicates == 1 and reports[1].rows == 42
    assert len(mix) == 12
    again, _ = build_mix([str(own)], [{"path": str(general), "max_rows": 10}], None, seed=1)
    other, _ = build_mix([str(own)], [{"path": str(general), "max_rows": 10}], None, seed=2)
    assert again["messages"] == mix["messages"] and other["messages"] != mix["messages"]
    weighted, reports = build_mix([str(own)], [{"path": str(general), "ratio": 3}], None, seed=1)
    assert reports[1].used == 6 and len(weighted) == 8
    # A general conversation equal to one of yours is dropped as a duplicate (the messages row has a
    # system turn, so only an exact copy counts): identical conversations never appear twice.
    keys = [json.dumps(m) for m in weighted["messages"]]
    assert len(keys) == len(set(keys))


def test_hub_ids_parse_and_config_tables_resolve(tmp_path):
    from assistant_forge.core.config import load_config

    assert Source("hf:timdettmers/openassistant-guanaco").hub_id_and_split() == (
        "timdettmers/openassistant-guanaco",
        "train",
    )
    assert Source("hf:owner/name:test").hub_id_and_split() == ("owner/name", "test")
    (tmp_path / "c.toml").write_text(
        '[data]\nfiles = ["me.jsonl"]\ncolumns = {prompt = "question", response = "answer"}\n'
        'general_files = ["hf:timdettmers/openassistant-guanaco", {path = "g.parquet", max_rows = 5}]\n'
    )
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.data.files == [str(tmp_path / "me.jsonl")]
    assert cfg.data.general_files[0] == "hf:timdettmers/openassistant-guanaco"
    assert (
        cfg.data.general_files[1].path == str(tmp_path / "g.parquet")
        and cfg.data.general_files[1].max_rows == 5
    )
    (tmp_path / "bad.toml").write_text('[data]\ncolumns = {question = "q"}\n')
    with pytest.raises(DatasetError.__mro__[1], match=r"data\.columns.*unknown column role 'question'"):
        load_config(tmp_path / "bad.toml")
