"""The `forge` app: six modes (one per pipeline step), global keys, themes.

Only Textual and the home screen load before the first paint; pydantic, the core and torch are
imported later, in workers or when a screen opens (see bench/tui_startup.py).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.screen import Screen

from assistant_forge.tui.state import Session

SCREENS_PKG = "assistant_forge.tui.screens"


def _lazy(module: str, cls: str) -> Callable[[], Screen]:
    """A screen factory that imports its module only when the mode is first opened."""

    def make() -> Screen:
        return getattr(importlib.import_module(f"{SCREENS_PKG}.{module}"), cls)()

    return make


class ForgeApp(App[int]):
    CSS_PATH = "forge.tcss"
    TITLE = "forge"
    MODES: ClassVar[dict[str, str | Callable[[], Screen]]] = {
        "home": _lazy("home", "HomeScreen"),
        "dataset": _lazy("dataset", "DatasetScreen"),
        "config": _lazy("config", "ConfigScreen"),
        "train": _lazy("train", "TrainScreen"),
        "export": _lazy("export", "ExportScreen"),
        "chat": _lazy("chat", "ChatScreen"),
    }
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(str(i), f"switch_mode('{m}')", m.title(), show=False) for i, m in enumerate(MODES, 1)),
        Binding("question_mark,f1", "help", "Help", key_display="?"),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("escape", "blur", "Unfocus", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, light: bool | None = None) -> None:
        super().__init__()
        self.session = Session()
        if light is None:
            light = os.environ.get("FORGE_THEME", "").lower() == "light"
        self.theme = "textual-light" if light else "textual-dark"

    def on_mount(self) -> None:
        self.switch_mode("home")

    def action_help(self) -> None:
        from assistant_forge.tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def action_blur(self) -> None:
        # Escape leaves a text field so the single-key bindings (1-6, a, e, ...) work again.
        self.screen.set_focus(None)


def run_app() -> int:
    """Entry point for `forge` with no subcommand. Closing the app never stops a training run."""
    app = ForgeApp()
    app.run()
    return app.return_code or 0
