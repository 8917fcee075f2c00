"""Config: pick a preset, edit the fields people change, see core's verdict and a memory estimate.

The form keeps raw strings; every change rebuilds the config through core.config.parse_config
(pydantic converts "2e-4" and "16"), so the errors shown are exactly the ones `forge train`
would give for the same TOML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, OptionList, Select, Static, TextArea
from textual.widgets.option_list import Option

from assistant_forge.tui.screens.base import StepScreen
from assistant_forge.tui.widgets.steps import StepsBar

if TYPE_CHECKING:
    from assistant_forge.core.config import ForgeConfig


@dataclass(frozen=True)
class Field:
    key: str  # section.name in the config
    label: str
    sep: str = ""  # list fields: the separator used in the one-line input
    choices: tuple[str, ...] = ()

    @property
    def wid(self) -> str:
        return "cf-" + self.key.replace(".", "-")


FIELDS: tuple[Field, ...] = (
    Field("model.path", "model"),
    Field("data.files", "datasets", sep=","),
    Field("train.epochs", "epochs"),
    Field("train.max_steps", "max steps (0=all)"),
    Field("train.learning_rate", "learning rate"),
    Field("data.max_length", "max length"),
    Field("lora.method", "method", choices=("lora", "qlora", "full")),
    Field("lora.quant_type", "4-bit type", choices=("nf4", "fp4")),
    Field("lora.r", "LoRA r"),
    Field("lora.alpha", "LoRA alpha"),
    Field("train.micro_batch_size", "micro batch"),
    Field("train.grad_accum", "grad accum"),
    Field("eval.prompts", "eval prompts", sep="|"),
)


def get_value(raw: dict, key: str) -> Any:
    section, name = key.split(".")
    return raw.get(section, {}).get(name)


def as_text(value: Any, sep: str) -> str:
    if isinstance(value, list):
        # A data source given as a table ({path = ..., max_rows = ...}) shows as its path.
        parts = [v["path"] if isinstance(v, dict) else str(v) for v in value]
        return f" {sep} ".join(parts) if sep == "|" else f"{sep} ".join(parts)
    return "" if value is None else str(value)


def from_text(text: str, sep: str, original: Any) -> list:
    """The list a one-line field stands for; a path that was a table entry keeps its table (options)."""
    tables = {v["path"]: v for v in original or [] if isinstance(v, dict)}
    return [tables.get(p, p) for p in (p.strip() for p in text.split(sep)) if p]


def model_config_for(spec: str) -> dict | None:
    """The model's config.json as a dict if it is on this machine (never downloads anything)."""
    import json

    from assistant_forge.core import models
    from assistant_forge.paths import cache_dir

    if spec == models.DEMO:
        path = cache_dir() / models.DEMO_DIRNAME / "config.json"
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(spec, "config.json")
        except Exception:
            return None
        path = Path(hit) if isinstance(hit, str) else Path("/nonexistent")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def memory_line(cfg: ForgeConfig, model_config: dict) -> str:
    """The estimate of the plan the trainer will run. Its `auto` policy fits train.memory_budget_gib,
    else the GPU it finds at start; before that the preset's GPU (meta.min_gpu_gib) stands in."""
    from assistant_forge.core.memory import GIB, planned_memory

    budget_gib = cfg.train.memory_budget_gib or cfg.meta.min_gpu_gib
    est = planned_memory(cfg, model_config, int(budget_gib * GIB) if budget_gib else 1 << 62)
    fitted = budget_gib and cfg.train.gradient_checkpointing and cfg.train.checkpoint_policy == "auto"
    return (
        f"GPU memory ≈ [b]{est.total_gib:.2f} GiB[/] peak"
        f"{' per GPU' if cfg.train.processes > 1 else ''} · {est.seq_len} tokens/step · "
        f"{est.checkpointed_layers}/{est.num_layers} layers ckpt"
        f"{' as CUDA graphs' if est.graphs else ''}"
        f"{f' · fitted to {budget_gib:g} GiB' if fitted else ''}"
    )


