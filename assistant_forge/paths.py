"""Where forge keeps things: user config, the model cache and runs (platformdirs, env overrides)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "assistant_forge"
_PKG = Path(__file__).resolve().parent


def _dir(env: str, default: str) -> Path:
    path = Path(os.environ.get(env) or default).expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def cache_dir() -> Path:
    """Converted models (the demo model) live here; FORGE_CACHE_DIR overrides."""
    return _dir("FORGE_CACHE_DIR", platformdirs.user_cache_dir(APP))


def runs_dir() -> Path:
    """Default parent of run directories; FORGE_RUNS_DIR overrides."""
    return _dir("FORGE_RUNS_DIR", os.path.join(platformdirs.user_data_dir(APP), "runs"))


def user_presets_dir() -> Path:
    """User presets (`forge presets copy` targets can also be anywhere); FORGE_CONFIG_DIR overrides."""
    return _dir("FORGE_CONFIG_DIR", platformdirs.user_config_dir(APP)) / "presets"


def bundled(name: str) -> Path:
    """A folder shipped with the project (`presets`, `sample_data`).

    A wheel carries them inside the package; a source checkout has them at the top level.
    """
    inside = _PKG / "_bundled" / name
    return inside if inside.is_dir() else _PKG.parent / name
