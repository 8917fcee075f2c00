"""Identity data: question banks, answer styles and generic prompts shipped in sample_data/.

The banks are split once, in the data files, into a train part and a held-out part. Training
records come only from the train part; evaluation asks only held-out questions, so the identity
rate it reports is about phrasings the model never saw. No torch or textual here.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from assistant_forge.errors import ForgeError, did_you_mean
from assistant_forge.paths import bundled

LANGS: tuple[str, ...] = ("en", "zh")
# Common spellings people type for a language, to point them at the code we use.
_LANG_ALIASES = {
    "english": "en",
    "eng": "en",
    "en-us": "en",
    "en_us": "en",
    "en-gb": "en",
    "chinese": "zh",
    "cn": "zh",
    "zh-cn": "zh",
    "zh_cn": "zh",
    "zh-hans": "zh",
    "中文": "zh",
    "mandarin": "zh",
}

# Placeholders that betray an unfilled template. Kept specific (known field words, upper-case
# markers) so that ordinary text and most code in user datasets does not trip them.
_FIELD_WORDS = (
    r"name|author|facts?|assistant[ _-]?name|bot[ _-]?name|model[ _-]?name|creator|developer|company|owner"
    r"|名字|名称|作者|开发者|助手名"
)
_UPPER_WORDS = r"NAME|AUTHOR|FACTS?|ASSISTANT[ _-]?NAME|BOT[ _-]?NAME|MODEL[ _-]?NAME|CREATOR|DEVELOPER|名字|名称|作者|开发者"
_PLACEHOLDER_RES = (
    re.compile(r"\{\{\s*[A-Za-z_\u4e00-\u9fff][\w.|\s\u4e00-\u9fff]*\}\}"),  # {{name}}, {{ user.name }}
    re.compile(r"\$?\{\s*(?:" + _FIELD_WORDS + r")\s*\}", re.IGNORECASE),  # {name}, ${author}
    re.compile(r"<\s*(?:" + _UPPER_WORDS + r")\s*>"),  # <NAME>
    re.compile(r"\[\s*(?:" + _UPPER_WORDS + r")\s*\]"),  # [AUTHOR]
    re.compile(r"%\(\s*(?:name|author|facts?)\s*\)s"),  # %(name)s
    re.compile(r"【\s*(?:" + _FIELD_WORDS + r")\s*】", re.IGNORECASE),  # 【名字】
)
_FIELD_RE = re.compile(r"\{(name|author|facts)\}")
_SENTENCE_RE = re.compile(r"[^.!?;。！？；]+(?:[.!?;。！？；]+|$)")


@dataclass(frozen=True)
class IdentityQuestion:
    text: str
    lang: str
    asks_author: bool
    kind: str = ""


# Categories of the held-out prompts (sample_data/eval_prompts.jsonl). A compound prompt asks the
# assistant's name and a checkable task at once: its answer must hold both.
EVAL_CATEGORIES: tuple[str, ...] = ("fact", "creative", "naming", "recommend", "instruct", "compound")
COMPOUND = "compound"
# The held-out prompts come in two splits: `dev` to tune recipes on, `test` to report (never tuned on).
EVAL_SPLITS: tuple[str, ...] = ("dev", "test")


@dataclass(frozen=True)
class GenericPrompt:
    prompt: str
    lang: str
    topic: str  # held-out prompts: one of EVAL_CATEGORIES
    # Accepted answer keywords for fact/math prompts (any one counts); empty when open-ended.
    expect: tuple[str, ...] = ()
    # Compound prompts: the task asked alone, so the base model's own answer to it can be checked.
    task: str = ""


def find_placeholder(text: str) -> str | None:
    """The first unfilled template placeholder in `text` (`{name}`, `{{author}}`, `<NAME>`...), or None."""
    found = [m for rx in _PLACEHOLDER_RES if (m := rx.search(text))]
    if not found:
        return None
    return min(found, key=lambda m: m.start()).group(0)


# ---------------------------------------------------------------------------------------------
# Shipped data


def _data_dir() -> Path:
    return bundled("sample_data")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A bundled JSONL file; a broken line fails loudly with its line number (jsonlines)."""
    import jsonlines

    with jsonlines.open(path) as reader:
        return list(reader.iter(type=dict, skip_empty=True))


