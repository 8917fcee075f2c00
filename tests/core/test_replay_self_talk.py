"""Replay answers in which the base model speaks of itself stay out of the forgetting guard
(training/data.py speaks_of_itself, training/trainer.py build_replay)."""

from __future__ import annotations

from pathlib import Path

import pytest

from assistant_forge.core import answer_cache
from assistant_forge.core.identity import generic_prompts
from assistant_forge.core.runs import read_jsonl
from assistant_forge.training.data import speaks_of_itself


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry for any misunderstanding, but as a chatbot designed to assist users, I can't.",
        "I'm sorry for the misunderstanding, but as a text-based AI, I don't have the ability.",
        "I'm here to help you with your creative writing. I'm a writing assistant.",
        "As an AI language model, I don't have favourite films.",
        "My name is Luna and I can help.",
        "我是一个美好的美风，你可以看到我是一个智慧的美",
        "作为一个AI助手，我没有个人喜好。",
    ],
)
def test_self_talk_is_recognised(answer: str) -> None:
    assert speaks_of_itself(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "The capital of France is Paris.",
        'How about "Biscuit"? It\'s cute and fits a small, round guinea pig.',
        'I\'m going to suggest a classic: try "Casablanca".',
        "Moving a houseplant into a larger pot is easy: water it first, then lift it out gently.",
        "Dear Sam, I am so proud of you.",
        "叫“棉花糖”怎么样？白白软软，很适合小兔子。",
        "自我是一个哲学概念。",
    ],
)
def test_ordinary_answers_are_kept(answer: str) -> None:
    assert not speaks_of_itself(answer)


def test_demo_replay_leaves_out_only_self_talk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_path: str, torch_one_thread
) -> None:
    """The demo's replay (its shipped base answers) without the answers where the model speaks of itself."""
    from assistant_forge.core.presets import get_preset
    from assistant_forge.training.modeling import build_model
    from assistant_forge.training.trainer import build_replay

    monkeypatch.setenv("FORGE_ANSWERS_DIR", str(tmp_path / "answers"))  # only the shipped answers
    cfg = get_preset("demo-cpu-lora").load()
    model, tok = build_model(cfg)
    recs = build_replay(tmp_path, cfg, model, tok)
    shipped = {
        r["prompt"]: r["answer"] for f in answer_cache.shipped_dir().glob("*.jsonl") for r in read_jsonl(f)
    }
    answers = {p: shipped[p] for p in generic_prompts("replay")[: cfg.data.replay_prompts]}
    kept = {r["messages"][-2]["content"] for r in recs}
    self_talk = {p for p, a in answers.items() if speaks_of_itself(a)}
    assert self_talk, "the demo model speaks of itself in some replay answers; the check must see them"
    assert kept == {p for p, a in answers.items() if a.strip()} - self_talk
    assert read_jsonl(tmp_path / "replay.jsonl") == recs  # what a resumed run reads back
