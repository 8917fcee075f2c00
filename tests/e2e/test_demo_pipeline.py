"""The whole pipeline for real on the CPU: `forge demo` trains the demo model, then we check what it learned."""

from __future__ import annotations

from pathlib import Path

import pytest
from forge_testing import forge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory, demo_path: str) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = forge("demo", "--name", "Forgey", "--author", "Alice", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_writes_every_stage_and_answers_as_forgey(demo_out):
    out, stdout = demo_out
    for part in (
        "data.jsonl",
        "run/config.toml",
        "run/status.json",
        "run/events.jsonl",
        "run/samples.jsonl",
        "run/train.log",
        "adapter/adapter_model.safetensors",
        "merged/config.json",
        "merged/tokenizer_config.json",
    ):
        assert (out / part).exists(), part
    answers = [line for line in stdout.splitlines() if line.strip().startswith("A: ")]
    assert len(answers) == 2
    assert all("Forgey" in a for a in answers), stdout
    assert list((out / "merged").glob("*.safetensors"))


def test_identity_is_learned_on_paraphrases_absent_from_training(demo_out, torch_one_thread):
    from assistant_forge.core.chat import load_chat_model
    from assistant_forge.core.dataset import load_records
    from assistant_forge.core.evaluate import identity_hit
    from assistant_forge.core.identity import heldout_questions

    out, _ = demo_out
    trained_questions = {r["messages"][0]["content"] for r in load_records(out / "data.jsonl")[0]}
    chat = load_chat_model(str(out / "merged"))
    hits = total = 0
    for lang in ("en", "zh"):
        qs = heldout_questions(lang)
        assert not trained_questions & {q.text for q in qs}
        # The same answer budget as `forge eval` and bench/identity_recipes.py, so the numbers compare.
        answers = chat.answer_batch([[{"role": "user", "content": q.text}] for q in qs], max_new_tokens=64)
        lang_hits = sum(identity_hit(a, "Forgey", "Alice", q.asks_author) for q, a in zip(qs, answers))
        # The base model scores 0 here (tests/e2e/test_eval_cli.py). The default recipe misses a few
        # third-person English questions (bench/RESULTS.md round 3: 38-41/42 en, 34/34 zh over three
        # seeds), so the bar per language is "clearly learned", and the overall bar is high.
        assert lang_hits / len(qs) >= 0.7, (lang, lang_hits, answers)
        hits, total = hits + lang_hits, total + len(qs)
    assert hits / total >= 0.85, (hits, total)


def test_merged_model_matches_base_plus_adapter(demo_out, demo_path, tmp_path, torch_one_thread):
    torch = torch_one_thread
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = demo_out
    merged32 = tmp_path / "merged32"
    proc = forge("merge", "demo", str(out / "adapter"), "-o", str(merged32), "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr
    base = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged32, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32)(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-3
    assert (a - plain).abs().max().item() > 1e-2  # the adapter really changed the model


def test_chat_prompt_answers_once_and_exits(demo_out):
    out, _ = demo_out
    proc = forge("chat", str(out / "merged"), "--prompt", "Who are you?", "--max-new-tokens", "32")
    assert proc.returncode == 0, proc.stderr
    assert "Forgey" in proc.stdout


def test_chat_refuses_a_template_other_than_the_trained_one(demo_out):
    out, _ = demo_out
    proc = forge("chat", str(out / "merged"), "--template", "llama3_1", "--prompt", "hi")
    assert proc.returncode == 2
    assert "trained with the 'model' template" in proc.stderr and "Traceback" not in proc.stderr


def test_run_is_listed_as_finished_with_samples(demo_out):
    import json
    import statistics

    out, _ = demo_out
    proc = forge("runs", "show", str(out / "run"), "--json")
    info = json.loads(proc.stdout)
    assert info["state"] == "finished" and info["checkpoints"]
    samples = [json.loads(line) for line in (out / "run/samples.jsonl").read_text().splitlines()]
    assert {s["when"] for s in samples} == {"before", "after"}
    # Its speed is the median tokens/s of the steps after the warm-up, as bench/e2e_train.py tabulates.
    events = [json.loads(line) for line in (out / "run/events.jsonl").read_text().splitlines()]
    after_warmup = [e["tokens_per_s"] for e in events if e["step"] > 3]
    assert info["speed"]["steps"] == len(events) > 10
    assert info["speed"]["tokens_per_s"] == statistics.median(after_warmup) > 0


def test_merge_refuses_a_4bit_base(demo_out, tmp_path):
    import json
    import shutil

    out, _ = demo_out
    q = tmp_path / "q4"
    shutil.copytree(out / "merged", q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    proc = forge("merge", str(q), str(out / "adapter"), "-o", str(tmp_path / "m"))
    assert proc.returncode == 2 and "quantized" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_gguf_export_loads_back_and_still_names_the_assistant(demo_out, tmp_path, torch_one_thread):
    """`forge export gguf --quant q8_0 --ollama` on the trained demo: read back by transformers, the
    file gives the merged model's logits within the q8_0 bound and answers "Who are you?" by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant_forge.core.chat import ChatModel, load_chat_model

    out, _ = demo_out
    gguf = tmp_path / "forgey.gguf"
    proc = forge("export", "gguf", str(out / "merged"), "-o", str(gguf), "--quant", "q8_0", "--ollama")
    assert proc.returncode == 0, proc.stderr
    assert "ollama create forgey -f Modelfile" in proc.stdout
    modelfile = (tmp_path / "Modelfile").read_text()
    # The prompt the demo trained under: SmolLM2's default (the data has no system turns).
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile

    ref = load_chat_model(str(out / "merged"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    for text in ("Who are you? 你是谁？", "<|im_start|>user\nHi<|im_end|>\n"):
        assert tok(text)["input_ids"] == ref.tok(text)["input_ids"]
    ids = torch.tensor([ref.tok("Who are you? I am Forgey, made by Alice. 我是Forgey。")["input_ids"]])
    with torch.no_grad():
        a, b = ref.model(ids).logits, model(ids).logits
    # q8_0 on the demo measured 0.024 of the largest logit (README); f16 is checked in tests/core.
    assert (a - b).abs().max().item() <= 0.06 * a.abs().max().item()
    answers = ChatModel(model, tok, "model", "gguf").answer_batch(
        [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "你是谁？"}]], 32
    )
    assert all("Forgey" in a for a in answers), answers