class TomlView(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,v,q", "close", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(id="toml-box"):
            yield TextArea(self.text, read_only=True, id="toml-text")

    def action_close(self) -> None:
        self.dismiss(None)


class ConfigScreen(StepScreen):
    AUTO_FOCUS = "#preset-list"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "focus_filter", "Filter presets"),
        Binding("v", "view_toml", "View TOML"),
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("t", "use", "Train with it"),
    ]

    class MemoryEstimated(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self) -> None:
        super().__init__()
        self.preset_name = ""
        self.base_raw: dict = {}
        self.cfg: ForgeConfig | None = None
        self.error = ""
        self._loading = False

    def compose(self) -> ComposeResult:
        yield StepsBar("config")
        with Horizontal(id="config-body"):
            with Vertical(id="presets-pane"):
                yield Input(placeholder="filter presets", id="preset-filter", compact=True)
                yield OptionList(id="preset-list")
            with Vertical(id="config-form"):
                yield Static("", id="preset-desc", classes="hint")
                with VerticalScroll(id="fields"):
                    for f in FIELDS:
                        with Horizontal(classes="field-row"):
                            yield Label(f.label)
                            if f.choices:
                                yield Select(
                                    [(c, c) for c in f.choices], id=f.wid, allow_blank=False, compact=True
                                )
                            else:
                                yield Input(id=f.wid, compact=True)
                yield Static("", id="config-error", classes="status-line")
                yield Static("GPU memory: pick a preset", id="config-mem", classes="hint")
                with Horizontal(classes="button-row"):
                    yield Input(placeholder="save as (e.g. my.toml)", id="cf-save-path")
                    yield Button("Save", id="cf-save", variant="success")
                    yield Button("Train ▸", id="cf-use", variant="primary")
        yield Footer()

    def on_mount(self) -> None:
        from assistant_forge.core.presets import list_presets

        self.presets = list_presets()
        self._fill_presets("")
        if self.presets:
            demo = next((i for i, p in enumerate(self.presets) if p.name.startswith("demo")), 0)
            self.query_one(OptionList).highlighted = demo
            self.load_preset(self.presets[demo].name)

    def on_screen_resume(self) -> None:
        # A dataset saved on the Dataset screen since: train on it.
        ds = self.session.dataset_path
        w = self.query_one("#cf-data-files", Input)
        if ds and str(ds) not in w.value and not all(Path(p).is_file() for p in self._files(w.value)):
            w.value = str(ds)

    @staticmethod
    def _files(text: str) -> list[str]:
        return [p.strip() for p in text.split(",") if p.strip()]

    def _fill_presets(self, needle: str) -> None:
        ol = self.query_one(OptionList)
        ol.clear_options()
        needle = needle.lower()
        ol.add_options(
            Option(p.name + (" (user)" if p.user else ""), id=p.name)
            for p in self.presets
            if needle in p.name.lower()
        )

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "preset-filter":
            self._fill_presets(event.value)
        elif event.input.id != "cf-save-path" and not self._loading:
            self.revalidate()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "preset-filter":
            self.query_one(OptionList).focus()
        elif event.input.id == "cf-save-path":
            self.action_save()

    def on_select_changed(self, event: Select.Changed) -> None:
        if not self._loading:
            self.revalidate()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.load_preset(event.option.id)
            self.query_one(f"#{FIELDS[0].wid}", Input).focus()

    def load_preset(self, name: str) -> None:
        from assistant_forge.core.presets import get_preset
        from assistant_forge.errors import ForgeError

        try:
            cfg = get_preset(name).load()
        except ForgeError as e:
            self.show_error("config-error", str(e))
            return
        if self.session.dataset_path:
            cfg.data.files = [str(self.session.dataset_path)]
        if all(self.session.identity):
            cfg.identity.name, cfg.identity.author = self.session.identity
        self.preset_name = name
        self.base_raw = cfg.model_dump(mode="json")
        self.query_one("#preset-desc", Static).update(f"[b]{name}[/] · {cfg.meta.description}")
        self._loading = True  # one revalidation after all fields are set, not one per field
        for f in FIELDS:
            value = get_value(self.base_raw, f.key)
            if f.choices:
                self.query_one(f"#{f.wid}", Select).value = value
            else:
                self.query_one(f"#{f.wid}", Input).value = as_text(value, f.sep)
        self.query_one("#cf-save-path", Input).value = f"{name}.toml"
        self.call_after_refresh(self._loaded)

    def _loaded(self) -> None:
        self._loading = False
        self.revalidate()

    def form_raw(self) -> dict:
        import copy

        raw = copy.deepcopy(self.base_raw)
        for f in FIELDS:
            section, name = f.key.split(".")
            if f.choices:
                raw[section][name] = self.query_one(f"#{f.wid}", Select).value
                continue
            text = self.query_one(f"#{f.wid}", Input).value.strip()
            if f.sep:
                raw[section][name] = from_text(text, f.sep, raw[section].get(name))
            else:
                raw[section][name] = text  # pydantic converts numbers and reports bad ones
        return raw

    def revalidate(self) -> None:
        from assistant_forge.core.config import parse_config
        from assistant_forge.errors import ForgeError

        if not self.base_raw:
            return
        try:
            self.cfg = parse_config(self.form_raw(), "config")
            self.error = ""
        except ForgeError as e:
            self.cfg, self.error = None, str(e)
        for f in FIELDS:
            bad = bool(self.error) and self.error.removeprefix("config: ").startswith(f.key)
            self.query_one(f"#{f.wid}").set_class(bad, "-invalid")
        self.show_error("config-error", self.error)
        if not self.error:
            self.query_one("#config-error", Static).update("[green]✓ valid[/]")
            self.estimate(self.cfg)

    @work(thread=True, exclusive=True, group="memory")
    def estimate(self, cfg: ForgeConfig | None) -> None:
        if cfg is None:
            return
        model_cfg = model_config_for(cfg.model.path)
        if model_cfg is None:
            self.post_message(
                self.MemoryEstimated("GPU memory: unknown (the model's config.json is not on this machine)")
            )
            return
        try:
            text = memory_line(cfg, model_cfg)
        except Exception as e:  # an odd model config must not break the form
            text = f"GPU memory: unknown ({type(e).__name__})"
        self.post_message(self.MemoryEstimated(text))

    def on_config_screen_memory_estimated(self, msg: MemoryEstimated) -> None:
        self.query_one("#config-mem", Static).update(msg.text)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cf-save":
            self.action_save()
        elif event.button.id == "cf-use":
            self.action_use()

    def action_focus_filter(self) -> None:
        self.query_one("#preset-filter", Input).focus()

    def action_view_toml(self) -> None:
        if self.cfg is None:
            self.notify(self.error or "pick a preset first", severity="error")
            return
        self.app.push_screen(TomlView(self.cfg.to_toml(f"# preset: {self.preset_name}")))

    def action_save(self) -> None:
        from assistant_forge.core.config import save_config

        if self.cfg is None:
            self.notify(self.error or "pick a preset first", severity="error")
            return
        path = Path(self.query_one("#cf-save-path", Input).value.strip() or f"{self.preset_name}.toml")
        path = path.expanduser().resolve()
        try:
            save_config(self.cfg, path, header=f"# forge train {path}\n# from preset {self.preset_name}")
        except OSError as e:
            self.show_error("config-error", f"Cannot save to {path}: {e.strerror or e}")
            return
        self._use()
        self.session.config_name = path.stem
        self.notify(f"saved {path}")

    def _use(self) -> bool:
        if self.cfg is None:
            self.notify(self.error or "pick a preset first", severity="error")
            return False
        self.session.config = self.cfg
        self.session.config_name = self.preset_name
        return True

    def action_use(self) -> None:
        if self._use():
            self.app.switch_mode("train")
