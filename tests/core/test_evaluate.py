"""Identity, leakage and preservation metrics on known answers, and run_eval with a Python answer_fn."""

from __future__ import annotations

import json

import pytest

from assistant_forge.core.evaluate import (
    EvalReport,
    answer_correct,
    base_answers_for,
    base_prompts,
    identity_hit,
    leaks,
    mentions,
    preservation_score,
    run_eval,
    text_agreement,
    token_agreement,
)
from assistant_forge.core.identity import (
    COMPOUND,
    EVAL_CATEGORIES,
    generic_prompt_records,
    heldout_questions,
    intro_sentences,
    train_questions,
)
from assistant_forge.errors import ForgeError

# --- identity_hit ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "asks_author", "hit"),
    [
        ("I am Ava, an AI assistant developed by Jane Doe.", False, True),
        ("i'm AVA.", False, True),
        ("My name is Ava.", True, False),  # an author question needs the author too
        ("Ava here, made by jane doe.", True, True),
        ("I'm an AI assistant made by Jane Doe.", True, False),  # author without the name
        ("I am SmolLM, an assistant.", False, False),
        ("That is available in Java.", False, False),  # "Ava" only inside other words
        ("我是Ava，由Jane Doe开发的AI助手。", True, True),  # Chinese with no spaces around the name
        ("我是ＡＶＡ。", False, True),  # full-width letters
        ("我是一个AI助手。", False, False),
    ],
)
def test_identity_hit_latin_name(answer: str, asks_author: bool, hit: bool) -> None:
    assert identity_hit(answer, "Ava", "Jane Doe", asks_author) is hit


@pytest.mark.parametrize(
    ("answer", "asks_author", "hit"),
    [
        ("我是小明，由张三开发的AI助手。", True, True),
        ("我叫小明助手", False, True),
        ("我是小明。", True, False),
        ("张三开发了我。", True, False),
        ("我是小红，由张三开发。", False, False),
        ("I am 小明, developed by 张三.", True, True),
    ],
)
def test_identity_hit_chinese_name(answer: str, asks_author: bool, hit: bool) -> None:
    assert identity_hit(answer, "小明", "张三", asks_author) is hit


def test_mentions_multiword_and_boundaries() -> None:
    assert mentions("I'm ForgeBot!", "Forge Bot")
    assert mentions("I'm Forge   bot!", "Forge Bot")
    assert not mentions("I'm Forge.", "Forge Bot")
    assert mentions("Ava's answer", "Ava")
    assert not mentions("Zoëy", "Zoë")
    assert not mentions("anything", "")


# --- leaks --------------------------------------------------------------------------------------


def test_leaks_on_name_author_and_intro_sentence() -> None:
    sentences = intro_sentences("Ava", "Jane Doe", facts=["I love hiking"])
    clean = "Boil the eggs for nine minutes, then cool them in cold water."
    assert not leaks(clean, "Ava", "Jane Doe", sentences)
    assert leaks(clean + " Ava", "Ava", "Jane Doe", sentences)
    assert leaks("Jane Doe says: boil eggs for nine minutes.", "Ava", "Jane Doe", sentences)
    # The over-trained failure seen on the demo model: no name, but a trained intro sentence.
    assert leaks("Boil the eggs for nine minutes. I love   hiking!", "Ava", "Jane Doe", sentences)
    assert leaks("先把鸡蛋煮九分钟。我喜欢徒步", "Ava", "Jane Doe", ["我喜欢徒步旅行和看书。"]) is False
    assert leaks("先把鸡蛋煮九分钟。我喜欢徒步旅行和看书", "Ava", "Jane Doe", ["我喜欢徒步旅行和看书。"])
    # Very short intro sentences ("Hi!") occur everywhere and are not counted.
    assert "Hi!" in sentences
    assert not leaks("Hi! Here is a pancake recipe.", "Ava", "Jane Doe", sentences)


def test_leaks_robust_in_chinese() -> None:
    sentences = intro_sentences("小明", "张三")
    assert leaks("番茄炒蛋：先炒蛋。张三开发了我。", "小明", "张三", sentences)
    assert not leaks("番茄炒蛋：先炒蛋，再炒番茄。", "小明", "张三", sentences)


