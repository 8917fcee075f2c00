"""Hypothesis-generated bad input: datasets for `forge data convert` and config files.

Whatever the bytes, the outcome is a valid result or one clear ForgeError line, never another
exception, never a temp file left behind, and never a change to an output file that already existed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant_forge import cli
from assistant_forge.core.config import ForgeConfig, load_config, save_config
from assistant_forge.core.dataset import load_records
from assistant_forge.errors import ForgeError

FUZZ = settings(
    max_examples=int(os.environ.get("FORGE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- datasets -------------------------------------------------------------------------------------

KEYS = [
    "messages",
    "role",
    "content",
    "conversations",
    "from",
    "value",
    "system",
    "instruction",
    "input",
    "output",
    "history",
    "conversation",
    "weight",
    "",
]
ROLES = ["system", "user", "assistant", "human", "gpt", "tool", "function", "", "USER", "Assistant", "bot"]
ODD_TEXT = [
    "",
    " ",
    "\n",
    "\r\n",
    "\ufeff",
    "\u2028",
    "\u0085",
    "\x00",
    "{name}",
    "<NAME>",
    "名字",
    "😀",
    "\\",
    '"',
    "}{",
    "[[",
    "null",
]

text = st.one_of(st.text(max_size=30), st.sampled_from(ODD_TEXT), st.sampled_from(ROLES))
leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), text)
junk = st.recursive(
    leaf,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), kids, max_size=5)
    ),
    max_leaves=25,
)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES) | junk, "content": text | junk})
messages_record = st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | junk})
sharegpt_record = st.fixed_dictionaries(
    {
        "conversations": st.lists(
            st.fixed_dictionaries({"from": st.sampled_from(ROLES) | junk, "value": text | junk}), max_size=4
        )
        | junk
    },
    optional={"system": text | junk},
)
alpaca_record = st.fixed_dictionaries(
    {"instruction": text | junk, "output": text | junk},
    optional={"input": text | junk, "system": text | junk, "history": junk},
)
xtuner_record = st.fixed_dictionaries(
    {
        "conversation": st.lists(
            st.fixed_dictionaries(
                {"input": text | junk, "output": text | junk}, optional={"system": text | junk}
            ),
            max_size=3,
        )
        | junk
    }
)
good_record = st.just(
    {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am Forgey."},
        ]
    }
)
record = st.one_of(good_record, messages_record, sharegpt_record, alpaca_record, xtuner_record, junk)
# Plausible conversations (valid roles, any text): many of these convert, so the success path is fuzzed too.
turn_text = st.text(min_size=1, max_size=40) | st.sampled_from(ODD_TEXT)
plausible_record = st.builds(
    lambda system, pairs: {
        "messages": ([{"role": "system", "content": system}] if system else [])
        + [{"role": r, "content": c} for q, a in pairs for r, c in (("user", q), ("assistant", a))]
    },
    st.none() | turn_text,
    st.lists(st.tuples(turn_text, turn_text), min_size=1, max_size=3),
)


@st.composite
def dataset_bytes(draw: st.DrawFn) -> bytes:
    recs = draw(st.lists(plausible_record, min_size=1, max_size=4) | st.lists(record, max_size=6))
    ascii_only = draw(st.booleans())
    if draw(st.booleans()):
        body = json.dumps(recs, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 1])))
    else:
        body = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in recs)
    if draw(st.booleans()):
        body = body.replace("\n", "\r\n")
    if draw(st.integers(0, 7)) == 0:  # a lone surrogate: an escape in the file, or raw (invalid UTF-8) bytes
        body = body.replace('"content": "', '"content": "' + draw(st.sampled_from(["\\ud800", "\udfff"])), 1)
    if draw(st.integers(0, 9)) == 0:  # a huge message
        body = body.replace("I am Forgey.", "I am Forgey. " * draw(st.integers(1_000, 200_000)))
    if draw(st.integers(0, 9)) == 0:  # deeply nested junk
        depth = draw(st.integers(10, 100_000))
        body += "\n" + "[" * depth + "]" * draw(st.sampled_from([0, depth]))
    data = body.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8 here
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if data and draw(st.integers(0, 4)) == 0:  # truncated mid-write
        data = data[: draw(st.integers(0, len(data) - 1))]
    if draw(st.integers(0, 4)) == 0:  # stray bytes, often invalid UTF-8
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80", b"\x1b[2J", b"\r"]))
            + data[at:]
        )
    return data


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    # FORGE_DEBUG: an exception that is not a ForgeError escapes (and fails the test) instead of being printed.
    with (
        mock.patch.dict(os.environ, {"FORGE_DEBUG": "1"}),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(err: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 500, err[:2000]


PREVIOUS = (
    b'{"messages": [{"role": "user", "content": "kept"}, {"role": "assistant", "content": "as it was"}]}\n'
)


def test_convert_fuzzed_datasets_never_crashes_nor_leaves_partial_output():
    counts = {"examples": 0, "converted": 0, "refused": 0}

    @FUZZ
    @given(data=dataset_bytes())
    def prop(data: bytes) -> None:
        counts["examples"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            src, dest = Path(tmp, "in.jsonl"), Path(tmp, "out.jsonl")
            src.write_bytes(data)
            dest.write_bytes(PREVIOUS)
            code, _, err = run_cli("data", "convert", str(src), "-o", str(dest))
            assert sorted(os.listdir(tmp)) == ["in.jsonl", "out.jsonl"]  # no temp file left behind
            if code == 0:
                counts["converted"] += 1
                # A valid result: it reads back as exactly the records the input held.
                assert load_records(dest)[0] == load_records(src)[0]
                assert run_cli("data", "check", str(dest))[0] == 0
            else:
                counts["refused"] += 1
                assert code == 2
                assert_one_error_line(err)
                assert dest.read_bytes() == PREVIOUS  # the existing output is untouched

    prop()
    print(f"\nfuzzed datasets: {counts}")
    assert counts["examples"] >= FUZZ.max_examples // 2 and counts["converted"] and counts["refused"]


def test_convert_to_an_unwritable_output_is_one_error_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(PREVIOUS)
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "keep.txt").write_text("kept")
    code, _, err = run_cli("data", "convert", str(src), "-o", str(tmp_path / "outdir"))
    assert code == 2
    assert_one_error_line(err)
    assert sorted(os.listdir(tmp_path / "outdir")) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "outdir"]


def test_valid_records_round_trip_through_convert(tmp_path):
    """Text JSON allows unescaped (U+2028, U+0085, CR, BOM inside strings) survives convert unchanged."""
    odd = "line\u2028sep\u0085next\rcr\ufeffbom\x0bvt\x1cfs"
    rec = {"messages": [{"role": "user", "content": odd}, {"role": "assistant", "content": odd + "!"}]}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    assert run_cli("data", "convert", str(src), "-o", str(tmp_path / "out.jsonl"))[0] == 0
    assert load_records(tmp_path / "out.jsonl")[0] == [rec]


# --- configs ----------------------------------------------------------------------------------------

SECTIONS = {name: list(field.annotation.model_fields) for name, field in ForgeConfig.model_fields.items()}
section_name = st.sampled_from([*SECTIONS, "modle", "", "train.extra"])
toml_leaf = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["demo", "chatml", "lora", "qlora", "cosine", "~nosuchuser/x", "a\x00b", "/"]),
)
toml_value = st.recursive(
    toml_leaf,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=10,
)


@st.composite
def config_bytes(draw: st.DrawFn) -> bytes:
    raw: dict = {}
    for name in draw(st.lists(section_name, max_size=5)):
        keys = SECTIONS.get(name, []) + ["typo_key"]
        raw[name] = draw(st.dictionaries(st.sampled_from(keys), toml_value, max_size=4))
    try:
        text = tomli_w.dumps(raw)
    except Exception:  # values TOML cannot hold (NUL in a key...): write the junk by hand
        text = repr(raw)
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    if draw(st.integers(0, 9)) == 0:
        depth = draw(st.integers(10, 50_000))
        text += f"\n[junk]\nx = {'[' * depth}{']' * depth}\n"
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if data and draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data) - 1))]
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at]
            + draw(st.sampled_from([b"\xff", b"\x00", b"=", b"[", b'"', b"\n[model]\n"]))
            + data[at:]
        )
    return data


def test_fuzzed_configs_load_or_fail_with_one_clear_sentence():
    counts = {"examples": 0, "loaded": 0, "refused": 0}

    @FUZZ
    @given(data=config_bytes())
    def prop(data: bytes) -> None:
        counts["examples"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "cfg.toml")
            path.write_bytes(data)
            try:
                cfg = load_config(path)
            except ForgeError as e:
                counts["refused"] += 1
                assert "\n" not in str(e) and len(str(e)) < 500, str(e)[:2000]
                return
            counts["loaded"] += 1
            # A valid result: it saves and loads back to the same config.
            save_config(cfg, Path(tmp, "again.toml"))
            assert load_config(Path(tmp, "again.toml")) == cfg
            assert sorted(os.listdir(tmp)) == ["again.toml", "cfg.toml"]

    prop()
    print(f"\nfuzzed configs: {counts}")
    assert counts["examples"] >= FUZZ.max_examples // 2 and counts["loaded"] and counts["refused"]
