"""Turn conversations into token ids and labels with the preset's template (loss on assistant tokens only)."""

from __future__ import annotations

from typing import Any

from assistant_forge.core.templates import ChatTemplate

IGNORE = -100


def load_tokenizer(model_path: str, template: ChatTemplate, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer with the pipeline's template installed and a pad token set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    tok.chat_template = template.jinja
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_chat(tok: Any, template: ChatTemplate, messages: list[dict], max_length: int) -> dict | None:
    """input_ids and labels (-100 outside assistant turns), cut to max_length; None if no label is left."""
    out = tok.apply_chat_template(
        messages,
        chat_template=template.jinja,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])[:max_length]
    mask = list(out["assistant_masks"])[:max_length]
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def stop_token_ids(tok: Any, template: ChatTemplate) -> list[int]:
    """Token ids that end an assistant turn: the template's stop text and the tokenizer's eos."""
    ids = []
    stop = tok.convert_tokens_to_ids(template.stop)
    if isinstance(stop, int) and stop != tok.unk_token_id:
        ids.append(stop)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
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
