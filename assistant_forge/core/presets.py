"""Presets: one commented TOML per model family; bundled ones plus the user's own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from assistant_forge.core.config import ForgeConfig, load_config
from assistant_forge.core.fsutil import atomic_write_text
from assistant_forge.errors import ForgeError, did_you_mean
from assistant_forge.paths import bundled, user_presets_dir


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    user: bool

    def load(self) -> ForgeConfig:
        return load_config(self.path)


def list_presets() -> list[Preset]:
    """Bundled presets, then user presets (a user preset of the same name wins)."""
    found: dict[str, Preset] = {}
    for folder, user in ((bundled("presets"), False), (user_presets_dir(), True)):
        if folder.is_dir():
            for p in sorted(folder.glob("*.toml")):
                found[p.stem] = Preset(p.stem, p, user)
    return sorted(found.values(), key=lambda p: p.name)


def get_preset(name: str) -> Preset:
    presets = {p.name: p for p in list_presets()}
    if name in presets:
        return presets[name]
    raise ForgeError(
        f"No preset named {name!r}.{did_you_mean(name, list(presets))} See `forge presets list`."
    )


def resolve_config(name_or_path: str) -> tuple[ForgeConfig, Path]:
    """A config file path, or a preset name."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" or p.exists():
        return load_config(p), p
    preset = get_preset(name_or_path)
    return preset.load(), preset.path


def copy_preset(name: str, dest: str | Path, force: bool = False) -> Path:
    """Copy a preset's text (comments kept) to an editable file, like `xtuner copy-cfg`."""
    preset = get_preset(name)
    dest = Path(dest).expanduser()
    if dest.is_dir():
        dest = dest / f"{preset.name}.toml"
    if dest.exists() and not force:
        raise ForgeError(f"{dest} already exists; pass --force to overwrite it.")
    text = preset.path.read_text(encoding="utf-8")
    first, _, rest = text.partition("\n")
    if first.startswith("#"):
        text = f"# forge train {dest}\n{rest}"
    atomic_write_text(dest, text)
    return dest