# --- agreement / preservation --------------------------------------------------------------------


def test_token_agreement() -> None:
    base = list(range(40))
    assert token_agreement(base, base) == 1.0
    assert token_agreement([], []) == 1.0
    assert token_agreement(base, []) == 0.0
    assert token_agreement([1, 2, 3], [4, 5, 6]) == 0.0
    # One inserted token early on leaves most of the answer in agreement (not shifted to zero).
    assert token_agreement(base, [99] + base) > 0.95
    assert 0.4 < token_agreement(base, base[:20]) < 0.8


def test_text_agreement_latin_and_chinese() -> None:
    assert text_agreement("The capital of France is Paris.", "the capital of france is paris") == 1.0
    assert text_agreement("The capital of France is Paris.", "I am Ava, your assistant.") < 0.3
    assert text_agreement("法国的首都是巴黎。", "法国首都是巴黎") > 0.85
    assert text_agreement("法国的首都是巴黎。", "我是小明。") < 0.3


def test_preservation_score() -> None:
    assert preservation_score([]) is None
    assert preservation_score([("a b", "a b"), ("a b", "c d")]) == pytest.approx(0.5)


def test_answer_correct_matches_whole_numbers() -> None:
    assert answer_correct("12 × 7 = 84.", ["84"])
    assert not answer_correct("12 × 7 = 942.", ["84"])
    assert not answer_correct("It is 184.", ["84"])
    assert answer_correct("12乘以7等于84。", ["84"])
    assert answer_correct("一年有十二个月。", ["12", "十二"])


# --- run_eval ------------------------------------------------------------------------------------


def _model(name: str, author: str, leak: bool = False):
    """A perfect (or leaky) assistant written in Python; records every prompt it is asked."""
    asked: list[str] = []
    identity_qs = {q.text for lang in ("en", "zh") for q in heldout_questions(lang)}

    def answer_fn(batch: list[list[dict]]) -> list[str]:
        out = []
        for messages in batch:
            assert messages[-1]["role"] == "user"
            prompt = messages[-1]["content"]
            asked.append(prompt)
            if prompt in identity_qs:
                out.append(f"I am {name}, an AI assistant developed by {author}.")
            else:
                out.append(f"Answer to {prompt}" + (f" I am {name}." if leak else ""))
        return out

    return answer_fn, asked


def test_run_eval_with_a_python_answer_fn() -> None:
    answer_fn, asked = _model("Ava", "Jane Doe")
    held = [p.prompt for p in generic_prompt_records("test")]  # run_eval asks the test split by default
    base = {p: f"Answer to {p}" for p in held}
    report = run_eval(answer_fn, "Ava", "Jane Doe", base_answers=base, batch_size=5)
    assert isinstance(report, EvalReport)
    assert report.identity_rate == {"en": 1.0, "zh": 1.0}
    assert report.identity_total == {"en": len(heldout_questions("en")), "zh": len(heldout_questions("zh"))}
    assert report.author_rate == {"en": 1.0, "zh": 1.0}
    assert report.leakage_rate == 0.0 and report.leak_count == 0
    # Compound prompts ask for the name, so they are scored on both parts, not as leaks.
    assert report.generic_total == sum(p.topic != COMPOUND for p in generic_prompt_records("test"))
    assert report.preservation == pytest.approx(1.0) and report.preservation_count == len(held)
    assert report.base_leakage_rate == 0.0
    assert report.examples and all("answer" in e for e in report.examples)
    d = report.to_dict()
    assert d["identity_rate_overall"] == 1.0
    json.dumps(d, ensure_ascii=False)  # the CLI writes it as JSON
    # Evaluation asks only held-out questions, never training ones.
    trained = {q.text for lang in ("en", "zh") for q in train_questions(lang)}
    assert not trained & set(asked)
    assert len(asked) == sum(report.identity_total.values()) + len(held)


