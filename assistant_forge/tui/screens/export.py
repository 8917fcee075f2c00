"""Export: a run's checkpoint → PEFT adapter (core.merge.convert) → merged model (core.merge.merge)
→ one GGUF file for llama.cpp / Ollama (core.ollama.export_gguf_for, optionally with a Modelfile).

Each step loads torch and writes hundreds of MB: they run in a thread worker, one at a time, and
report progress (GGUF: tensor by tensor, from core's progress callback); core's ForgeError sentences
are shown as they are, anything else as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Checkbox, Footer, Input, Label, ProgressBar, Select, Static

from assistant_forge.core.gguf_export import QUANTS
from assistant_forge.tui.screens.base import StepScreen
from assistant_forge.tui.widgets.steps import StepsBar

NEWEST = -1


class ExportScreen(StepScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "convert", "Convert"),
        Binding("m", "merge", "Merge"),
        Binding("b", "both", "Both"),
        Binding("g", "gguf", "GGUF"),
        Binding("ctrl+r", "reload", "Reload runs"),
    ]

    class Progress(Message):
        def __init__(self, step: int, total: int, text: str, error: bool = False, done: bool = False) -> None:
            super().__init__()
            self.step, self.total, self.text, self.error, self.done = step, total, text, error, done

    class Produced(Message):
        def __init__(self, kind: str, path: Path) -> None:
            super().__init__()
            self.kind, self.path = kind, path

    def __init__(self) -> None:
        super().__init__()
        self.busy = False
        self.runs: list[Path] = []

    def compose(self) -> ComposeResult:
        yield StepsBar("export")
        with Vertical(id="export-form"):
            with Horizontal(classes="field-row"):
                yield Label("run")
                yield Select([], id="ex-run", prompt="a run with a checkpoint", compact=True)
            with Horizontal(classes="field-row"):
                yield Label("checkpoint")
                yield Select([("newest", NEWEST)], id="ex-ckpt", allow_blank=False, compact=True)
            with Horizontal(classes="field-row"):
                yield Label("base model")
                yield Input(id="ex-base", compact=True, placeholder="model the run trained (from its config)")
            with Horizontal(classes="field-row"):
                yield Label("adapter → ")
                yield Input(id="ex-adapter", compact=True, placeholder="adapter folder")
            with Horizontal(classes="field-row"):
                yield Label("merged → ")
                yield Input(id="ex-merged", compact=True, placeholder="merged model folder")
            with Horizontal(classes="field-row"):
                yield Label("dtype")
                yield Select(
                    [(d, d) for d in ("bf16", "fp16", "fp32")], id="ex-dtype", allow_blank=False, compact=True
                )
            with Horizontal(classes="field-row"):
                yield Label("GGUF → ")
                yield Input(id="ex-gguf", compact=True, placeholder="file for llama.cpp / Ollama")
                yield Select(
                    [(q, q) for q in QUANTS], id="ex-quant", value="q8_0", allow_blank=False, compact=True
                )
                yield Checkbox("Ollama", id="ex-ollama", value=True, compact=True)
            yield Checkbox("replace existing folders and files", id="ex-force", compact=True)
        with Horizontal(classes="button-row"):
            yield Button("Convert", id="ex-convert")
            yield Button("Merge", id="ex-merge")
            yield Button("Both", id="ex-both", variant="primary")
            yield Button("GGUF", id="ex-gguf-btn")
        bar = ProgressBar(id="export-progress", show_eta=False)
        bar.display = False  # an idle indeterminate bar would animate for nothing
        yield bar
        yield Static("", id="export-msg", classes="status-line")
        yield Static("", id="gguf-result", classes="status-line", markup=False)
        yield Footer()

    def on_screen_resume(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        from assistant_forge.core.runs import complete_checkpoints, list_runs

        self.runs = [r.path for r in list_runs() if complete_checkpoints(r.path)]
        sel = self.query_one("#ex-run", Select)
        current = sel.value
        sel.set_options([(p.name, p) for p in self.runs])
        want = self.session.run if self.session.run in self.runs else current
        if want in self.runs:
            sel.value = want
        elif self.runs:
            sel.value = self.runs[0]
        if not self.runs:
            self.query_one("#export-msg", Static).update(
                "No run has a complete checkpoint yet: train one (4)."
            )

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id != "ex-run" or not isinstance(event.value, Path):
            return
        from assistant_forge.core.runs import complete_checkpoints, run_config
        from assistant_forge.errors import ForgeError

        run = event.value
        self.query_one("#ex-ckpt", Select).set_options(
            [("newest", NEWEST)] + [(f"step {s}", s) for s, _ in reversed(complete_checkpoints(run))]
        )
        from assistant_forge.core.ollama import ollama_name

        name = ""
        try:
            cfg = run_config(run)
            self.query_one("#ex-base", Input).value = cfg.model.path
            name = cfg.identity.name
        except ForgeError as e:
            self.show_error("export-msg", str(e))
        self.query_one("#ex-adapter", Input).value = str(run / "adapter")
        self.query_one("#ex-merged", Input).value = str(run / "merged")
        # Named after the assistant: the file's stem is also the `ollama create` name.
        self.query_one("#ex-gguf", Input).value = str(run / f"{ollama_name(name or 'model')}.gguf")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        {
            "ex-convert": self.action_convert,
            "ex-merge": self.action_merge,
            "ex-both": self.action_both,
            "ex-gguf-btn": self.action_gguf,
        }[event.button.id or ""]()

    def action_convert(self) -> None:
        self._start(convert=True, merge=False)

    def action_merge(self) -> None:
        self._start(convert=False, merge=True)

    def action_both(self) -> None:
        self._start(convert=True, merge=True)

    def _start(self, convert: bool, merge: bool) -> None:
        if self.busy:
            self.notify("an export is already running", severity="warning")
            return
        run = self.query_one("#ex-run", Select).value
        if convert and not isinstance(run, Path):
            self.show_error("export-msg", "Choose a run with a complete checkpoint first.")
            return
        ckpt = self.query_one("#ex-ckpt", Select).value
        job = {
            "run": run if isinstance(run, Path) else None,
            "step": None if ckpt in (NEWEST, Select.BLANK) else int(ckpt),  # type: ignore[arg-type]
            "base": self.query_one("#ex-base", Input).value.strip() or "demo",
            "adapter": self.query_one("#ex-adapter", Input).value.strip(),
            "merged": self.query_one("#ex-merged", Input).value.strip(),
            "dtype": str(self.query_one("#ex-dtype", Select).value),
            "force": self.query_one("#ex-force", Checkbox).value,
        }
        if not job["adapter"] or (merge and not job["merged"]):
            self.show_error("export-msg", "Give the output folder(s) first.")
            return
        self.busy = True
        self.show_error("export-msg", "")
        self.export_worker(job, convert, merge)

    @work(thread=True, exclusive=True, group="export")
    def export_worker(self, job: dict, convert: bool, merge: bool) -> None:
        from assistant_forge.core import merge as core_merge
        from assistant_forge.errors import user_line

        total = int(convert) + int(merge)
        step = 0
        try:
            if convert:
                self.post_message(self.Progress(step, total, "converting the checkpoint to an adapter…"))
                out = core_merge.convert(job["run"], job["adapter"], step=job["step"], force=job["force"])
                self.post_message(self.Produced("adapter", out))
                step += 1
            if merge:
                self.post_message(self.Progress(step, total, "merging the adapter into the base model…"))
                out = core_merge.merge(
                    job["base"], job["adapter"], job["merged"], dtype=job["dtype"], force=job["force"]
                )
                self.post_message(self.Produced("merged", out))
                step += 1
        except Exception as e:  # a ForgeError's sentence; a failure deep in transformers as one line
            self.post_message(self.Progress(step, total, user_line(e), error=True, done=True))
            return
        after = "export it as GGUF (g) or chat with it (6)" if merge else "chat with it (6)"
        self.post_message(self.Progress(step, total, f"done: {after}", done=True))

    # --- GGUF ---------------------------------------------------------------------------------

    def action_gguf(self) -> None:
        if self.busy:
            self.notify("an export is already running", severity="warning")
            return
        merged = self.query_one("#ex-merged", Input).value.strip()
        out = self.query_one("#ex-gguf", Input).value.strip()
        if not merged or not out:
            self.show_error("export-msg", "Give the merged model folder and the GGUF file first.")
            return
        self.busy = True
        self.show_error("export-msg", "")
        self.query_one("#gguf-result", Static).update("")
        job = {
            "merged": merged,
            "out": out,
            "quant": str(self.query_one("#ex-quant", Select).value),
            "ollama": self.query_one("#ex-ollama", Checkbox).value,
            "force": self.query_one("#ex-force", Checkbox).value,
        }
        self.gguf_worker(job)

    @work(thread=True, exclusive=True, group="export")
    def gguf_worker(self, job: dict) -> None:
        from assistant_forge.core.ollama import export_gguf_for
        from assistant_forge.errors import user_line

        def progress(done: int, total: int, name: str) -> None:
            self.app.call_from_thread(self._gguf_progress, done, total, f"writing {name} ({done}/{total})")

        self.app.call_from_thread(self._gguf_progress, 0, None, "reading the merged model…")
        try:
            result = export_gguf_for(progress=progress, **job)
        except Exception as e:  # a ForgeError's sentence; anything else as one line
            self.app.call_from_thread(self._gguf_done, [], user_line(e))
            return
        self.app.call_from_thread(self._gguf_done, result.lines(), "")

    def _gguf_progress(self, done: int, total: int | None, text: str) -> None:
        bar = self.query_one("#export-progress", ProgressBar)
        bar.display = True
        bar.update(total=total, progress=done)
        self.query_one("#export-msg", Static).update(text)

    def _gguf_done(self, lines: list[str], error: str) -> None:
        self.busy = False
        self.show_error("export-msg", error)
        if not error:
            self.query_one("#export-msg", Static).update("done: GGUF written")
            self.query_one("#gguf-result", Static).update("\n".join(lines))
            self.notify(lines[0])

    def on_export_screen_progress(self, msg: Progress) -> None:
        bar = self.query_one("#export-progress", ProgressBar)
        bar.display = True
        bar.update(total=msg.total, progress=msg.step)
        self.show_error("export-msg", msg.text if msg.error else "")
        if not msg.error:
            self.query_one("#export-msg", Static).update(msg.text)
        if msg.done:
            self.busy = False

    def on_export_screen_produced(self, msg: Produced) -> None:
        if msg.kind == "adapter":
            self.session.adapter = msg.path
        else:
            self.session.merged = msg.path
        self.notify(f"{msg.kind} written to {msg.path}")
