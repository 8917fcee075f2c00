"""A conversation as editable plain text, one `role: content` block per message.

    user: Who are you?
    assistant: I am Forgey,
    made by Alice.

A line that starts with `system:`, `user:` or `assistant:` (an ASCII or full-width colon) opens
a message; any other line continues the previous one. Validation stays in core.dataset.
"""

from __future__ import annotations

import re

ROLE_LINE = re.compile(r"^(system|user|assistant)\s*[:：]\s?(.*)$", re.IGNORECASE)


class ConversationTextError(ValueError):
    pass


def to_text(record: dict) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in record.get("messages", []))


def from_text(text: str) -> dict:
    messages: list[dict] = []
    for n, line in enumerate(text.splitlines(), 1):
        m = ROLE_LINE.match(line)
        if m:
            messages.append({"role": m.group(1).lower(), "content": m.group(2)})
        elif messages:
            messages[-1]["content"] += "\n" + line
        elif line.strip():
            raise ConversationTextError(f"line {n}: start a message with 'user:', 'assistant:' or 'system:'.")
    for msg in messages:
        msg["content"] = msg["content"].strip()
    return {"messages": messages}


def preview(record: dict, role: str, width: int = 60) -> str:
    """The first message of `role`, on one line, cut to `width` terminal cells."""
    text = next((m["content"] for m in record.get("messages", []) if m["role"] == role), "")
    from rich.text import Text

    t = Text(" ".join(text.split()))
    t.truncate(width, overflow="ellipsis")  # by terminal cells: Chinese characters are two wide
    return t.plain
