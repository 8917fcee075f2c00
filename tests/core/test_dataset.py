import json

import pytest

from assistant_forge.core.dataset import DatasetError, load_records, write_records

MESSAGES = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
SHAREGPT = {
    "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
    "system": "Be brief.",
}
ALPACA = {"instruction": "Hi", "input": "", "output": "Hello!", "system": "Be brief."}
XTUNER = {"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello!"}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "row", [MESSAGES, SHAREGPT, ALPACA, XTUNER], ids=["messages", "sharegpt", "alpaca", "xtuner"]
)
def test_every_format_converts_to_the_same_messages(tmp_path, row):
    recs, stats = load_records(_jsonl(tmp_path / "d.jsonl", [row]))
    assert recs == [MESSAGES]
    assert stats.records == 1


def test_json_array_and_multi_turn_alpaca_history(tmp_path):
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["2+2?", "4"]]}
    (tmp_path / "d.json").write_text(json.dumps([row, SHAREGPT]))
    recs, stats = load_records(tmp_path / "d.json")
    assert [m["role"] for m in recs[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert dict(stats.formats) == {"alpaca": 1, "sharegpt": 1}


def test_bom_crlf_and_chinese_are_fine(tmp_path):
    p = tmp_path / "d.jsonl"
    row = {
        "messages": [
            {"role": "user", "content": "你是谁？"},
            {"role": "assistant", "content": "我是小助手。"},
        ]
    }
    p.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row, ensure_ascii=False) + "\r\n").encode() * 2)
    recs, _ = load_records(p)
    assert len(recs) == 2 and recs[0]["messages"][1]["content"] == "我是小助手。"


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"messages": [}'], r"d.jsonl:1: malformed JSON"),
        (
            [json.dumps(MESSAGES), json.dumps({"messages": [{"role": "user", "content": "Hi"}]})],
            r"d.jsonl:2: .*no assistant turn",
        ),
        ([json.dumps({"messages": [{"role": "bot", "content": "Hi"}]})], r"d.jsonl:1: unknown role 'bot'"),
        (
            [
                json.dumps(
                    {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}
                )
            ],
            r"d.jsonl:1: message 1 \(user\) has empty content",
        ),
        (
            [
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "I am {{NAME}}."},
                        ]
                    }
                )
            ],
            r"leftover placeholder \{\{NAME\}\}",
        ),
        ([json.dumps({"messages": [{"role": "user", "content": 5}]})], r"content must be text"),
        ([json.dumps({"foo": 1})], r"unrecognised record"),
        ([json.dumps({"conversations": [{"from": "alien", "value": "x"}]})], r"unknown speaker 'alien'"),
        (["[1, 2"], r"d.jsonl:\d+: malformed JSON"),
    ],
)
def test_bad_records_fail_with_file_and_line(tmp_path, rows, message):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_records(p)


def test_invalid_utf8_empty_and_missing_files(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(json.dumps(MESSAGES).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DatasetError, match=r"bin.jsonl:2: not valid UTF-8"):
        load_records(tmp_path / "bin.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(DatasetError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")


def test_write_is_atomic_and_round_trips(tmp_path):
    out = tmp_path / "out.jsonl"
    write_records([MESSAGES], out)
    assert load_records(out)[0] == [MESSAGES]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind
