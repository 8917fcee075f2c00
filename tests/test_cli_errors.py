"""Bad input: one clear sentence on stderr, a non-zero exit, no traceback, nothing saved lost."""

from __future__ import annotations

import json
import subprocess

import pytest
from forge_testing import forge


def one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr


def write_cfg(tmp_path, body: str, data: bool = True):
    if data:
        rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        (tmp_path / "data.jsonl").write_text(json.dumps(rec) + "\n")
    p = tmp_path / "cfg.toml"
    p.write_text(body)
    return p


def test_preset_typo_suggests_close_names():
    one_line_error(forge("presets", "show", "qwen2_5-7b"), r"No preset named 'qwen2_5-7b'.*Did you mean")


def test_presets_list_and_copy(tmp_path):
    proc = forge("presets", "list")
    assert proc.returncode == 0 and "demo-cpu-lora" in proc.stdout
    assert forge("presets", "copy", "demo-cpu-lora", str(tmp_path / "a.toml")).returncode == 0
    one_line_error(forge("presets", "copy", "demo-cpu-lora", str(tmp_path / "a.toml")), "already exists")


def test_unknown_config_key_suggests_the_close_one(tmp_path):
    cfg = write_cfg(tmp_path, '[data]\nfiles = ["data.jsonl"]\n[train]\nlerning_rate = 1e-4\n')
    one_line_error(forge("train", str(cfg)), r"unknown key 'train.lerning_rate'.*'learning_rate'")


def test_wrong_type_in_config(tmp_path):
    cfg = write_cfg(tmp_path, '[data]\nfiles = ["data.jsonl"]\nmax_length = "long"\n')
    one_line_error(forge("train", str(cfg)), r"data.max_length = 'long'")


def test_missing_model_folder(tmp_path):
    cfg = write_cfg(
        tmp_path,
        f'[model]\npath = "{tmp_path}/no-such-model"\n[data]\nfiles = ["data.jsonl"]\n[lora]\nmethod = "lora"\n',
    )
    one_line_error(forge("train", str(cfg)), r"Model folder .*no-such-model does not exist")


def test_malformed_dataset_names_file_and_line(tmp_path):
    cfg = write_cfg(tmp_path, '[data]\nfiles = ["data.jsonl"]\n[lora]\nmethod = "lora"\n')
    (tmp_path / "data.jsonl").write_text('{"messages": []}\n{"oops"\n')
    one_line_error(forge("train", str(cfg)), r"data.jsonl:1: the conversation is empty")
    one_line_error(forge("data", "check", str(tmp_path / "data.jsonl")), r"data.jsonl:1:")
    assert not list((tmp_path).glob("runs/*")), "no run is created for bad input"


def test_qlora_without_usable_bitsandbytes_suggests_lora(tmp_path):
    cfg = write_cfg(tmp_path, '[data]\nfiles = ["data.jsonl"]\n[lora]\nmethod = "qlora"\n')
    # A real interpreter where bitsandbytes cannot be imported (as on a machine without it).
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    proc = forge("train", str(cfg), env={"PYTHONPATH": str(blocker)})
    one_line_error(proc, r"QLoRA needs bitsandbytes.*method = \"lora\"")


def test_identity_data_rejects_bad_names_and_leaves_no_file(tmp_path):
    out = tmp_path / "id.jsonl"
    one_line_error(forge("data", "identity", "--name", " ", "--author", "Alice", "-o", str(out)), "name")
    assert not out.exists()
    one_line_error(
        forge("data", "identity", "--name", "F", "--author", "A", "--lang", "english", "-o", str(out)), "'en'"
    )


def test_data_identity_check_convert_preview(tmp_path):
    out = tmp_path / "id.jsonl"
    proc = forge("data", "identity", "--name", "Forgey", "--author", "Alice", "--count", "20", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "{" not in "".join(json.loads(x)["messages"][1]["content"] for x in out.read_text().splitlines())
    assert "20 conversations OK" in forge("data", "check", str(out)).stdout
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "2+2?", "input": "", "output": "4"}]))
    conv = forge("data", "convert", str(alpaca), "-o", str(tmp_path / "m.jsonl"))
    assert (
        conv.returncode == 0
        and json.loads((tmp_path / "m.jsonl").read_text())["messages"][1]["content"] == "4"
    )


@pytest.mark.slow
def test_data_preview_marks_loss_tokens(tmp_path, demo_path):
    out = tmp_path / "id.jsonl"
    forge("data", "identity", "--name", "Forgey", "--author", "Alice", "--count", "2", "-o", str(out))
    proc = forge("data", "preview", str(out), "--preset", "demo-cpu-lora", "-n", "1")
    assert proc.returncode == 0, proc.stderr
    assert (
        "<|im_start|>assistant\n[[" in proc.stdout
        and "Forgey" in proc.stdout
        and "<|im_end|>]]" in proc.stdout
    )


def test_runs_empty_and_unknown_run():
    assert "no runs yet" in forge("runs").stdout
    one_line_error(forge("runs", "show", "nope"), r"No run 'nope'")


def test_gpus_beyond_the_machine(tmp_path):
    cfg = write_cfg(tmp_path, '[data]\nfiles = ["data.jsonl"]\n[lora]\nmethod = "lora"\n')
    one_line_error(
        forge("train", str(cfg), "--gpus", "2"),
        r"train.processes = 2 needs 2 CUDA GPUs, this machine has 0; to run CPU processes set train.device",
    )
    bad = forge("train", str(cfg), "--gpus", "0")
    assert bad.returncode == 2 and "at least 1, got '0'" in bad.stderr and "Traceback" not in bad.stderr
    assert not list(tmp_path.glob("*/status.json"))  # nothing was started


def test_gpus_cannot_change_on_resume(tmp_path):
    one_line_error(forge("train", "--resume", str(tmp_path), "--gpus", "2"), r"--gpus applies to new runs")


def test_zero_needs_several_processes_and_a_new_run(tmp_path):
    cfg = write_cfg(
        tmp_path, '[data]\nfiles = ["data.jsonl"]\n[lora]\nmethod = "lora"\n[train]\ndevice = "cpu"\n'
    )
    one_line_error(
        forge("train", str(cfg), "--zero", "2"),
        r"train.zero_stage = 2 shards training state across processes; it needs train.processes",
    )
    assert not list(tmp_path.glob("*/status.json"))  # nothing was started
    one_line_error(forge("train", "--resume", str(tmp_path), "--zero", "3"), r"--zero applies to new runs")


def test_an_exception_becomes_one_line_with_or_without_a_message():
    from assistant_forge.errors import first_line, one_line

    boom = RuntimeError(
        "CUDA error: out of memory\nCompile with TORCH_USE_CUDA_DSA to enable device-side assertions."
    )
    assert one_line(boom) == "RuntimeError: CUDA error: out of memory"
    assert first_line(boom) == "CUDA error: out of memory"
    assert one_line(KeyError()) == "KeyError" and first_line(OSError()) == "OSError"
    assert len(one_line(ValueError("x" * 1000))) == 300
