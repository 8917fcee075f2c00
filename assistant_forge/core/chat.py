"""Generation for the CLI, the TUI, sample answers and evaluation: batched greedy and streaming."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant_forge.core import internlm2
from assistant_forge.core.encoding import stop_token_ids, with_system
from assistant_forge.core.models import (
    check_model_code,
    quiet_transformers,
    require_safetensors,
    resolve_model,
)
from assistant_forge.core.templates import MODEL, canonical, render
from assistant_forge.errors import ForgeError, first_line

ADAPTER_META = "forge_adapter.json"  # written by `forge convert`: base model and template


def generate_answers(
    model: Any,
    tok: Any,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to a batch of conversations (left padding; the model's mode is restored)."""
    import torch

    was_training = model.training
    model.eval()
    stops = stop_token_ids(tok, getattr(model.generation_config, "eos_token_id", None))
    side = tok.padding_side
    tok.padding_side = "left"
    answers: list[str] = []
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [render(tok, c, add_generation_prompt=True) for c in conversations[i : i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=tok.pad_token_id,
                    use_cache=True,
                )
            answers += [
                tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in out
            ]
    finally:
        tok.padding_side = side
        if was_training:
            model.train()
    return answers


@dataclass
class ChatModel:
    """A loaded model ready to chat: base, base + adapter, or a merged folder."""

    model: Any
    tok: Any
    template: str  # the template's name as the config or adapter gave it
    label: str
    system: str | None = None

    @property
    def batch_size(self) -> int:
        """Prompts per generate call: on a CPU each decoding step reads every weight once whatever the
        batch, so a big batch is much faster; on a GPU 16 keeps the padding waste small."""
        return 64 if self.model.device.type == "cpu" else 16

    def answer_batch(self, conversations: list[list[dict]], max_new_tokens: int = 128) -> list[str]:
        convs = [with_system(c, self.system) for c in conversations]
        return generate_answers(self.model, self.tok, convs, max_new_tokens, self.batch_size)

    def stream(
        self,
        messages: list[dict],
        max_new_tokens: int = 512,
        stop_event: threading.Event | None = None,
        temperature: float = 0.0,
    ) -> Iterator[str]:
        """Yield text pieces as they are generated; setting stop_event ends generation early."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        msgs = with_system(messages, self.system)
        text = render(self.tok, msgs, add_generation_prompt=True)
        enc = self.tok(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        stop_event = stop_event or threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> bool:
                return stop_event.is_set()

        kwargs = dict(
            **enc,
            streamer=streamer,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(
                self.tok, getattr(self.model.generation_config, "eos_token_id", None)
            ),
            pad_token_id=self.tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_Stop()]),
            do_sample=temperature > 0,
            **({"temperature": temperature} if temperature > 0 else {}),
        )
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as e:  # surfaced to the caller below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]


def adapter_meta(adapter: str | Path) -> dict:
    p = Path(adapter) / ADAPTER_META
    return json.loads(p.read_text()) if p.is_file() else {}


def model_template_name(model_dir: str) -> str | None:
    """The template forge recorded in a merged model folder, if any."""
    p = Path(model_dir) / ADAPTER_META
    return json.loads(p.read_text()).get("chat_template") if p.is_file() else None


def load_chat_model(
    model: str,
    adapter: str | None = None,
    bits: int | None = None,
    template: str | None = None,
    allow_template_mismatch: bool = False,
    system: str | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
) -> ChatModel:
    """Load a model for chat; refuse a template that differs from the one the adapter was trained with."""
    import torch
    from transformers import AutoModelForCausalLM

    from assistant_forge.core.encoding import load_tokenizer

    quiet_transformers()
    path = resolve_model(model)
    check_model_code(path, model, trust_remote_code)
    trained = adapter_meta(adapter).get("chat_template") if adapter else model_template_name(path)
    if adapter and not Path(adapter).is_dir():
        raise ForgeError(f"Adapter folder {adapter} does not exist.")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ForgeError(
            f"{adapter} is not a PEFT adapter folder (no adapter_config.json); make one with `forge convert`."
        )
    if adapter:
        require_safetensors(adapter, "Adapter folder", ("adapter_model.safetensors",))
    template = canonical(template) if template else None
    trained = canonical(trained) if trained else None
    if template and trained and template != trained and not allow_template_mismatch:
        raise ForgeError(
            f"This model was trained with the {trained!r} template, not {template!r}; "
            "pass --force-template to chat with it anyway."
        )
    name = template or trained or MODEL
    tok = load_tokenizer(path, name, trust_remote_code, label=model)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if use_cuda else torch.float32,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if bits in (4, 8):
        from transformers import BitsAndBytesConfig

        from assistant_forge.core.hardware import check_4bit_available

        check_4bit_available("cuda" if use_cuda else "cpu")
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"]
            )
            if bits == 4
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    elif bits is not None:
        raise ForgeError(f"--bits must be 4 or 8, not {bits}.")
    if use_cuda:
        kwargs["device_map"] = {"": 0}
    try:
        m = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ForgeError(f"Could not load model {model}: {first_line(e)}") from None
    label = Path(internlm2.source_folder(path) or path).name  # the user's folder, not its cached copy
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
        label += f" + {Path(adapter).name}"
    m.eval()
    return ChatModel(m, tok, name, label, system)
