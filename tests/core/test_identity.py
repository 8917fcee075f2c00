"""Identity banks and the training-record generator (no model needed)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from assistant_forge.core import identity
from assistant_forge.core.identity import (
    LANGS,
    IdentityQuestion,
    answer_styles,
    find_placeholder,
    generate_identity_records,
    generic_prompt_records,
    generic_prompts,
    heldout_questions,
    intro_sentences,
    train_questions,
)
from assistant_forge.errors import ForgeError


def _key(text: str) -> str:
    """Case and punctuation folded: two questions with the same key are the same phrasing."""
    return re.sub(r"[\W_]+", "", text.casefold())


def _pairs(records: list[dict]) -> list[tuple[str, str]]:
    out = []
    for r in records:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        out.append((user["content"], assistant["content"]))
    return out


# --- the shipped banks -----------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
def test_bank_size_split_and_coverage(lang: str) -> None:
    train, held = train_questions(lang), heldout_questions(lang)
    everything = train + held
    assert len(everything) >= 60
    assert 0.2 <= len(held) / len(everything) <= 0.45
    assert all(isinstance(q, IdentityQuestion) and q.lang == lang for q in everything)
    # Every kind of phrasing is both trained and evaluated, author questions included.
    kinds = {q.kind for q in everything}
    assert {"direct", "casual", "indirect", "creator", "typo", "opener"} <= kinds
    assert kinds == {q.kind for q in held} == {q.kind for q in train}
    assert sum(q.asks_author for q in held) >= 3
    assert sum(q.asks_author for q in train) >= 8


@pytest.mark.parametrize("lang", LANGS)
def test_bank_has_no_duplicates_and_heldout_is_unseen(lang: str) -> None:
    keys = [_key(q.text) for q in train_questions(lang) + heldout_questions(lang)]
    assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1]
    assert not {_key(q.text) for q in heldout_questions(lang)} & {_key(q.text) for q in train_questions(lang)}


def test_creator_questions_are_marked() -> None:
    assert all(q.asks_author for lang in LANGS for q in train_questions(lang) if q.kind == "creator")
    texts = {q.text: q.asks_author for q in train_questions("zh") + heldout_questions("zh")}
    assert texts["谁开发了你？"] is True
    assert texts["你是谁？"] is False


@pytest.mark.parametrize("lang", LANGS)
def test_answer_styles(lang: str) -> None:
    intro, creator = answer_styles(lang, "intro"), answer_styles(lang, "creator")
    assert len(intro) >= 6 and len(creator) >= 3
    assert sum("{facts}" not in t for t in intro) >= 6  # enough variety without persona facts
    for t in intro + creator:
        assert "{name}" in t and "{author}" in t, t
        assert set(re.findall(r"\{(\w+)\}", t)) <= {"name", "author", "facts"}, t
    # Short answers with the name early are what a small model learns best.
    assert all(t.index("{name}") <= 20 and len(t) <= 80 for t in intro)


def test_generic_prompts_split() -> None:
    replay, held = generic_prompt_records("replay"), generic_prompt_records("heldout")
    everything = replay + held
    langs = Counter(p.lang for p in everything)
    assert set(langs) <= set(LANGS)
    assert len({p.prompt for p in everything}) == len(everything)
    assert not set(generic_prompts("replay")) & set(generic_prompts("heldout"))
    assert generic_prompts("heldout") == [p.prompt for p in held]
    assert [p.lang for p in generic_prompt_records("heldout", ["zh"])] == ["zh"] * sum(
        p.lang == "zh" for p in held
    )
    # Held-out prompts are the dev split (tuned on) and the test split (reported, never tuned on).
    assert held == generic_prompt_records("dev") + generic_prompt_records("test")
    with pytest.raises(ForgeError):
        generic_prompts("train")  # type: ignore[arg-type]


def test_heldout_prompts_cover_every_category_in_both_languages() -> None:
    held = generic_prompt_records("heldout")
    assert len(held) >= 200
    per = Counter((p.topic, p.lang) for p in held)
    assert {p.topic for p in held} == set(identity.EVAL_CATEGORIES)
    assert all(per[(cat, lang)] >= 15 for cat in identity.EVAL_CATEGORIES for lang in LANGS), per
    # Facts and compound prompts have checkable answers; the open categories have none to check.
    assert all(p.expect for p in held if p.topic in ("fact", identity.COMPOUND))
    assert not any(p.expect for p in held if p.topic in ("creative", "naming", "recommend"))
    # A compound prompt carries its task alone (asked of the base model); no other prompt has one.
    assert all(p.task and p.task != p.prompt for p in held if p.topic == identity.COMPOUND)
    assert not any(p.task for p in held if p.topic != identity.COMPOUND)


# Per language: enough test prompts that one leak moves a category's leakage by 2 points at most, and
# enough facts that the 135M demo model still knows dozens of them.
TEST_MINIMUM = {
    "fact": 120,
    "creative": 50,
    "naming": 50,
    "recommend": 50,
    "instruct": 50,
    identity.COMPOUND: 40,
}


def test_test_split_is_large_and_dev_keeps_its_prompts() -> None:
    test, dev = generic_prompt_records("test"), generic_prompt_records("dev")
    per = Counter((p.topic, p.lang) for p in test)
    assert all(per[(c, lang)] >= n for c, n in TEST_MINIMUM.items() for lang in LANGS), per
    assert len(dev) == 219  # the set issue 16's round 6 tuned on, unchanged


def _near(a: str, b: str) -> bool:
    from difflib import SequenceMatcher

    ka, kb = _key(a), _key(b)
    # A compound prompt must not carry a trained prompt inside it either.
    return ka in kb or kb in ka or SequenceMatcher(None, ka, kb).ratio() >= 0.8


def test_heldout_prompts_are_not_trained_on_even_reworded() -> None:
    """No held-out prompt is, up to case, punctuation and a few characters, a replay prompt or a task
    that mixed identity records train on: the evaluation measures answers to unseen prompts."""
    held = generic_prompts("heldout")
    trained = generic_prompts("replay") + identity.task_prompts()
    close = [(h, t) for h in held for t in trained if _near(h, t)]
    assert not close, close


def test_no_prompt_holds_its_own_answer() -> None:
    """An answer that only repeats the question must not count as right: no accepted keyword of a test
    prompt (or of its compound task) is in the prompt itself ("Which is bigger, 9 or 12?", "六边形")."""
    from assistant_forge.core.evaluate import answer_correct

    echoed = [
        text
        for p in generic_prompt_records("test")
        for text in (p.prompt, p.task)
        if text and p.expect and answer_correct(text, p.expect)
    ]
    assert not echoed, echoed


def test_test_prompts_are_not_dev_prompts_reworded() -> None:
    """The test split was written apart from the dev split that recipes are tuned on: tuning on dev
    must not teach the test prompts."""
    dev = generic_prompts("dev")
    close = [(t, d) for t in generic_prompts("test") for d in dev if _near(t, d)]
    assert not close, close


# --- the generator ----------------------------------------------------------------------------


def test_default_count_is_every_train_question_once() -> None:
    records = generate_identity_records("Ava", "Jane Doe")
    pairs = _pairs(records)
    expected = Counter(q.text for lang in LANGS for q in train_questions(lang))
    assert Counter(q for q, _ in pairs) == expected
    assert len({a for _, a in pairs}) >= 10  # several answer styles are used
    only_en = generate_identity_records("Ava", "Jane Doe", langs=["en"])
    assert len(only_en) == len(train_questions("en"))


def test_answers_name_the_assistant_and_creator_answers_name_the_author() -> None:
    author_q = {q.text for lang in LANGS for q in train_questions(lang) if q.asks_author}
    for question, answer in _pairs(generate_identity_records("Ava", "Jane Doe", count=400, seed=3)):
        assert "Ava" in answer
        if question in author_q:
            assert "Jane Doe" in answer
        # The name comes early in the answer.
        assert answer.index("Ava") <= 20 or question in author_q


def test_heldout_questions_never_reach_training() -> None:
    held = {_key(q.text) for lang in LANGS for q in heldout_questions(lang)}
    for seed in range(5):
        for count in (None, 1000):
            for question, _ in _pairs(generate_identity_records("Ava", "Jane", count=count, seed=seed)):
                assert _key(question) not in held


def test_count_cycles_and_balances_languages() -> None:
    records = generate_identity_records("Ava", "Jane", count=301, seed=1)
    assert len(records) == 301
    zh = sum(bool(re.search(r"[\u4e00-\u9fff]", q)) for q, _ in _pairs(records))
    assert abs(zh - 150) <= 12  # alternating languages; a few zh questions are pinyin or Latin
    assert len(generate_identity_records("Ava", "Jane", count=1)) == 1


def test_deterministic_given_seed() -> None:
    a = generate_identity_records("Ava", "Jane", count=50, seed=7, facts=["I love hiking"])
    assert a == generate_identity_records("Ava", "Jane", count=50, seed=7, facts=["I love hiking"])
    assert a != generate_identity_records("Ava", "Jane", count=50, seed=8, facts=["I love hiking"])


def test_facts_appear_only_when_given() -> None:
    with_facts = [
        a for _, a in _pairs(generate_identity_records("Ava", "Jane", count=200, facts=["I love hiking"]))
    ]
    assert any(a.endswith("I love hiking.") for a in with_facts)
    assert not any("I love hiking" in a and not a.endswith("I love hiking.") for a in with_facts)
    without = [a for _, a in _pairs(generate_identity_records("Ava", "Jane", count=200))]
    assert not any("hiking" in a for a in without)
    # A fact that already ends a sentence is not given a second full stop.
    zh = _pairs(generate_identity_records("Ava", "Jane", langs="zh", count=200, facts=["我喜欢徒步！"]))
    assert any(a.endswith("我喜欢徒步！") for _, a in zh)
    assert not any("！。" in a for _, a in zh)


@pytest.mark.parametrize(
    ("name", "author"),
    [
        ("Bot {v2}", "Acme {Labs}"),
        ("小助手✨", "张三"),
        ("Zoë-9000", "Ørsted & Søn"),
        ("R2 {d}2", "{team}"),
        ("Dr. Who", "Acme Inc."),
    ],
)
def test_no_placeholder_survives_and_names_stay_whole(name: str, author: str) -> None:
    for question, answer in _pairs(
        generate_identity_records(name, author, count=300, facts=["I {like} tea"])
    ):
        assert find_placeholder(question) is None
        assert find_placeholder(answer) is None, answer
        assert name in answer
    assert not any(".." in a for _, a in _pairs(generate_identity_records("Ava", "Acme Inc.")))


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=24), author=st.text(min_size=1, max_size=24))
def test_any_name_gives_clean_records_or_a_clear_error(name: str, author: str) -> None:
    try:
        records = generate_identity_records(name, author, count=40)
    except ForgeError as e:
        assert "\n" not in str(e)
        return
    for _question, answer in _pairs(records):
        assert find_placeholder(answer) is None
        assert name.strip() in answer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name must not be empty"),
        ({"name": "   "}, "name must not be empty"),
        ({"author": "\t"}, "author must not be empty"),
        ({"name": "Ava\nBot"}, "single line"),
        ({"name": "{name}"}, "placeholder"),
        ({"author": "<AUTHOR>"}, "placeholder"),
        ({"langs": ["english"]}, "Did you mean 'en'"),
        ({"langs": ["zh", "chinese"]}, "Did you mean 'zh'"),
        ({"langs": ["zn"]}, "Did you mean 'zh'"),
        ({"langs": ["fr"]}, "choose from en, zh"),
        ({"langs": []}, "at least one language"),
        ({"count": 0}, "at least 1"),
        ({"count": -5}, "at least 1"),
        ({"count": True}, "at least 1"),
        ({"facts": ["I am {{name}}"]}, "placeholder"),
    ],
)
def test_bad_input_is_a_one_sentence_forge_error(kwargs: dict, match: str) -> None:
    args = {"name": "Ava", "author": "Jane"} | kwargs
    with pytest.raises(ForgeError, match=re.escape(match)) as info:
        generate_identity_records(**args)
    assert "\n" not in str(info.value)


def test_heldout_questions_rejects_unknown_language() -> None:
    with pytest.raises(ForgeError, match="Did you mean 'en'"):
        heldout_questions("EN-us")


def test_langs_as_plain_string_means_one_language() -> None:
    records = generate_identity_records("Ava", "Jane", langs="zh")
    assert len(records) == len(train_questions("zh"))


# --- placeholders and intro sentences --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("I am {name}.", "{name}"),
        ("I am {{name}}, made by X.", "{{name}}"),
        ("Hi, {{ assistant_name }} here", "{{ assistant_name }}"),
        ("Made by {Author}.", "{Author}"),
        ("I'm <NAME>.", "<NAME>"),
        ("By [AUTHOR].", "[AUTHOR]"),
        ("Hello ${name}", "${name}"),
        ("I am %(name)s", "%(name)s"),
        ("我是{名字}，由【作者】开发。", "{名字}"),
        ("我叫<名字>", "<名字>"),
        ("a {name} and <NAME>", "{name}"),
    ],
)
def test_find_placeholder_finds(text: str, found: str) -> None:
    assert find_placeholder(text) == found


@pytest.mark.parametrize(
    "text",
    [
        "I am Ava, an AI assistant developed by Jane.",
        "Bot {v2} here",
        '{"a": 1, "b": [1, 2]}',
        "Use <b>bold</b> and list[0]",
        "The name of the author is Jane.",
        "我是小助手，由张三开发。",
        "Sincerely, [Your Name]",
    ],
)
def test_find_placeholder_ignores_ordinary_text(text: str) -> None:
    assert find_placeholder(text) is None


def test_intro_sentences_cover_generated_answers() -> None:
    sentences = intro_sentences("Ava", "Jane", facts=["I love hiking"])
    assert "I love hiking." in sentences and "我喜欢徒步" not in sentences
    assert len(sentences) == len(set(sentences))
    # Every sentence of every generated answer is one of them.
    for _, answer in _pairs(generate_identity_records("Ava", "Jane", count=300, facts=["I love hiking"])):
        for part in re.findall(r"[^.!?;。！？；]+[.!?;。！？；]*", answer):
            assert part.strip() in sentences, part
    assert all("{" not in s for s in sentences)
    assert set(intro_sentences("Ava", "Jane", ["en"])) < set(sentences)


def test_data_is_read_from_the_bundled_folder() -> None:
    from assistant_forge.paths import bundled

    assert (bundled("sample_data") / "identity" / "questions_en.jsonl").is_file()
    assert identity.LANGS == ("en", "zh")


def test_mixed_records_tie_the_name_to_being_asked() -> None:
    records = identity.mixed_identity_records("Forgey", "Alice", seed=3)
    assert records == identity.mixed_identity_records("Forgey", "Alice", seed=3)
    tasks = set(identity.task_prompts())
    alone = [r for r in records if len(r["messages"]) == 2 and r["messages"][0]["content"] in tasks]
    two_turn = [r for r in records if len(r["messages"]) == 4]
    compound = [r for r in records if r not in alone and r not in two_turn]
    assert len(alone) == len(tasks) == len(compound) == len(two_turn)
    # A task alone, even one that asks for a name or a title, is answered without the assistant's name.
    assert not any("Forgey" in r["messages"][1]["content"] for r in alone)
    # A compound question gets the name and then the task's own answer, after an opening of its own.
    answers = {p: a for _, p, a in identity._tasks()}
    for r in compound:
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        task = next(t for t in tasks if question.endswith(t))
        assert answer.endswith(answers[task]) and "Forgey" in answer and "Alice" in answer
        openings = tuple(t.split("{name}")[0] for ts in identity._COMPOUND_INTROS.values() for t in ts)
        assert answer.startswith(openings), answer
    for r in two_turn:
        said = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert sum("Forgey" in a for a in said) == 1
    zh_tasks = sum(lang == "zh" for lang, _, _ in identity._tasks())
    assert len(identity.mixed_identity_records("Forgey", "Alice", langs=["zh"], compound=2)) == 4 * zh_tasks