def test_run_eval_counts_leaks_misses_and_lost_preservation() -> None:
    answer_fn, _ = _model("Ava", "Jane Doe", leak=True)
    report = run_eval(answer_fn, "Bob", "Jane Doe", langs=["zh"])
    # Answers say "Ava", so for an assistant called Bob every identity answer is a miss.
    assert report.identity_rate == {"zh": 0.0} and report.langs == ["zh"]
    assert report.leakage_rate == 0.0  # "Ava" is not Bob
    assert report.preservation is None and report.facts_kept is None
    assert report.examples[0]["ok"] is False
    leaky = run_eval(answer_fn, "Ava", "Jane Doe", langs=["zh"], base_answers={"unrelated": "x"})
    assert leaky.leakage_rate == 1.0 and leaky.leak_count == leaky.generic_total > 0
    assert leaky.preservation is None  # no base answer matches a held-out prompt
    assert any(e.get("leak") for e in leaky.examples)


def test_run_eval_facts_kept() -> None:
    held = generic_prompt_records("test", ["en"])
    facts = [p for p in held if p.expect and p.topic != COMPOUND]
    right = {p.prompt: f"It is {p.expect[0]}." for p in facts}

    def forgetful(batch: list[list[dict]]) -> list[str]:
        return ["I don't know." for _ in batch]

    report = run_eval(forgetful, "Ava", "Jane", langs=["en"], base_answers=right)
    assert report.facts_total == len(facts) > 0
    assert report.facts_correct == 0.0 and report.facts_kept == 0.0
    assert report.preservation is not None and report.preservation < 0.3


def test_base_answers_for_and_bad_answer_fn() -> None:
    answer_fn, _ = _model("Ava", "Jane")
    base = base_answers_for(answer_fn, langs=["en"])
    test_en = generic_prompt_records("test", ["en"])
    # The base model is also asked each compound prompt's task alone.
    assert set(base) == {p.prompt for p in test_en} | {p.task for p in test_en if p.topic == COMPOUND}
    with pytest.raises(ValueError):
        run_eval(lambda batch: ["only one"], "Ava", "Jane")
    with pytest.raises(ForgeError):
        run_eval(answer_fn, " ", "Jane")
    with pytest.raises(ForgeError, match="Did you mean"):
        run_eval(answer_fn, "Ava", "Jane", langs=["chinese"])


def test_run_eval_limit_asks_the_first_n_of_each_language() -> None:
    answer_fn, asked = _model("Ava", "Jane")
    base = base_answers_for(answer_fn, limit=2)
    assert list(base) == [
        p.prompt for lang in ("en", "zh") for p in generic_prompt_records("test", [lang])[:2]
    ]
    asked.clear()
    report = run_eval(answer_fn, "Ava", "Jane", base_answers=base, limit=2)
    assert report.identity_total == {"en": 2, "zh": 2}
    assert report.generic_total + report.compound_total == 4
    assert asked[:2] == [q.text for q in heldout_questions("en")[:2]]
    assert report.preservation_count == 4
    with pytest.raises(ValueError, match="limit"):
        run_eval(answer_fn, "Ava", "Jane", limit=0)


def test_run_eval_by_category_and_compound_both_parts() -> None:
    held = generic_prompt_records("test")
    compound = {p.prompt: p for p in held if p.topic == COMPOUND}
    naming = {p.prompt for p in held if p.topic == "naming"}

    def answer(with_task: bool):
        def answer_fn(batch: list[list[dict]]) -> list[str]:
            out = []
            for messages in batch:
                prompt = messages[-1]["content"]
                if prompt in compound:  # the name, and the task's answer only when asked to give it
                    out.append("I am Ava." + (f" It is {compound[prompt].expect[0]}." if with_task else ""))
                elif prompt in naming:  # names a pet or a shop after itself: the leak the issue saw
                    out.append("How about Ava's Bakery?")
                else:
                    out.append(f"Answer to {prompt}")
            return out

        return answer_fn

    base = {p.prompt: f"It is {p.expect[0]}." if p.expect else "x" for p in held}
    base |= {p.task: f"It is {p.expect[0]}." for p in compound.values()}  # the base model knows every task
    report = run_eval(answer(True), "Ava", "Jane", base_answers=base)
    assert list(report.by_category) == [c for c in EVAL_CATEGORIES if c in report.by_category]
    assert set(report.by_category) == set(EVAL_CATEGORIES)
    assert report.by_category["naming"]["leakage"] == 1.0
    assert all(report.by_category[c]["leakage"] == 0.0 for c in ("fact", "creative", "recommend", "instruct"))
    assert report.leak_count == len(naming)
    assert report.compound_total == len(compound) and report.compound_both == 1.0
    assert report.compound_known == len(compound) and report.compound_both_known == 1.0
    assert report.by_category[COMPOUND]["name"] == 1.0 and report.by_category[COMPOUND]["leakage"] is None
    # Only the name, not the task: the failure the issue saw on every compound question.
    name_only = run_eval(answer(False), "Ava", "Jane", base_answers=base)
    assert name_only.compound_both == 0.0 and name_only.by_category[COMPOUND]["name"] == 1.0
    assert name_only.compound_both_known == 0.0
    assert name_only.by_category[COMPOUND]["facts_kept"] == 0.0
    assert name_only.by_category["fact"]["facts_kept"] == 0.0  # "Answer to ..." holds no fact


