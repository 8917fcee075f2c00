"""InternLM2 loads natively: the hub-format tiny-a checkpoint converted to Llama reproduces the hub
code's logits and greedy tokens, the real tokenizer its ids, and the hub layout round-trips.

Fixtures (tests/fixtures/internlm2, data only): tiny-a is a random-weight InternLM2 in the hub's exact
layout with the ORIGINAL remote code's fp32 logits and greedy ids (transformers 4.46.3);
tokenizer-real is InternLM's 92544-piece SentencePiece model with the hub tokenizers' ids.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assistant_forge.core import internlm2
from assistant_forge.core.models import resolve_model
from assistant_forge.errors import ForgeError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "internlm2"
TINY = FIX / "tiny-a"
REAL_TOK = FIX / "tokenizer-real"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Conversions go to a cache of this test, never the user's (and never a stale copy).
    cache = tmp_path / "cache"
    monkeypatch.setenv("FORGE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads((TINY / "reference.json").read_text()), load_file(str(TINY / "reference.safetensors"))


def _load(folder: Path | str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True).eval()


def _logits(model, ids, positions):
    import torch

    with torch.no_grad():
        out = model(ids[None], attention_mask=torch.ones_like(ids)[None], use_cache=False)
    return out.logits[0][positions]


def _max_diff(folder: Path, ref: dict, indices: tuple[int, ...]) -> float:
    """Largest |logit - reference| over the given prompts, a fresh model per prompt."""
    return max(
        (_logits(_load(folder), ref[f"input_ids_{i}"], ref[f"logit_positions_{i}"]) - ref[f"logits_{i}"])
        .abs()
        .max()
        .item()
        for i in indices
    )


@pytest.mark.parametrize("i", [0, 1, 2])
def test_native_model_reproduces_the_hub_code(i: int, reference, torch_one_thread) -> None:
    """Prompt 2 has 652 tokens (> max_position_embeddings 512): the dynamic NTK rope is exercised."""
    torch = torch_one_thread
    meta, ref = reference
    native = Path(resolve_model(str(TINY)))
    model = _load(native)  # fresh per prompt, as the references were made
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = ref[f"input_ids_{i}"]
    diff = (_logits(model, ids, ref[f"logit_positions_{i}"]) - ref[f"logits_{i}"]).abs().max().item()
    assert diff < 1e-4, diff
    # generation_config.json's eos list [2, 1022] is in force (none of the references stops early).
    assert model.generation_config.eos_token_id == [2, 1022]
    out = model.generate(
        ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=12, do_sample=False
    )
    assert out[0, len(ids) :].tolist() == ref[f"greedy_ids_{i}"].tolist()
    assert meta["prompts"][i]["greedy_ids"] == ref[f"greedy_ids_{i}"].tolist()


def test_tokenizer_and_its_own_template_give_the_reference_ids(reference) -> None:
    """forge's tokenizer with the model's own template (kept through the conversion)."""
    from assistant_forge.core.encoding import encode_chat, load_tokenizer

    meta, ref = reference
    tok = load_tokenizer(resolve_model(str(TINY)), "model")
    hub_template = json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"]
    assert tok.chat_template == hub_template
    assert len(tok) == 1024  # the special tokens took the placeholder ids instead of new ones
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|plugin|>"]) == [1023, 1022, 1018]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok("hi").input_ids[0] == 1  # add_bos_token as the hub says
    for i, p in enumerate(meta["prompts"]):
        text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        assert text == p["rendered"]
        # The rendering starts with the text <s>: no second BOS.
        assert tok(text, add_special_tokens=False).input_ids == ref[f"input_ids_{i}"].tolist()
    # Training on it: the loss falls on the answer and its <|im_end|> (id 1022), nothing else.
    messages = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Forgey."}]
    enc = encode_chat(tok, messages, 256)
    labelled = [t for t in enc["labels"] if t != -100]
    assert labelled[-1] == 1022 and tok.decode(labelled[:-1]) == "I am Forgey."


def test_real_tokenizer_gives_the_hub_tokenizers_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    internlm2.write_native_tokenizer(REAL_TOK, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    refs = json.loads((REAL_TOK / "reference_tokens.json").read_text())
    assert len(tok) == refs["vocab_size"] == 92544
    for piece, idx in refs["special_token_ids"].items():
        assert tok.convert_tokens_to_ids(piece) == idx, piece
    checked = 0
    for name, r in refs["texts"].items():
        if not r["slow_fast_equal"]:  # the literal text [UNUSED_TOKEN_146]: the two hub tokenizers disagree
            continue
        assert tok(r["text"], add_special_tokens=False).input_ids == r["ids_no_special"], name
        assert tok(r["text"]).input_ids == r["ids_with_special"], name
        checked += 1
    assert checked == 12


def test_native_folder_is_plain_transformers(tmp_path: Path) -> None:
    """No auto_map, no remote code: transformers' own Auto classes load it (trust_remote_code left off)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    native = Path(resolve_model(str(TINY)))
    assert native.parent == Path(os.environ["FORGE_CACHE_DIR"]) / "native"
    cfg = json.loads((native / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["model_type"] == "llama"
    assert cfg["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    assert "auto_map" not in json.loads((native / "tokenizer_config.json").read_text())
    assert not list(native.glob("*.py"))
    assert AutoConfig.from_pretrained(str(native)).model_type == "llama"
    model = AutoModelForCausalLM.from_pretrained(str(native), use_safetensors=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert internlm2.source_folder(native) == TINY.resolve()


def test_conversion_is_cached_and_redone_when_the_checkpoint_changes(tmp_path: Path) -> None:
    src = tmp_path / "m"
    shutil.copytree(TINY, src)
    first = internlm2.native_dir(src)
    stamp = (first / ".complete").stat().st_mtime_ns
    assert internlm2.native_dir(src) == first and (first / ".complete").stat().st_mtime_ns == stamp
    later = time.time() + 5
    os.utime(src / "model.safetensors", (later, later))  # the weights were replaced
    second = internlm2.native_dir(src)
    assert second != first and (second / ".complete").is_file()
    assert not first.exists()  # the stale copy of the same folder is dropped


def test_4bit_nf4_load_generates(torch_one_thread) -> None:
    """forge's chat loader with --bits 4 on the InternLM2 folder: bitsandbytes NF4 on the CPU."""
    from assistant_forge.core.chat import load_chat_model

    chat = load_chat_model(str(TINY), bits=4, device="cpu")
    assert "Linear4bit" in {type(m).__name__ for m in chat.model.modules()}
    assert chat.label == "tiny-a"
    ids = chat.tok("Hello", return_tensors="pt").input_ids
    out = chat.model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in internlm2.weight_files(folder):  # (tiny-a also holds reference.safetensors)
        out.update(load_file(str(folder / f)))
    return out


def _same(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_hub_layout_round_trip_is_identical(tmp_path: Path) -> None:
    """hub layout -> native -> hub layout: the same tensors (names, dtypes, bits) and config."""
    base = tmp_path / "base"
    shutil.copytree(TINY, base)
    # A stand-in for the hub's remote-code files (the fixture carries none): they are copied over.
    (base / "modeling_internlm2.py").write_text("# placeholder for the hub's modelling code\n")
    out = tmp_path / "hub"
    out.mkdir()
    internlm2.write_hub_layout(internlm2.native_dir(base), base, out)
    _same(_tensors(out), _tensors(TINY))
    assert json.loads((out / "config.json").read_text()) == json.loads((TINY / "config.json").read_text())
    assert (out / "modeling_internlm2.py").read_text() == (base / "modeling_internlm2.py").read_text()
    assert (out / "tokenizer.model").read_bytes() == (TINY / "tokenizer.model").read_bytes()
    hub_tok = json.loads((out / "tokenizer_config.json").read_text())
    assert hub_tok["auto_map"] and hub_tok["tokenizer_class"] == "InternLM2Tokenizer"
    assert (
        hub_tok["chat_template"] == json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"]
    )


def _adapter(tmp_path: Path) -> Path:
    """A real LoRA adapter on the native model with non-zero B, so merging changes the weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        _load(resolve_model(str(TINY))),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    (out / "forge_adapter.json").write_text(json.dumps({"base_model": str(TINY), "chat_template": "model"}))
    return out


def test_merge_hub_layout_matches_the_native_merge(tmp_path: Path) -> None:
    import torch

    from assistant_forge.core.merge import merge

    adapter = _adapter(tmp_path)
    native = merge(str(TINY), adapter, tmp_path / "native", dtype="fp32")
    hub = merge(str(TINY), adapter, tmp_path / "hub", dtype="fp32", hub_layout=True)
    assert json.loads((hub / "config.json").read_text()) == json.loads((TINY / "config.json").read_text())
    wqkv = "model.layers.0.attention.wqkv.weight"
    assert not torch.equal(_tensors(hub)[wqkv], _tensors(TINY)[wqkv])  # the adapter is in
    assert "auto_map" not in json.loads((native / "config.json").read_text())  # plain transformers loads it
    assert type(_load(native)).__name__ == "LlamaForCausalLM"
    # forge reads its own hub-layout output back to exactly the natively merged weights.
    _same(_tensors(internlm2.native_dir(hub)), _tensors(native))
    assert json.loads((hub / "forge_adapter.json").read_text())["chat_template"] == "model"
    assert "<|im_start|>" in json.loads((hub / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((hub / "generation_config.json").read_text())["eos_token_id"] == [1022, 2]
    assert not list(tmp_path.glob(".hub*")) and not list(tmp_path.glob(".native*"))  # no staging left
    # A bf16 merge of the fp32 base: the hub config says so, and nothing else in it changes.
    bf16 = merge(str(TINY), adapter, tmp_path / "hub16", dtype="bf16", hub_layout=True)
    assert {t.dtype for t in _tensors(bf16).values()} == {torch.bfloat16}
    assert json.loads((bf16 / "config.json").read_text()) == {
        **json.loads((TINY / "config.json").read_text()),
        "torch_dtype": "bfloat16",
    }


def test_hub_layout_is_refused_for_other_bases(tmp_path: Path) -> None:
    from assistant_forge.core.merge import merge

    llama = tmp_path / "llama"
    shutil.copytree(internlm2.native_dir(TINY), llama)
    (llama / internlm2.SOURCE_NOTE).unlink()  # a plain Llama folder now
    adapter = _adapter(tmp_path)
    with pytest.raises(ForgeError, match=r"--hub-layout .* is not an InternLM2 model"):
        merge(str(llama), adapter, tmp_path / "out", hub_layout=True)
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_leaves_no_cache_folder(tmp_path: Path, _own_cache: Path) -> None:
    src = tmp_path / "broken"
    shutil.copytree(TINY, src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ForgeError) as e:
        resolve_model(str(src))
    msg = str(e.value)
    assert (
        "\n" not in msg and "Could not convert the InternLM2 checkpoint" in msg and "nothing was kept" in msg
    )
    assert [p.name for p in (_own_cache / "native").iterdir()] == [".lock"]
    # A conversion killed outright (no cleanup ran) leaves its staging folder: the next one removes it.
    orphan = _own_cache / "native" / ".tiny-a-123.tmpabc"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    shutil.copy2(TINY / "model.safetensors", src / "model.safetensors")
    assert (Path(resolve_model(str(src))) / ".complete").is_file()
    assert not orphan.exists()


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "bin"
    shutil.copytree(TINY, src)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(ForgeError, match="loads weights from safetensors files only"):
        resolve_model(str(src))


def test_wqkv_split_layout() -> None:
    """Rows per kv group are [q x groups, k, v]; fuse_qkv inverts the split exactly."""
    import torch

    kv, groups, hd = 2, 4, 3
    w = torch.arange(kv * (groups + 2) * hd).float()[:, None].repeat(1, 5)
    q, k, v = internlm2.split_wqkv(w, kv, groups, hd)
    rows = lambda t: t[:, 0].long().tolist()  # noqa: E731
    # kv group 0 owns rows 0..17: q rows 0..11, k 12..14, v 15..17; group 1 the next 18.
    assert rows(q) == [*range(0, 12), *range(18, 30)]
    assert rows(k) == [*range(12, 15), *range(30, 33)]
    assert rows(v) == [*range(15, 18), *range(33, 36)]
    assert torch.equal(internlm2.fuse_qkv(q, k, v, kv, groups, hd), w)
    bias = torch.arange(kv * (groups + 2) * hd).float()
    assert torch.equal(internlm2.fuse_qkv(*internlm2.split_wqkv(bias, kv, groups, hd), kv, groups, hd), bias)


def _contiguous_split(w, kv_heads, groups, head_dim):
    q = kv_heads * groups * head_dim
    return tuple(t.clone() for t in w.split([q, kv_heads * head_dim, kv_heads * head_dim]))


@pytest.mark.parametrize(
    "mistake",
    ["qkv split contiguous", "w1/w3 swapped", "norms swapped", "rope_scaling dropped", "rope_theta wrong"],
)
def test_each_known_mistake_fails_the_check(
    mistake: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference
) -> None:
    """The check above is sharp: each mapping mistake families/README.md lists moves the logits > 1e-4."""
    _, ref = reference
    good = tmp_path / "good"
    good.mkdir()
    internlm2.convert_checkpoint(TINY, good)
    if mistake == "qkv split contiguous":
        monkeypatch.setattr(internlm2, "split_wqkv", _contiguous_split)
    elif mistake == "w1/w3 swapped":
        monkeypatch.setitem(internlm2.LAYER_MAP, "feed_forward.w1", "mlp.up_proj")
        monkeypatch.setitem(internlm2.LAYER_MAP, "feed_forward.w3", "mlp.gate_proj")
    elif mistake == "norms swapped":
        monkeypatch.setitem(internlm2.LAYER_MAP, "attention_norm", "post_attention_layernorm")
        monkeypatch.setitem(internlm2.LAYER_MAP, "ffn_norm", "input_layernorm")
    elif mistake == "rope_scaling dropped":
        monkeypatch.setattr(
            internlm2, "rope_parameters", lambda hub: {"rope_type": "default", "rope_theta": 1e6}
        )
    else:
        wrong = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}  # Llama-2's default base
        monkeypatch.setattr(internlm2, "rope_parameters", lambda hub: wrong)
    bad = tmp_path / "bad"
    bad.mkdir()
    internlm2.convert_checkpoint(TINY, bad)
    assert _max_diff(good, ref, (2,)) < 1e-4
    assert _max_diff(bad, ref, (2,)) > 1e-4


def test_config_mapping_variants() -> None:
    hub = json.loads((TINY / "config.json").read_text())
    plain = internlm2.llama_config({**hub, "rope_scaling": None, "bias": True})
    assert plain.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert plain.attention_bias and not plain.mlp_bias
    linear = internlm2.llama_config({**hub, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert linear.rope_parameters["rope_type"] == "linear" and linear.rope_parameters["factor"] == 4.0
    with pytest.raises(ForgeError, match="rope_scaling"):
        internlm2.llama_config({**hub, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ForgeError, match="InternLM2ForRewardModel"):
        internlm2.llama_config({**hub, "architectures": ["InternLM2ForRewardModel"]})


def test_forge_chat_on_the_hub_folder_needs_no_remote_code(tmp_path: Path) -> None:
    """The real CLI: no trust_remote_code question (stdin is closed, so a prompt would fail), any text."""
    env = {**os.environ, "FORGE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "assistant_forge",
            "chat",
            str(TINY),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "trust_remote_code" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_train_convert_merge_chat_on_the_hub_folder(tmp_path: Path) -> None:
    """The real CLI on tiny-a: QLoRA (NF4 on the CPU) with packing, then convert, merge --hub-layout, chat."""
    from forge_testing import forge

    from assistant_forge.core.dataset import write_records
    from assistant_forge.core.identity import generate_identity_records

    write_records(
        generate_identity_records("Forgey", "Alice", langs=["en"], count=16), tmp_path / "data.jsonl"
    )
    (tmp_path / "cfg.toml").write_text(f"""
[model]
path = "{TINY}"
[data]
files = ["data.jsonl"]
max_length = 128
packing = true
[lora]
method = "qlora"
r = 4
alpha = 8
dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[train]
max_steps = 2
micro_batch_size = 2
grad_accum = 1
save_steps = 2
optimizer = "adamw_torch"
gradient_checkpointing = false
cpu_threads = 1
[eval]
prompts = []
""")
    env = {"FORGE_CACHE_DIR": os.environ["FORGE_CACHE_DIR"]}
    trained = forge("train", str(tmp_path / "cfg.toml"), env=env, stdin=subprocess.DEVNULL)
    assert trained.returncode == 0 and "run finished" in trained.stdout, trained.stdout + trained.stderr
    [status] = Path(os.environ["FORGE_RUNS_DIR"]).glob("*/status.json")
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert forge("convert", str(status.parent), "-o", str(adapter), env=env).returncode == 0
    meta = json.loads((adapter / "forge_adapter.json").read_text())
    assert meta["base_model"] == meta["base_model_path"] == str(TINY)  # the user's folder, not the cache
    done = forge(
        "merge", str(TINY), str(adapter), "-o", str(merged), "--hub-layout", "--dtype", "fp32", env=env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((merged / "config.json").read_text()) == json.loads((TINY / "config.json").read_text())
    chat = forge("chat", str(merged), "--prompt", "Who are you?", "--max-new-tokens", "4", env=env)
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr
