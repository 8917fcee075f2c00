"""Row formats: recognise one parsed row and turn it into a messages record, or say why not.

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI format). Recognised rows:
OpenAI `messages`; ShareGPT `conversations` (from/value); Alpaca (instruction/input/output, optional
history); XTuner `conversation` (system/input/output); the oasst1/guanaco `text` form
(`### Human: … ### Assistant: …`, multi-turn); and a plain prompt/response pair, whose field names a
config can map (`data.columns = {prompt = "question", response = "answer", system = "sys"}`).
Every error names where the row came from (`file:line`, or `file: row N` for tables).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from assistant_forge.core.identity import find_placeholder
from assistant_forge.errors import ForgeError

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "sharegpt", "alpaca", "xtuner", "oasst1", "prompt_response")
COLUMN_KEYS = ("prompt", "response", "system")
DEFAULT_COLUMNS = {"prompt": "prompt", "response": "response", "system": "system"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
# The guanaco/oasst1 speaker markers. Splitting on the markers (not on every "###", as XTuner's
# oasst1_map_fn does) gives the same turns and keeps Markdown "### headings" inside an answer.
_OASST_MARKER = re.compile(r"###\s*(Human|Assistant):")


class DatasetError(ForgeError):
    """A dataset problem, located as file:line."""


def _short(value: Any) -> str:
    """A value quoted for an error message, cut short so the message stays one readable line."""
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {what} must be text, got {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800"-style escape
        raise DatasetError(f"{where}: {what} holds an invalid Unicode escape (a lone surrogate).") from None
    return value


def column_map(columns: Mapping[str, str] | None) -> dict[str, str]:
    """The prompt/response/system field names, defaults filled in; unknown keys are a config error."""
    out = dict(DEFAULT_COLUMNS)
    for k, v in (columns or {}).items():
        if k not in COLUMN_KEYS:
            raise DatasetError(f"data.columns: unknown key {k!r} (expected prompt, response or system).")
        out[k] = v
    return out


def detect_format(obj: Any, columns: Mapping[str, str] | None = None) -> str:
    if not isinstance(obj, dict):
        return "unknown"
    cols = column_map(columns)
    mapped = columns is not None and any(cols[k] != DEFAULT_COLUMNS[k] for k in COLUMN_KEYS)
    if mapped and cols["prompt"] in obj and cols["response"] in obj:
        return "prompt_response"  # named in the config: it wins over a guess
    # A Parquet/CSV table has every column in every row, null where a row has none: look at values.
    if obj.get("messages") is not None:
        return "messages"
    if obj.get("conversations") is not None:
        return "sharegpt"
    if obj.get("conversation") is not None:
        return "xtuner"
    if obj.get("instruction") is not None and "output" in obj:
        return "alpaca"
    if obj.get("text") is not None:
        return "oasst1"
    if cols["prompt"] in obj and cols["response"] in obj:
        return "prompt_response"
    return "unknown"


def to_messages(obj: Any, where: str, columns: Mapping[str, str] | None = None) -> tuple[str, dict]:
    """Convert one parsed row to a messages record; (format name, record)."""
    fmt = detect_format(obj, columns)
    if fmt == "oasst1":
        return fmt, {"messages": _oasst1(_text(obj["text"], where, "text"), where)}
    if fmt == "prompt_response":
        cols = column_map(columns)
        out = []
        if obj.get(cols["system"]):
            out.append({"role": "system", "content": _text(obj[cols["system"]], where, cols["system"])})
        out.append({"role": "user", "content": _text(obj[cols["prompt"]], where, cols["prompt"])})
        out.append({"role": "assistant", "content": _text(obj[cols["response"]], where, cols["response"])})
        return fmt, {"messages": out}
    if fmt == "messages":
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise DatasetError(f"{where}: 'messages' must be a list.")
        out = []
        for m in msgs:
            if not isinstance(m, dict):
                raise DatasetError(f"{where}: each message must be an object with role and content.")
            out.append(
                {
                    "role": _text(m.get("role"), where, "role"),
                    "content": _text(m.get("content"), where, "content"),
                }
            )
        return fmt, {"messages": out}
    if fmt == "sharegpt":
        conv = obj["conversations"]
        if not isinstance(conv, list):
            raise DatasetError(f"{where}: 'conversations' must be a list.")
        out = []
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            out.append({"role": "system", "content": obj["system"]})
        for m in conv:
            if not isinstance(m, dict):
                raise DatasetError(f"{where}: each conversation turn must be an object with from and value.")
            who = _text(m.get("from"), where, "'from'")
            role = _SHAREGPT_ROLES.get(who.lower())
            if role is None:
                raise DatasetError(f"{where}: unknown speaker {_short(who)} (expected human or gpt).")
            out.append({"role": role, "content": _text(m.get("value"), where, "'value'")})
        return fmt, {"messages": out}
    if fmt == "alpaca":
        out = []
        if obj.get("system"):
            out.append({"role": "system", "content": _text(obj["system"], where, "system")})
        history = obj.get("history") or []
        if not isinstance(history, list):
            raise DatasetError(f"{where}: alpaca 'history' must be a list of [question, answer] pairs.")
        for pair in history:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise DatasetError(f"{where}: each alpaca history entry must be [question, answer].")
            out += [
                {"role": "user", "content": _text(pair[0], where, "history")},
                {"role": "assistant", "content": _text(pair[1], where, "history")},
            ]
        instruction = _text(obj["instruction"], where, "instruction")
        extra = obj.get("input") or ""
        prompt = f"{instruction}\n\n{_text(extra, where, 'input')}" if extra else instruction
        out += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(obj["output"], where, "output")},
        ]
        return fmt, {"messages": out}
    if fmt == "xtuner":
        conv = obj["conversation"]
        if not isinstance(conv, list):
            raise DatasetError(f"{where}: 'conversation' must be a list.")
        out = []
        for turn in conv:
            if not isinstance(turn, dict):
                raise DatasetError(
                    f"{where}: each conversation turn must be an object with input and output."
                )
            if turn.get("system"):
                out.append({"role": "system", "content": _text(turn["system"], where, "system")})
            # XTuner's tables leave "input" empty (or null) for a turn that only continues the answer.
            out.append({"role": "user", "content": _text(turn.get("input") or "", where, "input")})
            out.append({"role": "assistant", "content": _text(turn.get("output"), where, "output")})
        return fmt, {"messages": out}
    if isinstance(obj, dict):
        seen = ", ".join(_short(k) for k in sorted(obj, key=str)[:8]) or "no fields"
    else:
        seen = f"a {type(obj).__name__}, not an object"
    raise DatasetError(
        f"{where}: unrecognised record ({seen}); expected messages, conversations, conversation, "
        "instruction/output, text (### Human:/### Assistant:) or prompt/response (data.columns maps other names)."
    )


def validate_record(rec: dict, where: str) -> None:
    """Raise DatasetError unless the record is a trainable conversation."""
    msgs = rec["messages"]
    if not msgs:
        raise DatasetError(f"{where}: the conversation is empty.")
    for i, m in enumerate(msgs):
        role = m["role"]
        if role not in ROLES:
            raise DatasetError(f"{where}: unknown role {_short(role)} (expected system, user or assistant).")
        if role == "system" and i != 0:
            raise DatasetError(f"{where}: a system message may only come first.")
        if not m["content"].strip():
            raise DatasetError(f"{where}: message {i + 1} ({role}) has empty content.")
        ph = find_placeholder(m["content"])
        if ph:
            raise DatasetError(
                f"{where}: leftover placeholder {ph[:60]} in message {i + 1}; fill it in before training."
            )
    if not any(m["role"] == "assistant" for m in msgs):
        raise DatasetError(
            f"{where}: the conversation has no assistant turn, so nothing would be learned from it."
        )


def _oasst1(text: str, where: str) -> list[dict]:
    """`### Human: q ### Assistant: a ...` as turns; a trailing question with no answer is dropped
    (XTuner's oasst1_map_fn does the same: nothing would be learned from it)."""
    parts = _OASST_MARKER.split(text)
    if len(parts) < 3:
        raise DatasetError(
            f"{where}: 'text' has no '### Human:' / '### Assistant:' markers, so it is not a conversation."
        )
    if parts[0].strip():
        raise DatasetError(
            f"{where}: 'text' has words before its first '### Human:' marker: {_short(parts[0])}."
        )
    out = [
        {"role": "user" if who == "Human" else "assistant", "content": said.strip()}
        for who, said in zip(parts[1::2], parts[2::2])
    ]
    if out[-1]["role"] == "user":
        out.pop()
    for a, b in zip(out, out[1:]):
        if a["role"] == b["role"]:
            raise DatasetError(f"{where}: 'text' has two '### {_SPEAKER[a['role']]}:' turns in a row.")
    return out


_SPEAKER = {"user": "Human", "assistant": "Assistant"}
