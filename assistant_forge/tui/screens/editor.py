"""A modal editor for one conversation (multi-turn), validated by core as you type."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static, TextArea

from assistant_forge.tui.convtext import ConversationTextError, from_text, to_text

TEMPLATE = "user: \nassistant: "


def check(record: dict) -> str:
    """'' when core accepts the conversation, else core's one-sentence reason."""
    from assistant_forge.core.dataset import DatasetError, validate_record

    try:
        validate_record(record, "this conversation")
    except DatasetError as e:
        return str(e)
    return ""


class ConversationEditor(ModalScreen["dict | None"]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, record: dict | None = None, title: str = "New conversation") -> None:
        super().__init__()
        self.record = record
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(id="editor-box"):
            yield Static(
                f"[b]{self.title_text}[/]  [dim]one message per 'user:' / 'assistant:' / "
                "'system:' line; other lines continue it[/]"
            )
            yield TextArea(
                to_text(self.record) if self.record else TEMPLATE,
                id="editor-text",
                soft_wrap=True,
                tab_behavior="indent",
            )
            yield Static("", id="editor-msg", classes="status-line")
            with Horizontal(classes="button-row"):
                yield Button("Save (ctrl+s)", id="editor-save", variant="primary")
                yield Button("Cancel (esc)", id="editor-cancel")

    def on_mount(self) -> None:
        ta = self.query_one(TextArea)
        ta.focus()
        ta.move_cursor(ta.document.end)
        self._validate()

    def _parse(self) -> tuple[dict | None, str]:
        try:
            rec = from_text(self.query_one(TextArea).text)
        except ConversationTextError as e:
            return None, str(e)
        return rec, check(rec)

    def _validate(self) -> bool:
        rec, err = self._parse()
        msg = self.query_one("#editor-msg", Static)
        turns = len(rec["messages"]) if rec else 0
        msg.update(err or f"✓ {turns} messages, ready to train")
        msg.set_class(bool(err), "error")
        msg.set_class(not err, "ok")
        return not err

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        self._validate()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "editor-save":
            self.action_save()
        else:
            self.action_cancel()

    def action_save(self) -> None:
        rec, err = self._parse()
        if rec is not None and not err:
            self.dismiss(rec)
        else:
            self._validate()

    def action_cancel(self) -> None:
        self.dismiss(None)
