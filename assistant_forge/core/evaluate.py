"""Identity and forgetting metrics: does the tuned model know who it is, without talking about
itself everywhere, and does it still answer unrelated prompts the way the base model did?

Pure Python over answers: the caller supplies `answer_fn` (a batch of chats -> greedy answers),
so nothing here imports torch and the metrics test without a model.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from typing import Any

from assistant_forge.core.identity import (
    COMPOUND,
    EVAL_CATEGORIES,
    EVAL_SPLITS,
    LANGS,
    GenericPrompt,
    check_identity_text,
    check_langs,
    generic_prompt_records,
    heldout_questions,
    intro_sentences,
)
from assistant_forge.errors import ForgeError

AnswerFn = Callable[[list[list[dict]]], list[str]]

# A repeated intro sentence counts as leakage only when it is at least this long (letters and
# digits, a CJK character counting 2 as it carries about a word): shorter ones ("Hi!", "我是。")
# occur in ordinary answers too.
MIN_INTRO_WEIGHT = 10
# Scripts written without spaces: each character is a token and needs no word boundary.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORDISH = f"[^\\W_{_CJK}]"  # a letter or digit of a spaced script
_WORDISH_RE = re.compile(_WORDISH)
_TOKEN_RE = re.compile(f"[{_CJK}]|{_WORDISH}+")
_CJK_RE = re.compile(f"[{_CJK}]")


def _norm(text: str) -> str:
    # NFKC folds full-width letters/digits ("Ａｖａ", "８４") that Chinese text often uses.
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def mentions(text: str, needle: str) -> bool:
    """Whether `needle` occurs in `text`: case-insensitive, whitespace-tolerant, whole words.

    Latin names must not sit inside a longer word ("Ava" is not in "available"), but may touch
    CJK characters, since Chinese text has no spaces ("我是Ava，").
    """
    needle_n = _norm(needle)
    if not needle_n:
        return False
    parts = [re.escape(p) for p in needle_n.split(" ")]
    pattern = r"\s*".join(parts)  # "Forge Bot" also matches "ForgeBot"
    if _WORDISH_RE.match(needle_n[0]):
        pattern = f"(?<!{_WORDISH})" + pattern
    if _WORDISH_RE.match(needle_n[-1]):
        pattern += f"(?!{_WORDISH})"
    return re.search(pattern, _norm(text)) is not None


def identity_hit(answer: str, name: str, author: str, asks_author: bool) -> bool:
    """The answer names the assistant, and also its author when the question asked about the author."""
    return mentions(answer, name) and (not asks_author or mentions(answer, author))


def _squash(text: str) -> str:
    """Letters, digits and CJK only: sentence matching ignores punctuation and spacing."""
    return "".join(c for c in _norm(text) if c.isalnum())


def leaks(answer: str, name: str, author: str, intro_sentences: Sequence[str]) -> bool:
    """An answer to an unrelated prompt that mentions the name or author, or repeats a
    self-introduction sentence (over-trained models do that even without the name)."""
    if mentions(answer, name) or mentions(answer, author):
        return True
    flat = _squash(answer)
    return any(_weight(s) >= MIN_INTRO_WEIGHT and s in flat for s in map(_squash, intro_sentences))


def _weight(squashed: str) -> int:
    return sum(2 if _CJK_RE.match(c) else 1 for c in squashed)


def token_agreement(base_answer_ids: Sequence[Any], tuned_answer_ids: Sequence[Any]) -> float:
    """How much of the base answer the tuned answer reproduces, 0..1 (1 = identical).

    A matching-blocks ratio rather than position-by-position, so one inserted token does not
    count everything after it as different. Two empty answers agree fully.
    """
    if not base_answer_ids and not tuned_answer_ids:
        return 1.0
    return SequenceMatcher(None, list(base_answer_ids), list(tuned_answer_ids), autojunk=False).ratio()


def _tokens(text: str) -> list[str]:
    # Words for Latin scripts, single characters for CJK (no spaces to split on), punctuation dropped.
    return _TOKEN_RE.findall(_norm(text))


def text_agreement(base_answer: str, tuned_answer: str) -> float:
    """`token_agreement` on words (Latin) and characters (CJK), for when only text is at hand."""
    return token_agreement(_tokens(base_answer), _tokens(tuned_answer))


def preservation_score(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Mean text agreement over (base answer, tuned answer) pairs; None when there are none."""
    if not pairs:
        return None
    return sum(text_agreement(b, t) for b, t in pairs) / len(pairs)


