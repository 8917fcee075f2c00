"""What every step screen shares: the steps bar on top, the footer below, app session access, and
the first field focused on every entry."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen

if TYPE_CHECKING:
    from assistant_forge.tui.app import ForgeApp
    from assistant_forge.tui.state import Session


class StepScreen(Screen):
    # Textual focuses the first focusable widget matching AUTO_FOCUS when a screen is shown with
    # nothing focused; a screen whose first field is not its first focusable widget names it.
    AUTO_FOCUS = "*"

    def on_screen_suspend(self) -> None:
        # Leaving for another step (not for a dialog on top of this screen) forgets the focus, so
        # coming back focuses the first field again instead of wherever the focus was left.
        if self not in self.app.screen_stack:
            self.set_focus(None)

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
