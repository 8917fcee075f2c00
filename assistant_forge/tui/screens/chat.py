"""Chat: stream answers from any model forge knows about (core.known_models: merged folders and
adapters of runs, newest first, and their bases) or one typed in; or base and tuned side by side on
the same question, the base being the one the tuned model was trained from.

Loading and generating run in one thread worker (core.chat.load_chat_model(...).stream); each
piece of text is posted to the UI as a message, and esc sets the stop event core's streamer
checks between tokens. torch is imported only by that worker.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Checkbox, Footer, Input, Label, Select, Static

from assistant_forge.core.known_models import KnownModel, base_for, default_model, known_models
from assistant_forge.tui.screens.base import StepScreen
from assistant_forge.tui.widgets.steps import StepsBar

MAX_CACHED = 2  # loaded models kept: base and tuned for side by side


class ChatScreen(StepScreen):
    AUTO_FOCUS = "#prompt"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop / unfocus"),
        Binding("ctrl+r", "new_chat", "New chat"),
        Binding("ctrl+b", "toggle_compare", "Side by side"),
    ]

    class Piece(Message):
        """Text for one pane: a new turn (`begin`), a piece of the answer, or its end."""

        def __init__(self, side: str, text: str = "", kind: str = "piece") -> None:
            super().__init__()
            self.side, self.text, self.kind = side, text, kind

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[dict]] = {"base": [], "main": []}
        self.models: dict[tuple[str, str | None], Any] = {}
        self.stop_event = threading.Event()
        self.generating = False
        self.max_new_tokens = 256
        self._current: dict[str, Static] = {}
        self._answer: dict[str, str] = {}
        self.known: list[KnownModel] = []
        self._defaulted_for: tuple = ()

    def compose(self) -> ComposeResult:
        yield StepsBar("chat")
        with Vertical(id="chat-opts"):
            with Horizontal(classes="field-row"):
                yield Label("talk to")
                yield Select([], id="ch-source", prompt="a model forge knows", compact=True)
                yield Checkbox("side by side with base", id="ch-compare", compact=True)
            with Horizontal(classes="field-row"):
                yield Label("model · adapter")
                yield Input("demo", id="ch-model", compact=True, placeholder="model folder, hub id or demo")
                yield Input(id="ch-adapter", compact=True, placeholder="adapter folder (optional)")
            with Horizontal(classes="field-row"):
                yield Label("system prompt")
                yield Input(id="ch-system", compact=True, placeholder="optional")
        with Horizontal(id="transcripts"):
            base = VerticalScroll(id="pane-base", classes="transcript")
            base.border_title = "base"
            base.display = False
            yield base
            main = VerticalScroll(id="pane-main", classes="transcript")
            main.border_title = "model"
            yield main
        yield Input(id="prompt", placeholder="Ask something; enter sends, esc stops")
        yield Footer()

    def on_unmount(self) -> None:
        self.stop_event.set()  # quitting mid-answer must not wait for generation to finish

    def on_screen_resume(self) -> None:
        if self.generating:
            return
        s = self.session
        self.known = known_models(extra_base=s.config.model.path if s.config else None)
        sel = self.query_one("#ch-source", Select)
        current = sel.value
        sel.set_options([(m.label, i) for i, m in enumerate(self.known)])
        # A new watched run or a new export picks the default again; otherwise the user's pick stays.
        key = (s.run, s.merged, s.adapter)
        if key != self._defaulted_for or not isinstance(current, int) or current >= len(self.known):
            self._defaulted_for = key
            want = next(
                (m for m in self.known if s.merged and m.model == str(Path(s.merged).resolve())),
                None,
            ) or default_model(self.known, s.run)
            current = self.known.index(want)
        sel.value = current
        self._fill(self.known[current])

    def base_model(self) -> str:
        """The base to compare with: the one the chosen tuned model was trained from."""
        model = self.query_one("#ch-model", Input).value.strip() or "demo"
        adapter = self.query_one("#ch-adapter", Input).value.strip() or None
        cfg = self.session.config
        return base_for(model, adapter) or (cfg.model.path if cfg else "demo")

    def _fill(self, m: KnownModel) -> None:
        self.query_one("#ch-model", Input).value = m.model
        self.query_one("#ch-adapter", Input).value = m.adapter or ""
        self.query_one("#pane-main").border_title = m.label
        self.query_one("#pane-base").border_title = f"base · {self.base_model()}"

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "ch-source" and isinstance(event.value, int) and event.value < len(self.known):
            self._fill(self.known[event.value])

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#pane-base").display = event.value

    def action_toggle_compare(self) -> None:
        box = self.query_one("#ch-compare", Checkbox)
        box.value = not box.value

    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("stop the answer first (esc)", severity="warning")
            return
        self.history = {"base": [], "main": []}
        for pane in self.query(".transcript"):
            pane.remove_children()

    def action_stop(self) -> None:
        if self.generating:
            self.stop_event.set()
        else:
            self.set_focus(None)

    # --- sending ------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt":
            self.query_one("#prompt", Input).focus()
            return
        question = event.value.strip()
        if not question:
            return
        if self.generating:
            self.notify("still answering; esc stops it", severity="warning")
            return
        event.input.value = ""
        self.send(question)

    def send(self, question: str) -> None:
        model = self.query_one("#ch-model", Input).value.strip() or "demo"
        adapter = self.query_one("#ch-adapter", Input).value.strip() or None
        sides: list[tuple[str, str, str | None]] = []
        if self.query_one("#ch-compare", Checkbox).value:
            base = self.base_model()
            self.query_one("#pane-base").border_title = f"base · {base}"
            sides.append(("base", base, None))
        sides.append(("main", model, adapter))
        for side, *_ in sides:
            self.history[side].append({"role": "user", "content": question})
            self._add(side, f"you: {question}", "msg-user")
        self.generating = True
        self.stop_event = threading.Event()
        system = self.query_one("#ch-system", Input).value.strip() or None
        self.generate(sides, {s: list(h) for s, h in self.history.items()}, system, self.stop_event)

    def _add(self, side: str, text: str, cls: str) -> Static:
        pane = self.query_one(f"#pane-{side}", VerticalScroll)
        w = Static(text, classes=cls, markup=False)
        pane.mount(w)
        pane.scroll_end(animate=False)
        return w

    @work(thread=True, group="chat")
    def generate(
        self,
        sides: list[tuple[str, str, str | None]],
        history: dict[str, list[dict]],
        system: str | None,
        stop: threading.Event,
    ) -> None:
        from assistant_forge.errors import ForgeError, one_line

        for side, model, adapter in sides:
            if stop.is_set():
                break
            try:
                chat = self._load(side, model, adapter)
                chat.system = system
                self.post_message(self.Piece(side, kind="begin"))
                for piece in chat.stream(history[side], max_new_tokens=self.max_new_tokens, stop_event=stop):
                    self.post_message(self.Piece(side, piece))
            except ForgeError as e:
                self.post_message(self.Piece(side, str(e), kind="error"))
                continue
            except Exception as e:  # a model that fails to load or generate: one line, not a traceback
                self.post_message(self.Piece(side, one_line(e), kind="error"))
                continue
            self.post_message(self.Piece(side, "[stopped]" if stop.is_set() else "", kind="end"))
        self.post_message(self.Piece("", kind="idle"))

    def _load(self, side: str, model: str, adapter: str | None) -> Any:
        key = (model, adapter)
        if key not in self.models:
            from assistant_forge.core.chat import load_chat_model

            self.post_message(
                self.Piece(side, f"loading {Path(model).name}{' + adapter' if adapter else ''}…", kind="info")
            )
            if len(self.models) >= MAX_CACHED:
                self.models.pop(next(iter(self.models)))
            self.models[key] = load_chat_model(model, adapter)
        return self.models[key]

    def on_chat_screen_piece(self, msg: Piece) -> None:
        if msg.kind == "idle":
            self.generating = False
            return
        if msg.kind == "info":
            self._add(msg.side, msg.text, "hint")
        elif msg.kind == "error":
            self._add(msg.side, msg.text, "msg-error")
            self.history[msg.side].pop()  # the question went unanswered
        elif msg.kind == "begin":
            self._answer[msg.side] = ""
            self._current[msg.side] = self._add(msg.side, "bot: ", "msg-bot")
        elif msg.kind == "piece":
            self._answer[msg.side] += msg.text
            self._current[msg.side].update("bot: " + self._answer[msg.side])
            self.query_one(f"#pane-{msg.side}", VerticalScroll).scroll_end(animate=False)
        elif msg.kind == "end":
            answer = self._answer.pop(msg.side, "")
            self.history[msg.side].append({"role": "assistant", "content": answer})
            if msg.text:
                self._current[msg.side].update("bot: " + answer + " " + msg.text)