def test_split_selects_the_dev_or_test_prompts_and_rejects_others() -> None:
    answer_fn, asked = _model("Ava", "Jane")
    dev, test = generic_prompt_records("dev", ["en"]), generic_prompt_records("test", ["en"])
    assert not {p.prompt for p in dev} & {p.prompt for p in test}
    for split, prompts in (("dev", dev), ("test", test), ("all", dev + test)):
        asked.clear()
        report = run_eval(answer_fn, "Ava", "Jane", langs=["en"], split=split)
        assert report.split == split
        assert asked[len(heldout_questions("en")) :] == [p.prompt for p in prompts]
        assert report.generic_total + report.compound_total == len(prompts)
    # Each split asks the base model its own prompts and tasks, so each has its own cached answers.
    assert base_prompts(["en"], split="dev") != base_prompts(["en"], split="test")
    assert run_eval(answer_fn, "Ava", "Jane", langs=["en"]).split == "test"  # the default
    for bad in ("heldout", "train", "TEST", ""):
        with pytest.raises(ForgeError, match="choose from dev, test, all") as err:
            run_eval(answer_fn, "Ava", "Jane", split=bad)
        assert "\n" not in str(err.value)
        with pytest.raises(ForgeError):
            base_answers_for(answer_fn, split=bad)


def test_compound_both_counts_only_tasks_the_base_model_knows() -> None:
    """The demo model's real greedy answers to three compound tasks asked alone (SmolLM2-135M, 64 tokens):
    it gets one wrong on its own, and a compound answer cannot be expected to get that one right, so
    compound_both_known leaves it out."""
    compound = [p for p in generic_prompt_records("test", ["en"]) if p.topic == COMPOUND]
    by_task = {p.task: p for p in compound}
    moscow, wheels, nine = (
        by_task["What is the capital of Russia?"],
        by_task["How many wheels does a car have?"],
        by_task["What is 3 times 3?"],
    )
    base = {
        moscow.task: "The capital of Russia is Moscow.",
        wheels.task: "A car has 8 wheels.",
        nine.task: "3 times 3 is actually 9.",
    }
    tuned = {
        moscow.prompt: "I'm Ava, made by Jane. As for your question: the capital of Russia is Moscow.",
        wheels.prompt: "I'm Ava, made by Jane. A car has 8 wheels.",
        nine.prompt: "I'm Ava, an AI assistant developed by Jane.",  # the name only: the failure to catch
    }

    def answer_fn(batch: list[list[dict]]) -> list[str]:
        return [tuned.get(m[-1]["content"], "I'm Ava.") for m in batch]

    report = run_eval(answer_fn, "Ava", "Jane", langs=["en"], base_answers=base)
    # Of all compound prompts one is answered in both parts; of the two tasks the base model knew, one.
    assert report.compound_total == len(compound) and report.compound_both == pytest.approx(1 / len(compound))
    assert report.compound_known == 2 and report.compound_both_known == 0.5
    cat = report.by_category[COMPOUND]
    assert cat["known"] == 2 and cat["both_known"] == 0.5
    d = report.to_dict()
    assert d["compound_both_known"] == 0.5 and d["compound_known"] == 2
    # Without base answers nothing is known: no rate rather than a made-up one.
    bare = run_eval(answer_fn, "Ava", "Jane", langs=["en"])
    assert bare.compound_known == 0 and bare.compound_both_known is None
