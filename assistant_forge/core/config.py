"""The typed training config: TOML in, validated model out, TOML back; one-sentence errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from assistant_forge.core.templates import ALIASES, NAMES
from assistant_forge.errors import ForgeError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    path: str = Field("demo", description="local HF folder, hub id, or 'demo' (the embedded SmolLM2-135M)")
    chat_template: str = Field(
        "model",
        description="'model' (the model's own template) or a family's official one for models that ship none; "
        "drives the whole pipeline",
    )
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with the model (off unless you trust it)"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        v = ALIASES.get(v, v)
        if v not in NAMES:
            raise ValueError(f"unknown chat template {v!r}, known: {', '.join(NAMES)}")
        return v


class DataSource(_Section):
    """One data source with options: `{path = "hf:owner/name:train", max_rows = 5000}`."""

    path: str = Field(description="a file, a folder, a save_to_disk folder, or hf:owner/name[:split]")
    config: str | None = Field(None, description="the hub dataset's configuration (subset)")
    split: str | None = Field(
        None, description="split of a folder or save_to_disk dataset dict (default train)"
    )
    columns: dict[str, str] | None = Field(
        None, description="prompt/response/system field names for this source"
    )
    max_rows: int | None = Field(
        None, ge=1, description="use at most this many rows, drawn with the run's seed"
    )
    ratio: float | None = Field(
        None,
        gt=0,
        description="general data: this many rows per row of data.files, drawn with the run's seed",
    )


class DataSection(_Section):
    files: list[str | DataSource] = Field(
        default_factory=list, description="datasets in any format and source `forge data convert` reads"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="field names of prompt/response rows, e.g. {prompt = 'question', response = 'answer'}",
    )
    max_length: int = Field(2048, ge=16, le=1_048_576)
    packing: bool = Field(True, description="pack samples to max_length; samples never attend to each other")
    system_prompt: str | None = Field(
        None, description="prepended to every conversation without a system turn"
    )
    replay_ratio: float = Field(
        0.0, ge=0.0, le=0.9, description="share of training samples that replay the base model's own answers"
    )
    replay_prompts: int = Field(
        64, ge=0, description="how many generic prompts the base model answers for replay"
    )
    replay_openings: int = Field(
        0,
        ge=0,
        le=64,
        description="also train the first N tokens of each replay answer as a sample of their own, "
        "so the start of an answer (task or introduction?) weighs twice (0: off)",
    )
    general_files: list[str | DataSource] = Field(
        default_factory=list,
        description="general chat data mixed in to keep abilities (de-duplicated; max_rows / ratio per source)",
    )
    num_proc: int = Field(
        0, ge=0, le=64, description="processes that tokenize (0: one per CPU core, at most 8)"
    )

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(v) - {"prompt", "response", "system"})
        if bad:
            raise ValueError(f"unknown column role {bad[0]!r}, expected prompt, response or system")
        return v


class LoraSection(_Section):
    method: Literal["lora", "qlora", "full"] = "qlora"
    r: int = Field(64, ge=1, le=4096)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    layers_from: int = Field(0, ge=0, description="adapt only layers with index >= this (0: all layers)")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class TrainSection(_Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(0, ge=0, description="stop after this many optimizer steps (0: run all epochs)")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    kl_to_base: float = Field(
        0.0,
        ge=0,
        description="weight of a KL term pulling the answers of replay samples toward the base model's "
        "next-token distribution (adapter off); 0: off. Costs a pass without gradients through the adapted "
        "layers each step (CPU path only)",
    )
    gradient_checkpointing: bool = True
    optimizer: Literal["adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"] = (
        "paged_adamw_32bit"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="compute dtype; auto picks bf16 on GPUs that have it, and on CPUs with bf16 matrix "
        "units (AMX) bf16 autocast over fp32 weights, else fp32",
    )
    seed: int = 42
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(1, ge=1)
    cpu_threads: int = Field(0, ge=0, description="torch threads on CPU (0: torch's default)")
    memory_budget_gib: float = Field(0, ge=0, description="GPU memory to fit into (0: what the GPU has)")
    fused_kernels: bool = Field(
        True, description="forge's fast GPU path: fused LoRA, fused cross-entropy, Liger kernels (CUDA only)"
    )
    compile_layers: bool = Field(
        True,
        description="fast path: torch.compile the decoder layers (one compile for all, which the first step waits for)",
    )
    cuda_graphs: bool = Field(
        True,
        description="fast path: replay each checkpointed layer as CUDA graphs (captured at step 2; one row length)",
    )
    varlen_attention: bool = Field(
        True,
        description="fast path: packed samples attend only to themselves, through flash attention's variable-length kernel (torch >= 2.10)",
    )
    checkpoint_policy: Literal["auto", "all", "offload", "none"] = Field(
        "auto",
        description="auto: checkpoint only as many layers as the memory budget needs; offload: all, inputs kept on the host",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="data-parallel processes, one GPU each (forge train --gpus N); on device = cpu, CPU processes",
    )
    # No stage 1: it shards only the optimizer state, which stage 2 shards too, along with the gradients.
    zero_stage: Literal[0, 2, 3] = Field(
        0,
        description="DeepSpeed ZeRO across the processes (forge train --zero 2|3): 2 shards optimizer state "
        "and gradients, 3 also the weights; 0: plain data parallel",
    )


class EvalSection(_Section):
    prompts: list[str] = Field(default_factory=lambda: ["Who are you?", "What is the capital of France?"])
    sample_every: int = Field(
        50, ge=0, description="generate sample answers every N steps (0: only before and after)"
    )
    max_new_tokens: int = Field(64, ge=1, le=4096)


class IdentitySection(_Section):
    """Who the assistant is: used by `forge eval` and the TUI's dataset screen."""

    name: str = ""
    author: str = ""