def answer_correct(answer: str, expect: Sequence[str]) -> bool:
    """A fact/math answer contains one of the accepted keywords (whole numbers and words only)."""
    return any(mentions(answer, e) for e in expect)


def collect_answers(answer_fn: AnswerFn, prompts: Sequence[str], batch_size: int = 16) -> list[str]:
    """Ask single-turn prompts in batches; checks that answer_fn answers each one with text."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [[{"role": "user", "content": p}] for p in prompts[start : start + batch_size]]
        got = list(answer_fn(batch))
        if len(got) != len(batch) or not all(isinstance(a, str) for a in got):
            raise ValueError(
                f"answer_fn returned {len(got)} answers for {len(batch)} prompts (need one string each)"
            )
        answers.extend(got)
    return answers


def _first(items: Sequence[Any], limit: int | None, lang_of: Callable[[Any], str]) -> list[Any]:
    """The first `limit` items of each language, in order (all of them when limit is None)."""
    if limit is None:
        return list(items)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a whole number of at least 1, got {limit!r}")
    seen: dict[str, int] = {}
    out = []
    for item in items:
        lang = lang_of(item)
        if seen.get(lang, 0) < limit:
            seen[lang] = seen.get(lang, 0) + 1
            out.append(item)
    return out


# What `split=` accepts: one split of the held-out prompts, or both.
SPLIT_CHOICES: tuple[str, ...] = (*EVAL_SPLITS, "all")


def check_split(split: str) -> str:
    if split not in SPLIT_CHOICES:
        raise ForgeError(f"Unknown eval split {split!r}; choose from {', '.join(SPLIT_CHOICES)}.")
    return split


def heldout_generic(
    langs: Sequence[str] = LANGS, limit: int | None = None, split: str = "test"
) -> list[GenericPrompt]:
    """The held-out generic prompts `run_eval` asks (the first `limit` per language, if given).

    `test` is what reports quote; `dev` is for tuning recipes (bench/identity_recipes.py); `all` is both.
    """
    which = "heldout" if check_split(split) == "all" else split
    return _first(generic_prompt_records(which, langs), limit, lambda p: p.lang)  # type: ignore[arg-type]


def base_prompts(langs: Sequence[str] = LANGS, limit: int | None = None, split: str = "test") -> list[str]:
    """What the base model is asked for `run_eval`'s `base_answers`: the held-out generic prompts, then
    each compound prompt's task alone (whether the base model can do the task decides what
    `compound_both_known` counts), each prompt once."""
    generic = heldout_generic(langs, limit, split)
    return list(dict.fromkeys([p.prompt for p in generic] + [p.task for p in generic if p.task]))


def base_answers_for(
    answer_fn: AnswerFn,
    langs: Sequence[str] = LANGS,
    batch_size: int = 16,
    limit: int | None = None,
    split: str = "test",
) -> dict[str, str]:
    """The base model's answers to the held-out generic prompts and compound tasks: `run_eval`'s
    `base_answers`."""
    prompts = base_prompts(langs, limit, split)
    return dict(zip(prompts, collect_answers(answer_fn, prompts, batch_size), strict=True))


@dataclass
class EvalReport:
    name: str
    author: str
    langs: list[str]
    # Held-out identity questions answered with the name (and author when asked), per language.
    identity_rate: dict[str, float]
    identity_hits: dict[str, int]
    identity_total: dict[str, int]
    # The same, over only the questions about the author.
    author_rate: dict[str, float | None]
    # Held-out generic prompts whose answer leaks the identity.
    leakage_rate: float
    leak_count: int
    generic_total: int
    # Leakage of the base answers on the same prompts: the floor (a name like "Sage" occurs naturally).
    base_leakage_rate: float | None = None
    # Mean agreement with the base answers (1 = unchanged); None without base answers.
    preservation: float | None = None
    preservation_count: int = 0
    # Fact/math prompts answered correctly by the tuned model, and of those the base model got
    # right, the share the tuned model still gets right.
    facts_correct: float | None = None
    facts_kept: float | None = None
    facts_total: int = 0
    # How many of the fact prompts the base model answered correctly: facts_kept's denominator.
    facts_known: int = 0
    # Compound prompts (name + a checkable task): answers holding the name AND the task's answer.
    compound_both: float | None = None
    compound_total: int = 0
    # The same over only the compound prompts whose task the base model answers right when asked it
    # alone (a small model gets many tasks wrong, so the raw rate cannot reach 100%), and their count.
    compound_both_known: float | None = None
    compound_known: int = 0
    # Which held-out prompts were asked: test (the default), dev or all.
    split: str = "test"
    # Per category of held-out prompt: total, leaks, leakage, facts_total, facts_correct, facts_kept,
    # facts_known, and for compound prompts name (answers naming the assistant), both, known (tasks the
    # base model answers right alone) and both_known.
    by_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def identity_rate_overall(self) -> float:
        total = sum(self.identity_total.values())
        return sum(self.identity_hits.values()) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["identity_rate_overall"] = self.identity_rate_overall
        return d


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _facts(
    items: Sequence[tuple[GenericPrompt, str]], base: dict[str, str]
) -> tuple[float | None, float | None, int]:
    """(share answered correctly, share still correct of those the base model got right, how many the
    base got right); the last two need base answers (None, 0 without)."""
    correct = _rate(sum(answer_correct(a, g.expect) for g, a in items), len(items))
    if not base:
        return correct, None, 0
    known = [(g, a) for g, a in items if g.prompt in base and answer_correct(base[g.prompt], g.expect)]
    return correct, _rate(sum(answer_correct(a, g.expect) for g, a in known), len(known)), len(known)


def _base_knows(g: GenericPrompt, base: dict[str, str]) -> bool:
    """Whether the base model answered a compound prompt's task, asked alone, right."""
    return bool(g.task) and g.task in base and answer_correct(base[g.task], g.expect)