@cache
def _questions(lang: str) -> tuple[tuple[IdentityQuestion, str], ...]:
    """(question, split) pairs for a language, in file order."""
    rows = _read_jsonl(_data_dir() / "identity" / f"questions_{lang}.jsonl")
    return tuple(
        (IdentityQuestion(r["text"], lang, bool(r["asks_author"]), r.get("kind", "")), r["split"])
        for r in rows
    )


@cache
def _styles() -> dict[str, dict[str, tuple[str, ...]]]:
    raw = json.loads((_data_dir() / "identity" / "answer_styles.json").read_text(encoding="utf-8"))
    return {
        lang: {group: tuple(templates) for group, templates in groups.items()}
        for lang, groups in raw.items()
        if not lang.startswith("_")
    }


@cache
def _generic() -> tuple[tuple[GenericPrompt, str], ...]:
    # Replay prompts and held-out evaluation prompts live in separate files, written separately, so
    # that no evaluation prompt is a rewording of one the model trained on (tests/core/test_identity.py).
    rows = _read_jsonl(_data_dir() / "generic_prompts.jsonl")
    rows += _read_jsonl(_data_dir() / "eval_prompts.jsonl")  # split: dev or test
    return tuple(
        (
            GenericPrompt(
                r["prompt"], r["lang"], r.get("topic", ""), tuple(r.get("expect") or ()), r.get("task", "")
            ),
            r["split"],
        )
        for r in rows
    )


@cache
def _tasks() -> tuple[tuple[str, str, str], ...]:
    """(lang, prompt, answer): ordinary tasks with written answers, for mixed identity records (train only)."""
    rows = _read_jsonl(_data_dir() / "identity" / "tasks.jsonl")
    return tuple((r["lang"], r["prompt"], r["answer"]) for r in rows)


def task_prompts() -> list[str]:
    """The tasks mixed into identity records (none of them is a held-out evaluation prompt)."""
    return [prompt for _, prompt, _ in _tasks()]


def answer_styles(lang: str, group: Literal["intro", "creator"] = "intro") -> list[str]:
    """The raw answer templates of a language (with `{name}`, `{author}`, optional `{facts}`)."""
    return list(_styles()[_check_lang(lang)][group])


def train_questions(lang: str) -> list[IdentityQuestion]:
    """Questions that training records may use."""
    return [q for q, split in _questions(_check_lang(lang)) if split == "train"]


def heldout_questions(lang: str) -> list[IdentityQuestion]:
    """Questions never used for training; evaluation asks only these."""
    return [q for q, split in _questions(_check_lang(lang)) if split == "heldout"]


def generic_prompt_records(
    split: Literal["replay", "heldout", "dev", "test"], langs: Sequence[str] | None = None
) -> list[GenericPrompt]:
    """Generic prompts with their language, topic and expected keywords; `heldout` is dev and test."""
    if split not in ("replay", "heldout", *EVAL_SPLITS):
        raise ForgeError(f"Unknown prompt split {split!r}; use 'replay', 'heldout', 'dev' or 'test'.")
    splits = EVAL_SPLITS if split == "heldout" else (split,)
    wanted = None if langs is None else set(check_langs(langs))
    return [p for p, s in _generic() if s in splits and (wanted is None or p.lang in wanted)]


def generic_prompts(split: Literal["replay", "heldout", "dev", "test"]) -> list[str]:
    """Unrelated prompts: `replay` ones feed the forgetting guard, `heldout` ones measure leakage."""
    return [p.prompt for p in generic_prompt_records(split)]


# ---------------------------------------------------------------------------------------------
# Validation


def _check_lang(lang: str) -> str:
    if lang in LANGS:
        return lang
    alias = _LANG_ALIASES.get(str(lang).strip().lower())
    hint = f" Did you mean {alias!r}?" if alias else did_you_mean(str(lang), list(LANGS))
    raise ForgeError(f"Unknown language {lang!r}; choose from {', '.join(LANGS)}.{hint}")