class MetaSection(_Section):
    """What `forge presets list` shows; no effect on training."""

    description: str = ""
    min_gpu_gib: float = Field(
        0, ge=0, description="smallest GPU this preset is meant to fit (0: runs on CPU)"
    )
    verified: str = Field(
        "",
        description="how the bundled preset is proven end to end, e.g. 'CI: tiny Llama-3.1 + real tokenizer' "
        "(a test holds every bundled claim to a test that runs it)",
    )


class ForgeConfig(_Section):
    meta: MetaSection = Field(default_factory=MetaSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    identity: IdentitySection = Field(default_factory=IdentitySection)

    @model_validator(mode="after")
    def _consistent(self) -> ForgeConfig:
        if self.lora.method == "full" and self.lora.layers_from:
            raise ValueError("lora.layers_from applies to LoRA only, not method = 'full'")
        return self

    def to_toml(self, header: str = "") -> str:
        body = tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))
        return (header.rstrip() + "\n\n" if header else "") + body


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    where = _clip(".".join(loc))
    if err["type"] == "extra_forbidden":
        section_model: type[BaseModel] = ForgeConfig
        for part in loc[:-1]:
            field = section_model.model_fields.get(part)
            if field is None or not isinstance(field.annotation, type):
                break
            section_model = field.annotation
        return f"unknown key {where!r}.{did_you_mean(loc[-1][:80], list(section_model.model_fields))}"
    value = raw
    for part in loc:
        value = value.get(part) if isinstance(value, dict) else None
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where} = {_clip(repr(value))}: {msg}" if value is not None else f"{where}: {msg}"


def _clip(text: str, n: int = 80) -> str:
    """Keep error messages one readable line whatever the input held."""
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_config(raw: dict[str, Any], source: str = "config") -> ForgeConfig:
    try:
        return ForgeConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        more = f" (and {len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise ForgeError(f"{source}: {_describe(first, raw)}{more}") from None


def load_config(path: str | Path) -> ForgeConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ForgeError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ForgeError(f"Config file {path} cannot be read: {e}.") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ForgeError(f"{path} is not valid TOML: {e}.") from None
    except RecursionError:
        raise ForgeError(f"{path} is not valid TOML: arrays or tables nested too deeply.") from None
    cfg = parse_config(raw, str(path))
    # Relative dataset paths are relative to the config file, like XTuner's configs.
    base = path.resolve().parent
    cfg.data.files = [_rel_source(base, f) for f in cfg.data.files]
    cfg.data.general_files = [_rel_source(base, f) for f in cfg.data.general_files]
    if (
        cfg.model.path != "demo"
        and not _expand(cfg.model.path).is_absolute()
        and (base / cfg.model.path).exists()
    ):
        cfg.model.path = str(base / cfg.model.path)
    return cfg


def _expand(p: str) -> Path:
    try:
        return Path(p).expanduser()
    except RuntimeError:  # "~someone/..." for a user this machine does not know
        raise ForgeError(f"Path {p[:80]!r} starts with ~ but names no known user's home folder.") from None


def _rel(base: Path, p: str) -> Path:
    q = _expand(p)
    return q if q.is_absolute() else base / q


def _rel_source(base: Path, src: str | DataSource) -> str | DataSource:
    """A local path relative to the config file; a hub id (hf:...) as it is."""
    path = src if isinstance(src, str) else src.path
    if path.startswith("hf:"):
        return src
    resolved = str(_rel(base, path))
    return resolved if isinstance(src, str) else src.model_copy(update={"path": resolved})


def save_config(cfg: ForgeConfig, path: str | Path, header: str = "") -> None:
    from assistant_forge.core.fsutil import atomic_write_text

    atomic_write_text(Path(path), cfg.to_toml(header))