def run_eval(
    answer_fn: AnswerFn,
    name: str,
    author: str,
    langs: Sequence[str] = LANGS,
    base_answers: dict[str, str] | None = None,
    batch_size: int = 16,
    n_examples: int = 3,
    limit: int | None = None,
    split: str = "test",
) -> EvalReport:
    """Ask the held-out identity questions and held-out generic prompts, and score the answers.

    `answer_fn` gets a batch of chats (each a list of messages) and returns one greedy answer per
    chat. `base_answers` maps generic prompt (and compound task) -> the base model's answer (see
    `base_answers_for`). `limit` asks only the first N questions and first N generic prompts of each
    language: a quick smoke check, too few for rates worth comparing. `split` picks the held-out
    prompts: `test` (reported), `dev` (tuned on) or `all`.
    """
    name = check_identity_text(name, "name")
    author = check_identity_text(author, "author")
    lang_list = check_langs(langs)
    questions = [q for lang in lang_list for q in _first(heldout_questions(lang), limit, lambda q: q.lang)]
    generic = heldout_generic(lang_list, limit, split)
    answers = collect_answers(
        answer_fn, [q.text for q in questions] + [g.prompt for g in generic], batch_size
    )
    id_answers, gen_answers = answers[: len(questions)], answers[len(questions) :]

    hits = {lang: 0 for lang in lang_list}
    total = {lang: 0 for lang in lang_list}
    a_hits = {lang: 0 for lang in lang_list}
    a_total = {lang: 0 for lang in lang_list}
    scored = []
    for q, ans in zip(questions, id_answers, strict=True):
        ok = identity_hit(ans, name, author, q.asks_author)
        scored.append((q, ans, ok))
        total[q.lang] += 1
        hits[q.lang] += ok
        if q.asks_author:
            a_total[q.lang] += 1
            a_hits[q.lang] += ok
    examples: list[dict[str, Any]] = []
    # Misses first (stable sort keeps file order otherwise): they are what needs looking at.
    for q, ans, ok in sorted(scored, key=lambda s: s[2]):
        if sum(e["lang"] == q.lang and e["kind"] == "identity" for e in examples) < n_examples:
            examples.append({"kind": "identity", "lang": q.lang, "prompt": q.text, "answer": ans, "ok": ok})

    sentences = intro_sentences(name, author, lang_list)
    # A compound prompt asks for the name, so naming it there is no leak; it is scored on both parts.
    leak_flags = [
        g.topic != COMPOUND and leaks(a, name, author, sentences) for g, a in zip(generic, gen_answers)
    ]
    compound = [(g, a) for g, a in zip(generic, gen_answers, strict=True) if g.topic == COMPOUND]
    both = [mentions(a, name) and answer_correct(a, g.expect) for g, a in compound]
    base = base_answers or {}
    # Compound prompts whose task the base model gets right on its own: both parts are reachable there.
    known_both = [b for (g, _), b in zip(compound, both, strict=True) if _base_knows(g, base)]
    with_base = [(g, a) for g, a in zip(generic, gen_answers, strict=True) if g.prompt in base]
    base_plain = [(g, a) for g, a in with_base if g.topic != COMPOUND]
    for i, (g, ans) in enumerate(zip(generic, gen_answers, strict=True)):
        # Leaks first: they are what a reader of the report most needs to see.
        if leak_flags[i] and sum(e["kind"] == "generic" for e in examples) < n_examples:
            examples.append(
                {"kind": "generic", "lang": g.lang, "prompt": g.prompt, "answer": ans, "leak": True}
            )
    for i, (g, ans) in enumerate(zip(generic, gen_answers, strict=True)):
        if not leak_flags[i] and sum(e["kind"] == "generic" for e in examples) < n_examples:
            ex = {"kind": "generic", "lang": g.lang, "prompt": g.prompt, "answer": ans, "leak": False}
            if g.prompt in base:
                ex["base_answer"] = base[g.prompt]
            examples.append(ex)

    plain = [
        (g, a, f) for g, a, f in zip(generic, gen_answers, leak_flags, strict=True) if g.topic != COMPOUND
    ]
    fact_items = [(g, a) for g, a, _ in plain if g.expect]
    facts_correct, facts_kept, facts_known = _facts(fact_items, base)
    by_category: dict[str, dict[str, Any]] = {}
    order = {c: i for i, c in enumerate(EVAL_CATEGORIES)}
    for topic in sorted({g.topic for g in generic}, key=lambda t: (order.get(t, len(order)), t)):
        items = [(g, a) for g, a in zip(generic, gen_answers, strict=True) if g.topic == topic]
        n_leaks = sum(f for g, _, f in plain if g.topic == topic)
        correct, kept, known = _facts([(g, a) for g, a in items if g.expect], base)
        cat: dict[str, Any] = {
            "total": len(items),
            "leaks": n_leaks,
            "leakage": None if topic == COMPOUND else n_leaks / len(items),
            "facts_total": sum(bool(g.expect) for g, _ in items),
            "facts_correct": correct,
            "facts_kept": kept,
            "facts_known": known,
        }
        if topic == COMPOUND:
            cat["name"] = _rate(sum(mentions(a, name) for _, a in items), len(items))
            cat["both"] = _rate(sum(both), len(both))
            cat["known"] = len(known_both)
            cat["both_known"] = _rate(sum(known_both), len(known_both))
        by_category[topic] = cat

    return EvalReport(
        name=name,
        author=author,
        langs=lang_list,
        identity_rate={lang: hits[lang] / total[lang] if total[lang] else 0.0 for lang in lang_list},
        identity_hits=hits,
        identity_total=total,
        author_rate={lang: _rate(a_hits[lang], a_total[lang]) for lang in lang_list},
        leakage_rate=sum(leak_flags) / len(plain) if plain else 0.0,
        leak_count=sum(leak_flags),
        generic_total=len(plain),
        base_leakage_rate=_rate(
            sum(leaks(base[g.prompt], name, author, sentences) for g, _ in base_plain), len(base_plain)
        )
        if base_plain
        else None,
        preservation=preservation_score([(base[g.prompt], a) for g, a in with_base]),
        preservation_count=len(with_base),
        facts_correct=facts_correct,
        facts_kept=facts_kept,
        facts_known=facts_known,
        facts_total=len(fact_items),
        compound_both=_rate(sum(both), len(both)),
        compound_total=len(both),
        compound_both_known=_rate(sum(known_both), len(known_both)),
        compound_known=len(known_both),
        split=split,
        by_category=by_category,
        examples=examples,
    )


def category_rows(report: EvalReport) -> list[tuple[str, int, float | None, float | None, float | None]]:
    """(category, prompts, leakage, facts kept, both parts) per held-out category, for tables."""
    return [
        (c, d["total"], d["leakage"], d["facts_kept"], d.get("both")) for c, d in report.by_category.items()
    ]
