"""Cached base-model answers: the key follows what decides them, and the demo's shipped replay answers
are found by the trainer's own key and are what the real demo model generates (greedy, exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant_forge.core import answer_cache
from assistant_forge.core.encoding import with_system
from assistant_forge.core.identity import generic_prompts


@pytest.fixture
def answers_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "answers"
    monkeypatch.setenv("FORGE_ANSWERS_DIR", str(folder))
    return folder


def test_key_follows_model_prompts_budget_and_runtime() -> None:
    key = answer_cache.answers_key("m1", ["<p>a", "<p>b"], 40, "cpu")
    assert key == answer_cache.answers_key("m1", ["<p>a", "<p>b"], 40, "cpu")
    others = [
        answer_cache.answers_key("m2", ["<p>a", "<p>b"], 40, "cpu"),
        answer_cache.answers_key("m1", ["<sys>x<p>a", "<p>b"], 40, "cpu"),  # another system prompt
        answer_cache.answers_key("m1", ["<p>a"], 40, "cpu"),
        answer_cache.answers_key("m1", ["<p>a", "<p>b"], 64, "cpu"),
        answer_cache.answers_key("m1", ["<p>a", "<p>b"], 40, "cuda bf16"),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_fingerprint_changes_with_the_weights_and_is_remembered(tmp_path: Path, answers_dir: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    weights = model / "model.safetensors"
    weights.write_bytes(b"\0" * 1000)
    first = answer_cache.model_fingerprint(model)
    assert answer_cache.model_fingerprint(model) == first
    memo = json.loads((answers_dir / "file_digests.json").read_text())
    assert str(weights.resolve()) in memo  # hashed once, then looked up by size and mtime
    weights.write_bytes(b"\1" * 1001)
    assert answer_cache.model_fingerprint(model) != first
    with pytest.raises(FileNotFoundError):
        answer_cache.model_fingerprint(tmp_path)


def test_store_lookup_and_a_damaged_file(answers_dir: Path) -> None:
    path = answer_cache.store("k1", ["q1", "q2"], ["a1", "a2"])
    assert answer_cache.lookup("k1", ["q1", "q2"]) == ["a1", "a2"]
    assert answer_cache.lookup("k1", ["q1", "other"]) is None  # the file answers other prompts
    assert answer_cache.lookup("missing", ["q1"]) is None
    path.write_text("{not json")
    assert answer_cache.lookup("k1", ["q1", "q2"]) is None


def test_shipped_demo_replay_answers_are_found_and_regenerate_exactly(
    demo_path: str, answers_dir: Path, torch_one_thread
) -> None:
    from assistant_forge.core.chat import generate_answers
    from assistant_forge.core.presets import get_preset
    from assistant_forge.training.modeling import build_model

    cfg = get_preset("demo-cpu-lora").load()
    model, tok = build_model(cfg)
    # The conversations build_replay asks (training/trainer.py), under the preset's settings.
    prompts = generic_prompts("replay")[: cfg.data.replay_prompts]
    convs = [with_system([{"role": "user", "content": p}], cfg.data.system_prompt) for p in prompts]

    def generate() -> list[str]:
        raise AssertionError("the demo's replay answers were not found in sample_data/base_answers")

    with model.disable_adapter():
        answers, cached = answer_cache.cached_answers(
            cfg.model.path, model, tok, convs, cfg.eval.max_new_tokens, generate
        )
        assert cached and len(answers) == len(prompts)
        # The trainer generates in batches of 64 on a CPU; its last batch, regenerated the same way.
        start = (len(convs) - 1) // 64 * 64
        again = generate_answers(model, tok, convs[start:], cfg.eval.max_new_tokens, batch_size=64)
    assert again == answers[start:]
