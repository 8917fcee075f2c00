"""The help screen: every key, and how training survives closing forge."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# forge keys

| key | where | does |
|---|---|---|
| `1`–`6` | anywhere | Home, Dataset, Config, Train, Export, Chat |
| `esc` | in a field | leave it, so single keys work again |
| `?` / `F1` | anywhere | this help |
| `ctrl+t` | anywhere | dark / light theme |
| `ctrl+p` | anywhere | command palette |
| `ctrl+q` | anywhere | quit (training keeps running) |
| `g` `a` `e` `del` | Dataset | generate, add, edit, delete a conversation |
| `ctrl+s` | Dataset, Config | save |
| `v` | Config | view the resolved TOML |
| `s` `x` `r` | Train | start, stop (saves a checkpoint), resume |
| `c` `m` `b` | Export | convert, merge, both |
| `enter` / `esc` | Chat | send / stop generating; `ctrl+r` new chat |

## Training outlives this app

A run is a detached process writing to its run folder. Quit `forge`, or lose the SSH
connection: training goes on. Start `forge` again and the Home screen shows the run live;
press `enter` on it to watch. Headless: `forge runs`, `forge runs logs RUN -f`.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,f1", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(HELP)

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
