"""Chat templates: the model's own where it ships one, else a family's official template.

One template drives the whole pipeline (training, sample answers, chat, merge, export). Where the
model's tokenizer ships a chat template, that template is the truth: forge renders it unchanged,
derives the tokens that carry loss from what it renders (`encoding.encode_chat`), and refuses a
named template that renders differently. The named ones are the families' official templates,
shipped as data in `chat_templates/`, for models that ship none (base models, bare conversions).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from assistant_forge.errors import ForgeError, did_you_mean, first_line

MODEL = "model"  # the model's own template
_FILES = ("chatml", "qwen2_5", "llama3_1", "mistral_v3", "internlm2_5", "yi_1_5")
# Names earlier forge versions wrote into configs and adapters.
ALIASES = {
    "qwen2": "qwen2_5",
    "llama3": "llama3_1",
    "mistral": "mistral_v3",
    "internlm2": "internlm2_5",
    "yi": "yi_1_5",
}
NAMES = (MODEL, *_FILES)

# Conversations a named template must render exactly as the model's own does before forge uses it.
PROBES: tuple[tuple[str, list[dict], bool], ...] = (
    (
        "user + assistant, no system",
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        False,
    ),
    (
        "system + user + assistant",
        [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7"},
        ],
        False,
    ),
    (
        "two turns",
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Why did the chicken cross the road?"},
        ],
        False,
    ),
    (
        "system + user, generation prompt",
        [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Summarise: the cat sat on the mat."},
        ],
        True,
    ),
    ("user, generation prompt", [{"role": "user", "content": "Who are you?"}], True),
)


def canonical(name: str) -> str:
    """The current name of a template name, or a one-sentence error listing the known ones."""
    name = ALIASES.get(name, name)
    if name not in NAMES:
        raise ForgeError(
            f"Unknown chat template {name!r}.{did_you_mean(name, list(NAMES))} Known: {', '.join(NAMES)} "
            f"({MODEL!r}: the model's own)."
        )
    return name


@cache
def shipped(name: str) -> str:
    """The Jinja text of a named (non-`model`) template."""
    name = canonical(name)
    if name == MODEL:
        raise ValueError("the model's own template is read from its tokenizer")
    return (resources.files("assistant_forge.core") / "chat_templates" / f"{name}.jinja").read_text(
        encoding="utf-8"
    )


def render(
    tok: Any, messages: list[dict], add_generation_prompt: bool = False, jinja: str | None = None
) -> str:
    """What the template (the tokenizer's own unless `jinja` is given) renders for a conversation."""
    return tok.apply_chat_template(
        messages,
        chat_template=jinja or tok.chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def own_template(tok: Any) -> str | None:
    """The chat template a tokenizer ships (the default one where it ships several)."""
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t or None


def first_difference(tok: Any, ours: str, theirs: str) -> str | None:
    """Where two templates render the probe conversations differently, in words; None if they agree."""
    for about, messages, gen in PROBES:
        try:
            a = render(tok, messages, gen, ours)
            b = render(tok, messages, gen, theirs)
        except Exception as e:  # a template may refuse a probe (e.g. roles it does not know)
            return f"{about}: rendering failed ({first_line(e)})"
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"{about}, at character {at}: the model's gives {b[at : at + 40]!r}, this one {a[at : at + 40]!r}"
    return None


def resolve(tok: Any, name: str, model_label: str) -> str:
    """The Jinja text the pipeline uses for this tokenizer, or a one-sentence refusal.

    `model` takes the model's own template. A named template is used where the model ships none,
    and where it ships one only if both render the probe conversations byte for byte alike (the
    model's own text is kept then, so saved tokenizers carry exactly what the model shipped).
    """
    name = canonical(name)
    own = own_template(tok)
    if name == MODEL:
        if own is None:
            named = ", ".join(n for n in NAMES if n != MODEL)
            raise ForgeError(
                f"Model {model_label} ships no chat template; set model.chat_template to one of {named}."
            )
        return own
    jinja = shipped(name)
    if own is None or own == jinja:
        return jinja
    diff = first_difference(tok, jinja, own)
    if diff is not None:
        raise ForgeError(
            f"Model {model_label} ships its own chat template and the {name!r} template renders differently "
            f'({diff}); set model.chat_template = "model" to train with the model\'s own.'
        )
    return own
