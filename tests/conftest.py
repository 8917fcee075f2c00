"""Shared fixtures: an isolated runs folder, one torch thread, and the real demo model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread: on a busy 2-core machine torch with 2 threads ran several times slower than with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FORGE_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="session")
def demo_path() -> str:
    """The real SmolLM2-135M-Instruct as an HF folder (fetched and converted once per machine)."""
    from assistant_forge.core.models import demo_model_dir

    return str(demo_model_dir())


@pytest.fixture(scope="session")
def demo_tok(demo_path: str):
    from assistant_forge.core.encoding import load_tokenizer

    return load_tokenizer(demo_path, "model")


@pytest.fixture(scope="session")
def torch_one_thread():
    import torch

    torch.set_num_threads(1)
    return torch
