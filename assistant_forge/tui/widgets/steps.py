"""The top line: the pipeline's steps, the current one highlighted; click or press 1-6 to go."""

from __future__ import annotations

from textual.widgets import Static

STEPS: tuple[tuple[str, str], ...] = (
    ("home", "Home"),
    ("dataset", "Dataset"),
    ("config", "Config"),
    ("train", "Train"),
    ("export", "Export"),
    ("chat", "Chat"),
)


class StepsBar(Static):
    """` forge  1 Home  2 Dataset ... ` with the active step shown reversed."""

    def __init__(self, current: str) -> None:
        super().__init__(self._markup(current), classes="steps-bar")

    @staticmethod
    def _markup(current: str) -> str:
        parts = []
        for i, (mode, label) in enumerate(STEPS, 1):
            style = "reverse bold" if mode == current else ""
            text = f" {i} {label} "
            parts.append(
                f"[@click=app.switch_mode('{mode}')]" + (f"[{style}]{text}[/]" if style else text) + "[/]"
            )
        return "[b]forge[/] " + "".join(parts) + "  [dim]? help[/]"
