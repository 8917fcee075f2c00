"""Train: start a detached run, watch it live, stop and resume it.

The run is a separate process (core.runs.launch); this screen only reads its run directory in a
thread worker (tui.watch) and posts what is new. Leaving the screen or quitting forge leaves the
trainer running; coming back, or starting forge again, shows it live.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Footer, Log, ProgressBar, RichLog, Static
from textual.worker import get_current_worker

from assistant_forge.core.run_state import ENDED_STATES, LIVE_STATES, fmt_eta
from assistant_forge.tui.fmt import STATE_STYLE
from assistant_forge.tui.screens.base import StepScreen
from assistant_forge.tui.widgets.lossplot import LossPlot
from assistant_forge.tui.widgets.steps import StepsBar

if TYPE_CHECKING:
    from assistant_forge.core.config import ForgeConfig
    from assistant_forge.tui.watch import RunUpdate

POLL_S = 0.5


def metrics_line(ev: dict) -> str:
    parts = [f"step {ev.get('step', 0)}/{ev.get('total_steps', '?')}", f"ETA {fmt_eta(ev.get('eta_s'))}"]
    if ev.get("tokens_per_s") is not None:
        parts.append(f"{ev['tokens_per_s']:.0f} tok/s")
    if ev.get("lr") is not None:
        parts.append(f"lr {ev['lr']:.2e}")
    parts.append(f"mem {ev['mem_gib']:.2f} GiB" if ev.get("mem_gib") is not None else "mem -")
    if ev.get("loss") is not None:
        parts.append(f"loss {ev['loss']:.4f}")
    return " · ".join(parts)


# What the screen's start/stop/resume keys do, each run in launch_worker: (the run, what to say).
def start_run(cfg: ForgeConfig, label: str) -> tuple[Path, str]:
    from assistant_forge.core.runs import launch, new_run_dir, preflight

    preflight(cfg)  # the same checks as `forge train`
    run = new_run_dir(cfg, label=label)
    pid = launch(run)
    return run, f"started {run.name} (pid {pid}); it keeps running if you quit forge"


def stop_run(run: Path) -> tuple[Path, str]:
    from assistant_forge.core.runs import stop

    status = stop(run, wait_s=300)
    return run, f"run {status.get('state')}; resume it with r"


def resume_run(run: Path) -> tuple[Path, str]:
    from assistant_forge.core.runs import launch

    pid = launch(run, resume=True)
    return run, f"resumed {run.name} (pid {pid})"


class TrainScreen(StepScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "start", "Start"),
        Binding("x", "stop", "Stop"),
        Binding("r", "resume", "Resume"),
        Binding("e", "app.switch_mode('export')", "Export"),
    ]

    class Update(Message):
        def __init__(self, upd: RunUpdate) -> None:
            super().__init__()
            self.upd = upd

    class Done(Message):
        """A start/stop/resume request finished: the run to watch, or an error sentence."""

        def __init__(self, run: Path | None, text: str, error: bool = False) -> None:
            super().__init__()
            self.run, self.text, self.error = run, text, error

    def __init__(self) -> None:
        super().__init__()
        self.watching: Path | None = None
        self.state = ""
        self.checkpoints: list[int] = []

    def compose(self) -> ComposeResult:
        yield StepsBar("train")
        yield Static("", id="run-title")
        with Horizontal(id="progress-row"):
            yield ProgressBar(id="progress", show_eta=False)
        yield Static("", id="metrics")
        yield LossPlot(id="loss-plot")
        with Horizontal(id="train-panes"):
            log = Log(id="train-log", max_lines=2000)
            log.border_title = "train.log"
            yield log
            samples = RichLog(id="train-samples", wrap=True, markup=False, max_lines=500, min_width=20)
            samples.border_title = "sample answers"
            yield samples
        yield Static("", id="train-msg", classes="status-line")
        yield Footer()

    def on_screen_resume(self) -> None:
        if self.session.run != self.watching:
            self.watch(self.session.run)
        elif self.watching is None:
            self._idle_hint()

    def _idle_hint(self) -> None:
        cfg = self.session.config
        self.query_one("#run-title", Static).update(
            f"[b]ready:[/] {self.session.config_name} on {cfg.model.path} · press s to start"
            if cfg
            else "No run yet: pick a config (3), then press s here. Runs on this machine: Home (1)."
        )

    # --- watching ---------------------------------------------------------------------------

    def watch(self, run: Path | None) -> None:
        self.watching, self.state, self.checkpoints = run, "", []
        bar = self.query_one("#progress", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = run is not None  # an idle indeterminate bar would animate for nothing
        self.query_one("#metrics", Static).update("")
        self.query_one(LossPlot).reset()
        self.query_one("#train-log", Log).clear()
        self.query_one("#train-samples", RichLog).clear()
        if run is None:
            self._idle_hint()
            return
        self.query_one("#run-title", Static).update(f"[b]{run.name}[/] · reading…")
        self.watch_worker(run)

    @work(thread=True, exclusive=True, group="watch")
    def watch_worker(self, run: Path) -> None:
        from assistant_forge.tui.watch import RunWatcher

        worker = get_current_worker()
        watcher = RunWatcher(run)
        while not worker.is_cancelled:
            try:
                upd = watcher.poll()
            except OSError as e:  # the run folder was removed under us
                self.post_message(self.Done(None, f"cannot read {run}: {e}", error=True))
                return
            if upd is not None:
                self.post_message(self.Update(upd))
            time.sleep(POLL_S)

    def on_train_screen_update(self, msg: Update) -> None:
        upd = msg.upd
        if upd.run != self.watching:  # a late message from the previous run's watcher
            return
        s = upd.status
        state = s.get("state", "created")
        if state != self.state and self.state in LIVE_STATES and state in ENDED_STATES:
            self.notify(
                f"run {state}" + (": next, export it (5)" if state == "finished" else ""),
                severity="error" if state in ("failed", "dead") else "information",
            )
        self.state = state
        self.checkpoints = upd.checkpoints
        reason = f" · {s['reason']}" if s.get("reason") else ""
        ck = f" · checkpoints {', '.join(map(str, upd.checkpoints[-3:]))}" if upd.checkpoints else ""
        self.query_one("#run-title", Static).update(
            Text.from_markup(f"[b]{upd.run.name}[/] · [{STATE_STYLE.get(state, '')}]{state}[/]")
            + Text(reason + ck)
        )
        total = int(s.get("total_steps") or 0)
        step = int(s.get("step") or 0)
        if upd.events:
            last = upd.events[-1]
            total = int(last.get("total_steps") or total)
            step = int(last.get("step") or step)
            self.query_one("#metrics", Static).update(metrics_line(last))
            self.query_one(LossPlot).extend(
                [float(e["loss"]) for e in upd.events if e.get("loss") is not None]
            )
        if total:
            self.query_one("#progress", ProgressBar).update(total=total, progress=step)
        if upd.log:
            # tqdm redraws with carriage returns: keep only what the line finally shows.
            self.query_one("#train-log", Log).write_lines([ln.rsplit("\r", 1)[-1] for ln in upd.log])
        if upd.samples:
            pane = self.query_one("#train-samples", RichLog)
            for smp in upd.samples:
                pane.write(
                    Text.assemble(
                        (f"[step {smp.get('step')}] ", "bold"),
                        (str(smp.get("prompt", "")), "cyan"),
                        "\n  → ",
                        str(smp.get("answer", "")),
                    )
                )

    # --- actions ----------------------------------------------------------------------------

    def action_start(self) -> None:
        if self.state in LIVE_STATES:
            self.show_error("train-msg", "This run is still going; stop it (x) first or watch it.")
            return
        if self.session.config is None:
            self.show_error("train-msg", "Pick a config first: 3 Config, then Train ▸.")
            return
        self.show_error("train-msg", "")
        self.query_one("#train-msg", Static).update("checking data and model…")
        self.launch_worker(None, partial(start_run, self.session.config, self.session.config_name or "run"))

    def action_stop(self) -> None:
        if self.watching is None or self.state not in ("starting", "running"):
            self.show_error("train-msg", "No live run to stop here.")
            return
        self.show_error("train-msg", "")
        self.query_one("#train-msg", Static).update("stopping: saving a checkpoint…")
        self.launch_worker(self.watching, partial(stop_run, self.watching))

    def action_resume(self) -> None:
        if self.watching is None:
            self.show_error("train-msg", "Choose a run on Home (1) first.")
            return
        if self.state in LIVE_STATES:
            self.show_error("train-msg", "This run is still going.")
            return
        self.query_one("#train-msg", Static).update("resuming…")
        self.launch_worker(self.watching, partial(resume_run, self.watching))

    @work(thread=True, exclusive=True, group="launch")
    def launch_worker(self, run: Path | None, job: Callable[[], tuple[Path, str]]) -> None:
        """Start, stop or resume off the event loop; a ForgeError becomes the screen's error line."""
        from assistant_forge.errors import ForgeError

        try:
            run, text = job()
        except ForgeError as e:
            self.post_message(self.Done(run, str(e), error=True))
            return
        self.post_message(self.Done(run, text))

    def on_train_screen_done(self, msg: Done) -> None:
        self.show_error("train-msg", msg.text if msg.error else "")
        if not msg.error:
            self.query_one("#train-msg", Static).update(msg.text)
        if msg.run is not None:
            self.session.run = msg.run
            if msg.run != self.watching:
                self.watch(msg.run)