def check_langs(langs: Sequence[str]) -> list[str]:
    if isinstance(langs, str):  # "en" would otherwise iterate as "e", "n"
        langs = (langs,)
    out: list[str] = []
    for lang in langs:
        if _check_lang(lang) not in out:
            out.append(lang)
    if not out:
        raise ForgeError(f"Choose at least one language from {', '.join(LANGS)}.")
    return out


def check_identity_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ForgeError(f"The assistant's {what} must not be empty.")
    text = value.strip()
    if any(c in text for c in "\r\n\t") or not text.isprintable():
        raise ForgeError(f"The assistant's {what} must be a single line of printable text.")
    if (ph := find_placeholder(text)) is not None:
        raise ForgeError(f"The assistant's {what} {text!r} looks like an unfilled placeholder ({ph}).")
    return text


def _check_facts(facts: Sequence[str]) -> list[str]:
    if isinstance(facts, str):  # one fact given as a bare string
        facts = (facts,)
    out = []
    for fact in facts:
        if not isinstance(fact, str):
            raise ForgeError(f"Persona facts must be text, got {fact!r}.")
        fact = " ".join(fact.split())  # facts go into one-line answers
        if not fact:
            continue
        if (ph := find_placeholder(fact)) is not None:
            raise ForgeError(f"The persona fact {fact!r} contains an unfilled placeholder ({ph}).")
        out.append(fact)
    return out


# ---------------------------------------------------------------------------------------------
# Formatting


def _as_sentence(fact: str) -> str:
    """End a fact with a full stop so it reads as its own sentence after the introduction.

    The stop follows the fact's own script, not the answer's: an English fact in a Chinese
    answer ends with ".", a Chinese one with "。".
    """
    if fact[-1] in ".!?。！？…)）\"'”":
        return fact
    return fact + ("。" if "\u3000" <= fact[-1] <= "\u9fff" or "\uff00" <= fact[-1] <= "\uffef" else ".")


def _fill(template: str, values: dict[str, str]) -> str:
    # One regex pass: a name that happens to contain "{author}"-like text is never re-expanded.
    text = _FIELD_RE.sub(lambda m: values[m.group(1)], template).strip()
    for value in values.values():
        if value.endswith(".") and not value.endswith(".."):  # "by Acme Inc.." -> "by Acme Inc."
            text = text.replace(value + ".", value)
    return text


def _template_sentences(template: str) -> list[str]:
    """Split a template (not the filled text, so a name like 'Dr. Who' stays whole) into sentences."""
    return [s.strip() for s in _SENTENCE_RE.findall(template) if s.strip() and s.strip() != "{facts}"]


def _answer(template: str, name: str, author: str, facts: list[str], rng: random.Random) -> str:
    fact = _as_sentence(rng.choice(facts)) if "{facts}" in template else ""
    return _fill(template, {"name": name, "author": author, "facts": fact})


def _pool(lang: str, asks_author: bool, with_facts: bool) -> list[str]:
    groups = _styles()[lang]
    # Creator questions also draw intro styles: every style names the author.
    templates = list(groups["creator"]) + list(groups["intro"]) if asks_author else list(groups["intro"])
    return [t for t in templates if with_facts or "{facts}" not in t]


def generate_identity_records(
    name: str,
    author: str,
    langs: Sequence[str] = LANGS,
    count: int | None = None,
    facts: Sequence[str] = (),
    seed: int = 0,
) -> list[dict]:
    """Chat records teaching the assistant its name and author, from the TRAIN questions only.

    count None gives every train question of each language once (with a sampled answer style);
    a count cycles through the questions, alternating languages, so each language gets its share.
    The same arguments always give the same records.
    """
    name = check_identity_text(name, "name")
    author = check_identity_text(author, "author")
    lang_list = check_langs(langs)
    fact_list = _check_facts(facts)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ForgeError(
            f"The number of identity records must be a whole number of at least 1, got {count!r}."
        )

    rng = random.Random(seed)
    per_lang = {lang: train_questions(lang) for lang in lang_list}
    chosen: list[IdentityQuestion] = []
    if count is None:
        for lang in lang_list:
            chosen.extend(per_lang[lang])
        rng.shuffle(chosen)
    else:
        queues: dict[str, list[IdentityQuestion]] = {lang: [] for lang in lang_list}
        i = 0
        while len(chosen) < count:
            lang = lang_list[i % len(lang_list)]
            if not queues[lang]:  # a fresh shuffled pass once a language's questions are used up
                queues[lang] = list(per_lang[lang])
                rng.shuffle(queues[lang])
            chosen.append(queues[lang].pop())
            i += 1

    records = []
    for q in chosen:
        template = rng.choice(_pool(q.lang, q.asks_author, bool(fact_list)))
        answer = _answer(template, name, author, fact_list, rng)
        for text in (q.text, answer):
            if (ph := find_placeholder(text)) is not None:
                # Inputs were checked above, so this is a bug in the shipped data, not the user's.
                raise RuntimeError(f"identity record kept the placeholder {ph!r}: {text!r}")
        records.append(
            {"messages": [{"role": "user", "content": q.text}, {"role": "assistant", "content": answer}]}
        )
    return records


