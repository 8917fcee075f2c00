"""Home: every run on this machine with live progress, and the steps of the pipeline.

Runs are polled in a thread worker every second, so a run started elsewhere (or before `forge`
was closed) shows up live without any attach step.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Footer, Static

from assistant_forge.core.run_state import LIVE_STATES, fmt_eta
from assistant_forge.tui.fmt import STATE_STYLE, fmt_num, text_bar
from assistant_forge.tui.screens.base import StepScreen
from assistant_forge.tui.widgets.steps import StepsBar

PIPELINE = (
    "[b]The pipeline[/]  [dim](press the number to go there)[/]\n"
    " [b]2[/] Dataset  who the assistant is: generated Q/A pairs, your conversations\n"
    " [b]3[/] Config   a preset for your model and GPU, the few fields people change\n"
    " [b]4[/] Train    a detached run: close forge or lose SSH, training goes on\n"
    " [b]5[/] Export   checkpoint → adapter → merged model\n"
    " [b]6[/] Chat     base and tuned side by side, streaming"
)


class HomeScreen(StepScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "watch", "Watch run"),
        Binding("n", "app.switch_mode('dataset')", "New assistant"),
        Binding("r", "refresh", "Refresh"),
    ]

    class RunsLoaded(Message):
        def __init__(self, runs: list[tuple[Path, dict]], error: str = "") -> None:
            super().__init__()
            self.runs = runs
            self.error = error

    def compose(self) -> ComposeResult:
        yield StepsBar("home")
        with Vertical(id="home-body"):
            yield Static("", id="live-banner")
            table: DataTable = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
            table.add_columns("run", "state", "progress", "loss", "eta", "started")
            yield table
            yield Static("looking for runs…", id="runs-msg")
            yield Static(PIPELINE, id="pipeline")
        yield Footer()

    def on_mount(self) -> None:
        self._paths: list[Path] = []
        # First paint first: the core (pydantic) is imported by the worker, after the screen shows.
        self.call_after_refresh(self.load_runs)
        self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        if self.is_current:  # no polling while another step's screen is shown
            self.load_runs()

    def action_refresh(self) -> None:
        self.load_runs()

    @work(thread=True, exclusive=True, group="runs")
    def load_runs(self) -> None:
        try:
            from assistant_forge.core.runs import list_runs

            runs = [(r.path, r.status) for r in list_runs()]
            self.post_message(self.RunsLoaded(runs))
        except Exception as e:  # a broken runs folder must not take the app down
            self.post_message(self.RunsLoaded([], f"cannot read runs: {e}"))

    def on_home_screen_runs_loaded(self, msg: RunsLoaded) -> None:
        table = self.query_one("#runs", DataTable)
        keep = table.cursor_row
        table.clear()
        self._paths = [p for p, _ in msg.runs]
        live = []
        for path, s in msg.runs:
            state = s.get("state", "created")
            step, total = int(s.get("step") or 0), int(s.get("total_steps") or 0)
            prog = f"{text_bar(step, total)} {step}/{total or '?'}"
            eta = fmt_eta(s.get("eta_s")) if state == "running" else "-"
            started = str(s.get("started") or s.get("created") or "-")[5:16].replace("T", " ")
            table.add_row(
                path.name,
                f"[{STATE_STYLE.get(state, '')}]{state}[/]",
                prog,
                fmt_num(s.get("loss")),
                eta,
                started,
                key=str(path),
            )
            if state in LIVE_STATES:
                live.append((path, step, total))
        if self._paths:
            table.move_cursor(row=min(keep, len(self._paths) - 1))
        self._update_banner(live)
        self.show_error("runs-msg", msg.error)
        if not msg.error:
            self.query_one("#runs-msg", Static).update(
                "" if self._paths else "No runs yet: make a dataset (2), pick a config (3), then train (4)."
            )

    def _update_banner(self, live: list[tuple[Path, int, int]]) -> None:
        banner = self.query_one("#live-banner", Static)
        if not live:
            banner.update("")
            banner.display = False
            return
        path, step, total = live[0]
        if self.session.run is None:
            self.session.run = path  # reattach: the Train screen shows this run live
        more = f" (+{len(live) - 1} more)" if len(live) > 1 else ""
        banner.update(
            f"[b]● training live:[/] {path.name}  step {step}/{total or '?'}{more}  [dim]enter: watch it[/]"
        )
        banner.display = True

    def action_watch(self) -> None:
        table = self.query_one("#runs", DataTable)
        if not self._paths:
            return
        self.session.run = self._paths[min(table.cursor_row, len(self._paths) - 1)]
        self.app.switch_mode("train")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_watch()
