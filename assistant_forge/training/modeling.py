"""Load the base model for training: device, precision, 4-bit quantization, LoRA, the fast path's hooks."""

from __future__ import annotations

import os
from typing import Any

from assistant_forge.core.config import ForgeConfig
from assistant_forge.core.encoding import load_tokenizer
from assistant_forge.core.hardware import check_4bit_available
from assistant_forge.core.models import check_model_code, resolve_model
from assistant_forge.errors import ForgeError, first_line
from assistant_forge.training.labeled_loss import patch_labeled_loss


def pick_device(cfg: ForgeConfig) -> str:
    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ForgeError("train.device = 'cuda' but no CUDA GPU is visible; set device = 'auto' or 'cpu'.")
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.train.device


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX-BF16 tiles, e.g. Xeon Sapphire Rapids).

    Read from torch's own CPU feature table (cpuinfo, the same probe its oneDNN kernels dispatch on; works
    on any OS and inside containers, unlike parsing /proc/cpuinfo), then the tiles are requested from the
    kernel (Linux hands AMX state to a process only on request; where it refuses, oneDNN cannot use them).
    AVX512-BF16 alone (no tiles) does not count: its bf16 matmuls were never measured faster than fp32.
    """
    import torch

    caps = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: fp32 there
    if caps is None or not caps().get("amx_bf16", False):
        return False
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init_amx()) if init_amx is not None else True


def resolve_precision(precision: str, device: str, cpu_bf16: bool | None = None) -> str:
    """The precision `train.precision` means on `device`: "bf16", "fp16" or "fp32".

    "auto" is bf16 on GPUs that have it (else fp16), and on CPUs bf16 where bf16 matrix units make it
    ~1.7x faster (the demo's step, bench/cpu_bf16_probe.py), fp32 elsewhere. `cpu_bf16` overrides the
    CPU's detection (None: detect).
    """
    import torch

    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if (cpu_has_bf16_units() if cpu_bf16 is None else cpu_bf16) else "fp32"


def pick_dtype(cfg: ForgeConfig, device: str) -> Any:
    """The dtype the base model loads in. On a CPU, "auto" resolved to bf16 keeps fp32 weights (bf16
    autocast computes, training.trainer.training_args): the base model's replay answers are then
    generated in fp32 exactly as before, so the cached and shipped ones still apply."""
    import torch

    p = cfg.train.precision
    if p == "auto" and device == "cpu":
        return torch.float32
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return dtypes[resolve_precision(p, device)]


def quantization_config(cfg: ForgeConfig, dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.lora.quant_type,
        bnb_4bit_use_double_quant=cfg.lora.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_base(cfg: ForgeConfig, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    path = resolve_model(cfg.model.path)
    kwargs: dict[str, Any] = dict(
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,  # a pickled checkpoint can run code when loaded
    )
    if cfg.lora.method == "qlora":
        check_4bit_available(device)
        kwargs["quantization_config"] = quantization_config(cfg, dtype)
    if device == "cuda":
        # One GPU per process: torchrun's LOCAL_RANK (0 in a single process).
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ForgeError(f"Could not load model {cfg.model.path}: {first_line(e)}") from None
    if cfg.lora.method == "qlora" and device == "cpu":
        keep_4bit_trainable_on_cpu(model)
    return model


def keep_4bit_trainable_on_cpu(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference the first time they run in eval mode.

    bitsandbytes 0.50 does that on CPUs with AVX512-BF16 and never undoes it: after the sample or replay
    answers (generated in eval mode), training then runs through a kernel without autograd, which
    drops the gradient through the base weights and fails outright on layers with a bias (Qwen2's
    q/k/v: "a view of a leaf Variable that requires grad is being used in an in-place operation").
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build_model(cfg: ForgeConfig) -> tuple[Any, Any]:
    """The trainable model (PEFT-wrapped unless method = 'full') and its tokenizer."""
    device = pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    path = resolve_model(cfg.model.path)
    check_model_code(path, cfg.model.path, cfg.model.trust_remote_code)
    tok = load_tokenizer(path, cfg.model.chat_template, cfg.model.trust_remote_code, label=cfg.model.path)
    # Imported here, not at the top: it imports torch, and core imports this module for
    # check_4bit_available alone.
    from assistant_forge.training import fast

    model = load_base(cfg, device, dtype)
    model = fast.apply_speedups(model, cfg)
    if device == "cpu":
        # Logits and loss only where a label is: the same loss, and ~1.2x the demo's steps per minute.
        patch_labeled_loss(model)
    model = wrap_for_training(model, cfg)
    model = fast.after_peft(model, cfg)
    return model, tok


def wrap_for_training(model: Any, cfg: ForgeConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ckpt = cfg.train.gradient_checkpointing
    if cfg.lora.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.method == "lora":
            model.enable_input_require_grads()
    if cfg.lora.method == "full":
        model.config.use_cache = False
        return model
    n_layers = getattr(model.config, "num_hidden_layers", 0)
    if cfg.lora.layers_from and cfg.lora.layers_from >= n_layers:
        raise ForgeError(
            f"lora.layers_from = {cfg.lora.layers_from} but the model has only {n_layers} layers."
        )
    targets: Any = "all-linear" if cfg.lora.target_modules == ["all-linear"] else cfg.lora.target_modules
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        layers_to_transform=list(range(cfg.lora.layers_from, n_layers)) if cfg.lora.layers_from else None,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise ForgeError(f"LoRA could not be applied: {first_line(e)} (check lora.target_modules).") from None
    model.config.use_cache = False
    return model
