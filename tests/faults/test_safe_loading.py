"""Nothing let in: weights only from safetensors, no model code unless trusted, no shell strings, no
world-writable runs or outputs."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from forge_testing import FORGE, forge, tiny_config

import assistant_forge

PACKAGE = Path(assistant_forge.__file__).parent


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    return ast.unparse(func)


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _functions(tree: ast.AST) -> dict[ast.Call, str]:
    """Each call -> the source of the function it sits in (the module for top-level calls)."""
    out: dict[ast.Call, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            src = ast.unparse(fn)
            for call in _calls(fn):
                out.setdefault(call, src)
    return out


def test_our_code_loads_no_pickles_builds_no_shell_strings_and_trusts_no_code_by_itself():
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(PACKAGE.parent)
        context = _functions(tree)
        for call in _calls(tree):
            name = _name(call.func)
            shell = _kw(call, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                problems.append(f"{where}:{call.lineno}: {name}(shell=...)")
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                problems.append(f"{where}:{call.lineno}: {name} runs a shell string")
            if name.endswith(("pickle.load", "pickle.loads", "marshal.loads")) or name in ("eval", "exec"):
                problems.append(f"{where}:{call.lineno}: {name}")
            if name == "torch.load":
                w = _kw(call, "weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            trust = _kw(call, "trust_remote_code")
            if isinstance(trust, ast.Constant) and trust.value is True:
                problems.append(f"{where}:{call.lineno}: trust_remote_code=True hard-coded")
            if name == "AutoModelForCausalLM.from_pretrained" and _kw(call, "gguf_file") is None:
                safe = _kw(call, "use_safetensors")
                spread = any(k.arg is None for k in call.keywords) and "use_safetensors" in context.get(
                    call, ""
                )
                if not (spread or (isinstance(safe, ast.Constant) and safe.value is True)):
                    problems.append(
                        f"{where}:{call.lineno}: model weights loaded without use_safetensors=True"
                    )
            if name == "PeftModel.from_pretrained" and "require_safetensors" not in context.get(call, ""):
                problems.append(f"{where}:{call.lineno}: adapter loaded without require_safetensors")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_off_unless_asked_for():
    from assistant_forge.cli import build_parser
    from assistant_forge.core.config import ForgeConfig

    assert ForgeConfig().model.trust_remote_code is False
    parser = build_parser()
    for argv in (["chat", "demo"], ["merge", "demo", "adapter", "-o", "out"]):
        assert parser.parse_args(argv).trust_remote_code is False
    # A preset may turn it on only for models that cannot load otherwise, saying so right above it.
    for preset in (PACKAGE.parent / "presets").glob("*.toml"):
        lines = preset.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.replace(" ", "") == "trust_remote_code=true":
                assert "ship their own" in lines[i - 1] and "internlm" in preset.name, preset


def _model_folder(
    dest: Path, demo: Path, config_changes: dict | None = None, weights: str = "safetensors"
) -> Path:
    dest.mkdir()
    for f in demo.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dest / f.name)
    if weights == "safetensors":
        os.symlink(demo / "model.safetensors", dest / "model.safetensors")
    cfg = json.loads((demo / "config.json").read_text())
    cfg.update(config_changes or {})
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


class _Payload:
    """A pickle that runs code when loaded: what a malicious .bin checkpoint does."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (os.makedirs, (str(self.mark),))


def refused(*argv: str) -> str:
    """Run `forge ARGV` in this process (torch is imported once per session); its one error line."""
    import contextlib
    import io

    from assistant_forge import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(argv))
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err.getvalue())
    return lines[0]


@pytest.mark.slow
def test_a_model_that_needs_its_own_code_is_refused_unless_trusted(tmp_path, demo_path):
    mark = tmp_path / "custom code ran"
    custom = _model_folder(
        tmp_path / "custom",
        Path(demo_path),
        {
            "model_type": "forge_test_llama",
            "architectures": ["ForgeTestForCausalLM"],
            "auto_map": {
                "AutoConfig": "custom_modeling.ForgeTestConfig",
                "AutoModelForCausalLM": "custom_modeling.ForgeTestForCausalLM",
            },
        },
    )
    (custom / "custom_modeling.py").write_text(f"""
import pathlib
from transformers import LlamaConfig, LlamaForCausalLM
pathlib.Path({str(mark)!r}).touch()  # proof that this code ran


class ForgeTestConfig(LlamaConfig):
    model_type = "forge_test_llama"


class ForgeTestForCausalLM(LlamaForCausalLM):
    config_class = ForgeTestConfig
""")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}

    error = refused("chat", str(custom), "--prompt", "hi", "--max-new-tokens", "2")
    assert "ships its own Python code" in error and "--trust-remote-code" in error
    assert "model.trust_remote_code = true" in refused(
        "train", str(tiny_config(tmp_path, max_steps=1, model=str(custom)))
    )
    assert "ships its own Python code" in refused(
        "merge", str(custom), str(_adapter(tmp_path, safetensors=True)), "-o", str(tmp_path / "m")
    )
    assert not (Path(os.environ["FORGE_RUNS_DIR"])).exists() or not os.listdir(os.environ["FORGE_RUNS_DIR"])
    assert not mark.exists()

    trusted = forge(
        "chat", str(custom), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code", env=env
    )
    assert trusted.returncode == 0, trusted.stderr
    assert mark.exists()


@pytest.mark.slow
def test_pickled_weights_are_never_loaded(tmp_path, demo_path):
    mark = tmp_path / "pickle ran"
    model = _model_folder(tmp_path / "binonly", Path(demo_path), weights="bin")
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(mark)))
    assert "safetensors" in refused("chat", str(model), "--prompt", "hi", "--max-new-tokens", "2")

    adapter = _adapter(tmp_path)
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(mark)))
    for argv in (
        ["chat", "demo", "--adapter", str(adapter), "--prompt", "hi"],
        ["merge", "demo", str(adapter), "-o", str(tmp_path / "merged")],
    ):
        assert "safetensors files only" in refused(*argv)
    assert not mark.exists() and not (tmp_path / "merged").exists()


def _adapter(tmp_path: Path, safetensors: bool = False) -> Path:
    """An adapter folder (never loaded: the refusals come first)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    )
    if safetensors:
        (adapter / "adapter_model.safetensors").write_bytes(b"")
    return adapter


def _writable_by_others(root: Path) -> list[str]:
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = p.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & (stat.S_IWGRP | stat.S_IWOTH):
            bad.append(f"{p} {stat.filemode(mode)}")
    return bad


@pytest.mark.slow
def test_runs_adapters_and_merged_models_are_not_writable_by_others_even_with_umask_0(tmp_path, demo_path):
    def forge_umask0(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*FORGE, *args],
            capture_output=True,
            text=True,
            timeout=600,
            umask=0,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    from assistant_forge import cli

    run = Path(os.environ["FORGE_RUNS_DIR"]) / "run"
    cfg = tiny_config(tmp_path, max_steps=2, save_steps=2)
    assert forge_umask0("train", str(cfg), "--run-dir", str(run)).returncode == 0
    old = os.umask(0)  # convert and merge in this process (torch is loaded already), as permissive as can be
    try:
        assert cli.main(["convert", str(run), "-o", str(tmp_path / "adapter")]) == 0
        os.umask(0)
        assert cli.main(["merge", "demo", str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700  # a run is private to its owner
    for root in (Path(os.environ["FORGE_RUNS_DIR"]), tmp_path / "adapter", tmp_path / "merged"):
        assert not _writable_by_others(root), _writable_by_others(root)
    assert (run / "train.log").exists() and list((run / "checkpoints").iterdir())
