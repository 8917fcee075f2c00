"""Turn conversations into token ids and labels with the pipeline's template (loss on assistant tokens only).

The tokenizer carries the template (`load_tokenizer` installs it), so everything here renders
exactly what the model's runtime renders. Which tokens carry loss is read off the rendering
itself: each assistant message is swapped for a marker, the template rendered again, and the
text between the markers must match the real rendering; the answer's characters, plus the
end-of-turn token the template writes right after it, are the labelled span. No hand-written copy
of the template with training markers exists to drift from the model's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from assistant_forge.core.templates import render, resolve
from assistant_forge.errors import ForgeError

IGNORE = -100
# A private-use character: not whitespace (templates `trim` answers), not escaped, never in real text.
_MARK = "\ue000forge{}\ue000"
_MARKS = re.compile("\ue000forge(\\d+)\ue000")


def load_tokenizer(model_path: str, template: str, trust_remote_code: bool = False, label: str = "") -> Any:
    """The model's tokenizer with the pipeline's template (`templates.resolve`) installed and a pad token set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    tok.chat_template = resolve(tok, template, label or model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans that carry loss: each answer and its end-of-turn text


def render_with_spans(tok: Any, messages: list[dict], specials: list[str] | None = None) -> Rendered:
    """The template's rendering of a conversation and where in it the assistant's answers lie.

    `specials`: the tokenizer's `_special_texts`, when the caller renders many conversations (Llama 3
    has 256; listing and sorting them was a sixth of encoding one conversation)."""
    text = render(tok, messages)
    marked = [
        {**m, "content": _MARK.format(i)} if m["role"] == "assistant" else m for i, m in enumerate(messages)
    ]
    pieces = _MARKS.split(render(tok, marked))  # [text, index, text, index, ..., text]
    if len(pieces) // 2 != sum(m["role"] == "assistant" for m in messages):
        raise _unmappable()
    specials = _special_texts(tok) if specials is None else specials
    pos = 0
    spans: list[tuple[int, int]] = []
    for k in range(0, len(pieces) - 1, 2):
        before, index, after = pieces[k], int(pieces[k + 1]), pieces[k + 2]
        if not text.startswith(before, pos):
            raise _unmappable()
        pos += len(before)
        content = str(messages[index]["content"])
        for shown in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            if text.startswith(shown + after, pos):
                break
        else:
            raise _unmappable()
        start, pos = pos, pos + len(shown)
        stop = next((s for s in specials if after.startswith(s)), "")
        spans.append((start, pos + len(stop)))
    return Rendered(text, spans)


def _unmappable() -> ForgeError:
    return ForgeError(
        "The chat template changes the assistant's text as it renders it, so forge cannot tell which "
        "tokens to train on; use a template that writes answers as given."
    )


def _special_texts(tok: Any) -> list[str]:
    """Special and added token texts, longest first (so `</s>` is not taken for `<`)."""
    texts = {str(t) for t in tok.all_special_tokens}
    texts |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    return sorted((t for t in texts if t), key=len, reverse=True)


def encode_chat(tok: Any, messages: list[dict], max_length: int) -> dict | None:
    """input_ids and labels (-100 outside assistant turns), cut to max_length; None if no label is left."""
    return encode_chats(tok, [messages], max_length)[0]


def encode_chats(tok: Any, conversations: list[list[dict]], max_length: int) -> list[dict | None]:
    """encode_chat for many conversations, tokenized in one call (the Rust tokenizer spreads a batch
    over its threads)."""
    specials = _special_texts(tok)
    rendered = [render_with_spans(tok, m, specials) for m in conversations]
    try:
        enc = tok([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ForgeError(
            "This tokenizer cannot map tokens to characters (a slow tokenizer); forge needs a fast one."
        ) from None
    out: list[dict | None] = []
    for r, all_ids, all_offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        ids = list(all_ids)[:max_length]
        labels = [
            t if carried else IGNORE for t, carried in zip(ids, _overlaps(all_offsets[:max_length], r.spans))
        ]
        out.append({"input_ids": ids, "labels": labels} if any(x != IGNORE for x in labels) else None)
    return out


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token's character range, whether it overlaps a span (both in text order): one pass."""
    out: list[bool] = []
    k = 0
    for s, e in offsets:
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        out.append(k < len(spans) and spans[k][0] < e and s < spans[k][1])
    return out


def end_of_turn(tok: Any) -> str | None:
    """The token text the template writes right after an answer (`<|im_end|>`, `<|eot_id|>`, `</s>`)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    r = render_with_spans(tok, messages)
    start, end = r.spans[0]
    return r.text[start + len("Hello") : end] or None


def stop_token_ids(tok: Any, extra: Any = None) -> list[int]:
    """Token ids that end an assistant turn: the template's end of turn, the eos, and any `extra` ids
    (a generation config's eos list: Llama 3.1 lists three, InternLM2 adds `<|im_end|>`)."""
    ids: list[int] = []
    stop = end_of_turn(tok)
    if stop is not None:
        sid = tok.convert_tokens_to_ids(stop)
        if isinstance(sid, int) and sid != tok.unk_token_id:
            ids.append(sid)
    more = extra if isinstance(extra, (list, tuple)) else [extra]
    for i in [tok.eos_token_id, *more]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


def render_loss_preview(tok: Any, sample: dict, mark: tuple[str, str] = ("[", "]")) -> str:
    """The templated text with the spans that carry loss wrapped in `mark` (what `xtuner log-dataset` shows)."""
    parts: list[str] = []
    run: list[int] = []
    in_loss = None
    for tid, label in zip(sample["input_ids"], sample["labels"]):
        now = label != IGNORE
        if in_loss is not None and now != in_loss:
            parts.append(_wrap(tok.decode(run), in_loss, mark))
            run = []
        run.append(tid)
        in_loss = now
    if run:
        parts.append(_wrap(tok.decode(run), bool(in_loss), mark))
    return "".join(parts)


def _wrap(text: str, loss: bool, mark: tuple[str, str]) -> str:
    return f"{mark[0]}{text}{mark[1]}" if loss else text
