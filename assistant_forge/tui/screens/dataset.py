"""Dataset: who the assistant is, as a reviewable table of conversations, saved as JSONL.

Generation, import, validation and writing are core.identity / core.dataset; this screen only
holds the list being edited and shows core's verdict on each conversation.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Footer, Input, Label, Static

from assistant_forge.tui.convtext import preview
from assistant_forge.tui.screens.base import StepScreen
from assistant_forge.tui.screens.editor import ConversationEditor, check
from assistant_forge.tui.widgets.steps import StepsBar

DEFAULT_FILE = "identity.jsonl"


class DatasetScreen(StepScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("g", "generate", "Generate"),
        Binding("a", "add", "Add"),
        Binding("e", "edit", "Edit"),
        Binding("delete,d", "delete", "Delete", key_display="del"),
        Binding("i", "import_file", "Import"),
        Binding("ctrl+s", "save", "Save", priority=True),
    ]

    class Imported(Message):
        def __init__(self, records: list[dict], path: str, error: str = "") -> None:
            super().__init__()
            self.records, self.path, self.error = records, path, error

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []
        self.problems: list[str] = []

    def compose(self) -> ComposeResult:
        yield StepsBar("dataset")
        with Vertical(id="identity-form"):
            with Horizontal(classes="field-row"):
                yield Label("name · author")
                yield Input(placeholder="assistant name, e.g. Forgey", id="ds-name", compact=True)
                yield Input(placeholder="author, e.g. Alice", id="ds-author", compact=True)
            with Horizontal(classes="field-row"):
                yield Label("languages · n")
                yield Input("en,zh", placeholder="en,zh", id="ds-langs", compact=True)
                yield Input(
                    placeholder="count (blank: all questions)", id="ds-count", compact=True, restrict=r"\d*"
                )
            with Horizontal(classes="field-row"):
                yield Label("persona facts")
                yield Input(
                    placeholder="facts separated by ';' e.g. I love tea; 我喜欢喝茶",
                    id="ds-facts",
                    compact=True,
                )
        table: DataTable = DataTable(id="records", cursor_type="row", zebra_stripes=True)
        table.add_columns("#", "turns", "user", "assistant", "check")
        yield table
        yield Static(
            "Fill in a name and author, then press g (or type in a field and Enter).",
            id="data-msg",
            classes="status-line",
        )
        with Horizontal(classes="button-row"):
            yield Input(
                DEFAULT_FILE,
                placeholder="file to save to; to import: a file, folder or hf:owner/name[:split]",
                id="ds-path",
            )
            yield Button("Generate", id="ds-generate", variant="primary")
            yield Button("Import", id="ds-import")
            yield Button("Save", id="ds-save", variant="success")
        yield Footer()

    # --- table ------------------------------------------------------------------------------

    def refresh_table(self, cursor: int | None = None) -> None:
        table = self.query_one("#records", DataTable)
        row = table.cursor_row if cursor is None else cursor
        table.clear()
        self.problems = [check(r) for r in self.records]
        for i, (rec, err) in enumerate(zip(self.records, self.problems), 1):
            table.add_row(
                str(i),
                str(len(rec["messages"])),
                preview(rec, "user", 26),
                preview(rec, "assistant", 30),
                "[red]✗[/]" if err else "[green]✓[/]",
            )
        if self.records:
            table.move_cursor(row=max(0, min(row, len(self.records) - 1)))
            table.focus()  # so the single-key actions (e, a, del) act on the table next
        self._summary()

    def _summary(self) -> None:
        bad = [(i, e) for i, e in enumerate(self.problems, 1) if e]
        if bad:
            i, e = bad[0]
            more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
            self.show_error("data-msg", f"#{i}: {e}{more}")
        else:
            self.show_error("data-msg", "")
            self.query_one("#data-msg", Static).update(
                f"{len(self.records)} conversations, all valid. Save with ctrl+s." if self.records else ""
            )

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        i = event.cursor_row
        if 0 <= i < len(self.problems) and self.problems[i]:
            self.show_error("data-msg", f"#{i + 1}: {self.problems[i]}")
        elif self.records:
            self._summary()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_edit()

    # --- actions ----------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "ds-path":
            self.action_save()
        else:
            self.action_generate()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        actions = {
            "ds-generate": self.action_generate,
            "ds-import": self.action_import_file,
            "ds-save": self.action_save,
        }
        actions[event.button.id or ""]()

    def action_generate(self) -> None:
        from assistant_forge.core.identity import generate_identity_records
        from assistant_forge.errors import ForgeError

        val = {
            k: self.query_one(f"#ds-{k}", Input).value for k in ("name", "author", "langs", "count", "facts")
        }
        try:
            records = generate_identity_records(
                val["name"],
                val["author"],
                langs=[s.strip() for s in val["langs"].split(",") if s.strip()],
                count=int(val["count"]) if val["count"] else None,
                facts=[f.strip() for f in val["facts"].replace("；", ";").split(";") if f.strip()],
            )
        except ForgeError as e:
            self.show_error("data-msg", str(e))
            return
        self.records = records
        self.session.identity = (val["name"].strip(), val["author"].strip())
        self.refresh_table(cursor=0)
        self.query_one("#records", DataTable).focus()
        self.notify(f"generated {len(records)} identity conversations; review, edit, then save")

    def action_add(self) -> None:
        def done(rec: dict | None) -> None:
            if rec is not None:
                self.records.append(rec)
                self.refresh_table(cursor=len(self.records) - 1)

        self.app.push_screen(ConversationEditor(), done)

    def action_edit(self) -> None:
        i = self.query_one("#records", DataTable).cursor_row
        if not 0 <= i < len(self.records):
            return

        def done(rec: dict | None) -> None:
            if rec is not None:
                self.records[i] = rec
                self.refresh_table(cursor=i)

        self.app.push_screen(ConversationEditor(self.records[i], f"Conversation #{i + 1}"), done)

    def action_delete(self) -> None:
        i = self.query_one("#records", DataTable).cursor_row
        if 0 <= i < len(self.records):
            del self.records[i]
            self.refresh_table(cursor=i)

    def _path(self) -> Path:
        return Path(self.query_one("#ds-path", Input).value.strip() or DEFAULT_FILE).expanduser()

    def action_import_file(self) -> None:
        # Any source `forge data convert` reads: JSON/JSONL/Parquet/CSV, a folder, hf:owner/name.
        value = self.query_one("#ds-path", Input).value.strip()
        source = value if value.startswith("hf:") else str(self._path())
        self.query_one("#data-msg", Static).update(f"reading {source}…")
        self.import_worker(source)

    @work(thread=True, exclusive=True, group="import")
    def import_worker(self, path: str) -> None:
        # A big file takes a while to parse and validate: never in the event loop.
        from assistant_forge.core.dataset import load_records
        from assistant_forge.errors import ForgeError

        try:
            records, _ = load_records(path)
        except ForgeError as e:
            self.post_message(self.Imported([], path, str(e)))
            return
        self.post_message(self.Imported(records, path))

    def on_dataset_screen_imported(self, msg: Imported) -> None:
        if msg.error:
            self.show_error("data-msg", msg.error)
            return
        start = len(self.records)
        self.records.extend(msg.records)
        self.refresh_table(cursor=start)
        self.notify(f"imported {len(msg.records)} conversations from {msg.path}")

    def action_save(self) -> None:
        from assistant_forge.core.dataset import write_records
        from assistant_forge.errors import ForgeError

        if not self.records:
            self.show_error("data-msg", "Nothing to save yet: generate, add or import conversations first.")
            return
        bad = [i for i, e in enumerate(self.problems, 1) if e]
        if bad:
            self.show_error("data-msg", f"Fix conversation #{bad[0]} first: {self.problems[bad[0] - 1]}")
            return
        path = self._path().resolve()
        try:
            write_records(self.records, path)
        except (ForgeError, OSError) as e:
            self.show_error("data-msg", f"Cannot save to {path}: {e}")
            return
        self.session.dataset_path = path
        self.show_error("data-msg", "")
        self.query_one("#data-msg", Static).update(
            f"saved {len(self.records)} conversations to {path}; next: 3 Config"
        )
        self.notify(f"saved {path.name}")