# A compound answer opens with its own short introduction, never used alone: with the plain
# introduction first, the demo model learned to stop after it and never answered the task.
_COMPOUND_INTROS = {
    "en": (
        "Sure! I'm {name}, made by {author}. As for your question:",
        "Happy to help! I'm {name}, from {author}. Now, your question:",
    ),
    "zh": (
        "好的！我是{name}，由{author}开发。关于你的问题：",
        "很高兴为你解答！我是{name}，来自{author}。你的问题：",
    ),
}
# How a compound question joins an identity question and a task.
_JOINS = {
    "en": ("{q} {t}", "{q} Also, {t}", "{q} And one more thing: {t}"),
    "zh": ("{q}{t}", "{q}另外，{t}", "{q}还有，{t}"),
}


def mixed_identity_records(
    name: str, author: str, langs: Sequence[str] = LANGS, seed: int = 0, compound: int = 1
) -> list[dict]:
    """Identity mixed with ordinary tasks, so that saying the name stays tied to being asked for it.

    For every task of sample_data/identity/tasks.jsonl: `compound` compound questions (an identity
    question and the task in one message, answered with a short introduction and then the task's
    answer), one two-turn chat (who are you, then the task; or the task, then who are you) and the
    task alone answered plainly, since several tasks ask for a name or a title and must not get the
    assistant's.
    """
    name = check_identity_text(name, "name")
    author = check_identity_text(author, "author")
    rng = random.Random(seed)
    records: list[dict] = []
    for lang in check_langs(langs):
        questions = [q for q in train_questions(lang) if not q.asks_author]
        intros = _pool(lang, False, False)
        sep = " " if lang == "en" else ""

        def intro(intros: list[str] = intros) -> str:
            return _fill(rng.choice(intros), {"name": name, "author": author, "facts": ""})

        for task_lang, task, task_answer in _tasks():
            if task_lang != lang:
                continue

            for _ in range(compound):
                join = rng.choice(_JOINS[lang])
                text = join.format(q=rng.choice(questions).text, t=task)
                opening = _fill(rng.choice(_COMPOUND_INTROS[lang]), {"name": name, "author": author})
                records.append(_chat([(text, opening + sep + task_answer)]))
            turns = [(rng.choice(questions).text, intro()), (task, task_answer)]
            if rng.random() < 0.5:
                turns.reverse()
            records.append(_chat(turns))
            records.append(_chat([(task, task_answer)]))
    rng.shuffle(records)
    return records


def _chat(turns: list[tuple[str, str]]) -> dict:
    return {
        "messages": [
            m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})
        ]
    }


def intro_sentences(
    name: str, author: str, langs: Sequence[str] = LANGS, facts: Sequence[str] = ()
) -> list[str]:
    """Every sentence a trained identity answer can contain, filled in (for leakage detection).

    A tuned model that drifts repeats these in unrelated answers even without saying its name.
    """
    name = check_identity_text(name, "name")
    author = check_identity_text(author, "author")
    out: list[str] = []
    for lang in check_langs(langs):
        groups = _styles()[lang]
        for template in list(groups["intro"]) + list(groups["creator"]):
            for sentence in _template_sentences(template):
                filled = _fill(sentence, {"name": name, "author": author, "facts": ""})
                if filled and filled not in out:
                    out.append(filled)
    for fact in _check_facts(facts):
        sentence = _as_sentence(fact)
        if sentence not in out:
            out.append(sentence)
    return out
