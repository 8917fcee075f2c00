import importlib.util
from pathlib import Path

import pytest

from assistant_forge.core.config import ForgeConfig, load_config, parse_config, save_config
from assistant_forge.core.presets import copy_preset, get_preset, list_presets
from assistant_forge.errors import ForgeError

REQUIRED_PRESETS = {
    "demo-cpu-lora",
    "internlm2_5-7b-chat-qlora",
    "internlm2_5-7b-chat-qlora-oasst1",
    "internlm2-chat-1_8b-qlora",
    "qwen2_5-0_5b-instruct-qlora",
    "qwen2_5-1_5b-instruct-qlora",
    "qwen2_5-7b-instruct-qlora",
    "llama3_1-8b-instruct-qlora",
    "mistral-7b-instruct-qlora",
    "yi-1_5-6b-chat-qlora",
}


def test_every_required_preset_is_bundled():
    assert {p.name for p in list_presets()} >= REQUIRED_PRESETS


@pytest.mark.parametrize("name", sorted(REQUIRED_PRESETS))
def test_preset_loads_validates_and_is_headed_by_its_command(name):
    p = get_preset(name)
    cfg = p.load()
    first = p.path.read_text().splitlines()[0]
    assert first.startswith("# forge ") and name in first
    if name != "demo-cpu-lora":
        # XTuner's QLoRA defaults
        assert (cfg.lora.method, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == ("qlora", 64, 16, 0.1)
        assert (cfg.data.max_length, cfg.data.packing, cfg.train.learning_rate) == (2048, True, 2e-4)
        assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.epochs) == (1, 16, 3)
        assert len(cfg.lora.target_modules) >= 5
        assert cfg.meta.min_gpu_gib > 0


def test_toml_round_trip(tmp_path):
    cfg = get_preset("qwen2_5-7b-instruct-qlora").load()
    save_config(cfg, tmp_path / "c.toml")
    again = load_config(tmp_path / "c.toml")
    # data files are resolved relative to the file they are read from
    assert again.model_dump(exclude={"data"}) == cfg.model_dump(exclude={"data"})
    assert [Path(f).name for f in again.data.files] == ["data.jsonl"]


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ForgeError, match=r"unknown key 'train.lerning_rate'.*learning_rate"):
        parse_config({"train": {"lerning_rate": 1e-4}}, "x.toml")
    with pytest.raises(ForgeError, match=r"unknown key 'trian'.*'train'"):
        parse_config({"trian": {}}, "x.toml")


def test_wrong_type_and_range_name_the_field():
    with pytest.raises(ForgeError, match=r"train.epochs = 'three'"):
        parse_config({"train": {"epochs": "three"}})
    with pytest.raises(ForgeError, match=r"lora.r = 0"):
        parse_config({"lora": {"r": 0}})
    with pytest.raises(ForgeError, match=r"lora.method = 'qlor'"):
        parse_config({"lora": {"method": "qlor"}})
    with pytest.raises(ForgeError, match=r"unknown chat template 'chatm'"):
        parse_config({"model": {"chat_template": "chatm"}})


def test_bad_toml_file(tmp_path):
    (tmp_path / "bad.toml").write_text("[train\nepochs = 1\n")
    with pytest.raises(ForgeError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ForgeError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_copy_preset_keeps_comments_and_refuses_to_overwrite(tmp_path):
    dest = copy_preset("qwen2_5-0_5b-instruct-qlora", tmp_path / "my.toml")
    text = dest.read_text()
    assert text.startswith(f"# forge train {dest}")
    assert "# Forgetting guard" in text
    assert load_config(dest).model.path == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ForgeError, match="already exists"):
        copy_preset("qwen2_5-0_5b-instruct-qlora", dest)


def test_preset_typo_suggests_names():
    with pytest.raises(ForgeError, match="Did you mean 'qwen2_5-7b-instruct-qlora'"):
        get_preset("qwen2_5-7b-instruct-qlor")


def test_defaults_are_valid():
    assert ForgeConfig().lora.method == "qlora"


def test_zero_stage_is_0_2_or_3_and_needs_processes_and_deepspeed(monkeypatch):
    from assistant_forge.core import runs

    assert ForgeConfig().train.zero_stage == 0
    with pytest.raises(ForgeError, match=r"train.zero_stage = 1: Input should be 0, 2 or 3"):
        parse_config({"train": {"zero_stage": 1}})
    cfg = parse_config({"train": {"zero_stage": 3}})
    with pytest.raises(ForgeError, match=r"zero_stage = 3 shards .* needs train.processes .* 2 or more\.$"):
        runs.zero_preflight(cfg)
    cfg.train.processes = 2
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(ForgeError, match=r"zero_stage = 3 needs DeepSpeed, which is not installed here"):
        runs.zero_preflight(cfg)
