"""Chat records: load any common format, validate with file:line errors, write messages JSONL.

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI format). Readers accept
OpenAI messages, ShareGPT (`conversations` with from/value), Alpaca (instruction/input/output)
and XTuner (`conversation` with system/input/output), as a JSON array or JSON Lines.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant_forge.core.identity import find_placeholder
from assistant_forge.errors import ForgeError

ROLES = ("system", "user", "assistant")
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


class DatasetError(ForgeError):
    """A dataset problem, located as file:line."""


@dataclass
class DatasetStats:
    records: int = 0
    turns: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    chars: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "turns": dict(self.turns),
            "formats": dict(self.formats),
            "chars": self.chars,
        }


def _read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for a JSON array file or a JSON Lines file, in file order."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"Dataset file {path} does not exist.") from None
    except IsADirectoryError:
        raise DatasetError(f"Dataset path {path} is a folder, not a file.") from None
    except OSError as e:
        raise DatasetError(f"Dataset file {path} cannot be read: {e.strerror}.") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM is harmless; drop it
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not valid UTF-8 text.") from None
    stripped = text.lstrip()
    if not stripped:
        raise DatasetError(f"{path}: the file is empty.")
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: malformed JSON ({e.msg}).") from None
        except RecursionError:
            raise DatasetError(f"{path}: JSON nested too deeply.") from None
        except ValueError as e:  # e.g. an integer too long to convert
            raise DatasetError(f"{path}: malformed JSON ({_first_line(e)}).") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON array of records.")
        # Line numbers of array items are not tracked by json; report item positions instead.
        yield from ((i + 1, item) for i, item in enumerate(data))
        return
    # Only "\n" ends a JSON Lines record: str.splitlines() would also split inside strings at
    # U+2028, U+0085 and other characters JSON allows unescaped. A trailing "\r" (CRLF) is JSON whitespace.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: malformed JSON ({e.msg}).") from None
        except RecursionError:
            raise DatasetError(f"{path}:{n}: JSON nested too deeply.") from None
        except ValueError as e:  # e.g. an integer too long to convert
            raise DatasetError(f"{path}:{n}: malformed JSON ({_first_line(e)}).") from None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


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


def detect_format(obj: Any) -> str:
    if isinstance(obj, dict):
        if "messages" in obj:
            return "messages"
        if "conversations" in obj:
            return "sharegpt"
        if "conversation" in obj:
            return "xtuner"
        if "instruction" in obj and "output" in obj:
            return "alpaca"
    return "unknown"


def to_messages(obj: Any, where: str) -> tuple[str, dict]:
    """Convert one parsed row to a messages record; (format name, record)."""
    fmt = detect_format(obj)
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
            out.append({"role": "user", "content": _text(turn.get("input", ""), where, "input")})
            out.append({"role": "assistant", "content": _text(turn.get("output"), where, "output")})
        return fmt, {"messages": out}
    keys = ", ".join(_short(k) for k in sorted(obj)[:5]) if isinstance(obj, dict) else type(obj).__name__
    raise DatasetError(
        f"{where}: unrecognised record ({keys}); expected messages, conversations, conversation or instruction/output."
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


def load_records(path: str | Path) -> tuple[list[dict], DatasetStats]:
    """Read, convert and validate a dataset file; the first problem raises with file:line."""
    path = Path(path)
    stats = DatasetStats()
    records = []
    for line, obj in _read_rows(path):
        where = f"{path}:{line}"
        fmt, rec = to_messages(obj, where)
        validate_record(rec, where)
        records.append(rec)
        stats.records += 1
        stats.formats[fmt] += 1
        for m in rec["messages"]:
            stats.turns[m["role"]] += 1
            stats.chars += len(m["content"])
    if not records:  # "[]": as empty as an empty file
        raise DatasetError(f"{path}: the file holds no conversations.")
    return records, stats


def load_many(paths: list[str]) -> list[dict]:
    out: list[dict] = []
    for p in paths:
        out += load_records(p)[0]
    return out


def write_records(records: list[dict], path: str | Path) -> None:
    """Write messages JSONL atomically: a failure leaves any earlier file as it was."""
    from assistant_forge.core.fsutil import atomic_write_jsonl

    try:
        atomic_write_jsonl(Path(path), records)
    except OSError as e:
        raise DatasetError(f"Cannot write {path}: {e.strerror or e}.") from None
