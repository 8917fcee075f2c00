"""What every step screen shares: the steps bar on top, the footer below, app session access."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen

if TYPE_CHECKING:
    from assistant_forge.tui.app import ForgeApp
    from assistant_forge.tui.state import Session


class StepScreen(Screen):
    @property
    def forge(self) -> ForgeApp:
        return cast("ForgeApp", self.app)

    @property
    def session(self) -> Session:
        return self.forge.session

    def show_error(self, widget_id: str, message: str) -> None:
        """One-sentence errors (ForgeError messages) in a status line, never a traceback."""
        w = self.query_one(f"#{widget_id}")
        w.update(message)  # type: ignore[attr-defined]
        w.set_class(bool(message), "error")
