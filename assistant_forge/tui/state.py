"""What the screens hand to each other: the dataset saved, the config chosen, the run watched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is not imported before the first paint
    from assistant_forge.core.config import ForgeConfig


@dataclass
class Session:
    dataset_path: Path | None = None
    identity: tuple[str, str] = ("", "")  # name and author, for the config's [identity] (eval)
    config: ForgeConfig | None = None
    config_name: str = ""
    run: Path | None = None
    adapter: Path | None = None
    merged: Path | None = None
