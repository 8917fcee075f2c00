"""Hub-like tiny model folders, one per preset family, as a user would download them.

Each folder has the family's real architecture class at a tiny size (2 layers, hidden 64, random
weights), the family's real vocabulary size and special-token ids, `generation_config.json` as the
hub ships it, and a tokenizer whose `tokenizer_config.json` carries the family's official chat
template (forge's package data). Tokenizers are the real ones wherever a PyPI package ships them:

- Llama 3.1: `llama-models` ships Meta's tiktoken BPE file (its licence forbids committing it here).
- Mistral v0.3: `mistral-common` ships the v3 SentencePiece model.
- Qwen2.5: `dashscope` ships `qwen.tiktoken`, the BPE ranks Qwen2 shares with Qwen1; Qwen2.5's
  special tokens are added on top at their hub ids.
- InternLM2: the hub-format tiny checkpoint `tests/fixtures/internlm2/tiny-a` (remote-code files and
  all; its own small SentencePiece tokenizer, laid out like the real one).
- Yi-1.5: no package ships it, so a STAND-IN: a small SentencePiece BPE trained here on the project's
  sample data, with Yi's special tokens at Yi's ids (`<|startoftext|>` 1, `<|endoftext|>` 2,
  `<|im_start|>` 6, `<|im_end|>` 7, `<|im_sep|>` 8) and Yi's 64000-row embedding.

Folders are built once into forge's cache dir (`FORGE_CACHE_DIR`) and reused; BUILD names the
layout so a changed builder rebuilds.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant_forge.core.fsutil import staged_dir
from assistant_forge.core.models import fetch_package_file
from assistant_forge.paths import bundled, cache_dir

BUILD = "3"
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "templates" / "golden.json"
REPO = Path(__file__).resolve().parents[1]
INTERNLM2_TINY = REPO / "tests" / "fixtures" / "internlm2" / "tiny-a"

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@dataclass(frozen=True)
class Family:
    key: str  # also the family's key in golden.json and its chat_templates/<key>.jinja
    presets: tuple[str, ...]
    end_of_turn: str  # the token that ends an assistant turn in the official template
    verified: str  # the claim its presets make in [meta] verified (`forge presets list` shows it)
    build: Callable[[Path], None] = field(repr=False)
    special_ids: dict[str, int] = field(default_factory=dict)  # what the hub's tokenizer says


def official_template(key: str) -> str:
    """The family's official chat template, as forge ships it (package data)."""
    from assistant_forge.core.templates import shipped

    return shipped(key)


def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


# --- tokenizers ----------------------------------------------------------------------------------


def _tiktoken_tokenizer(path: Path, pattern: str, specials: list[str], ignore_merges: bool) -> Any:
    """A tiktoken BPE file ("base64(token) rank" per line) as a `tokenizers` BPE, without tiktoken."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            with open(tiktoken_url, "rb") as f:
                rows = (line.split() for line in f if line.strip())
                return {base64.b64decode(tok): int(rank) for tok, rank in rows}

    tok = _Converter(vocab_file=str(path), pattern=pattern, extra_special_tokens=specials).converted()
    tok.model.ignore_merges = ignore_merges
    return tok


LLAMA3_PACKAGE = ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model")
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's 256 special tokens in id order from 128000, named as llama-models 0.3.0 names them.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]

QWEN_PACKAGE = ("dashscope==2.0.2", "dashscope/resources/qwen.tiktoken")
QWEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
# Qwen's pre-tokenizer: like Llama 3's but single digits (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens in id order from 151643 (the BPE ranks end at 151642).
QWEN25_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

MISTRAL_PACKAGE = ("mistral-common==1.13.1", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3")
MISTRAL_SHA256 = "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33"


def _fast_tokenizer(tokenizer_object: Any, **special: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, **special)


def llama3_tokenizer() -> Any:
    path = fetch_package_file(*LLAMA3_PACKAGE, LLAMA3_SHA256, "Llama 3 tokenizer")
    tok = _tiktoken_tokenizer(path, LLAMA3_PATTERN, LLAMA3_SPECIALS, ignore_merges=True)
    # Llama-3.1-8B-Instruct's tokenizer_config: bos <|begin_of_text|>, eos <|eot_id|>, NO pad token.
    return _fast_tokenizer(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def qwen25_tokenizer() -> Any:
    from tokenizers import normalizers

    path = fetch_package_file(*QWEN_PACKAGE, QWEN_SHA256, "Qwen tokenizer")
    tok = _tiktoken_tokenizer(path, QWEN_PATTERN, QWEN25_SPECIALS, ignore_merges=False)
    tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalises to NFC
    # Qwen2.5-Instruct's tokenizer_config: no bos, eos <|im_end|>, pad <|endoftext|>.
    return _fast_tokenizer(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _sentencepiece_tokenizer(model_file: Path, config: dict[str, Any]) -> Any:
    """A SentencePiece model loaded the way a hub folder with tokenizer.model loads (needs protobuf)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(model_file, Path(d) / "tokenizer.model")
        (Path(d) / "tokenizer_config.json").write_text(json.dumps(config))
        return AutoTokenizer.from_pretrained(d)


def mistral_v3_tokenizer() -> Any:
    path = fetch_package_file(*MISTRAL_PACKAGE, MISTRAL_SHA256, "Mistral v3 tokenizer")
    return _sentencepiece_tokenizer(
        path,
        {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": False,
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
        },
    )


YI_SPECIALS = [
    "<|reserved_3|>",
    "<|reserved_4|>",
    "<|reserved_5|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_sep|>",
]


def yi_standin_tokenizer() -> Any:
    """A small SentencePiece BPE with Yi's special tokens at Yi's ids (no package ships Yi's own).

    Ids 3-5 are placeholders: what Yi keeps there is not needed by its chat template.
    """
    import io

    import sentencepiece as spm

    lines: list[str] = []
    for f in sorted(bundled("sample_data").rglob("*.jsonl")):
        lines += [
            json.dumps(json.loads(x), ensure_ascii=False) for x in f.read_text("utf-8").splitlines() if x
        ]
    for conv in golden()["conversations"].values():
        lines += [m["content"] for m in conv["messages"]]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=1200,
        byte_fallback=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<|startoftext|>",
        eos_piece="<|endoftext|>",
        user_defined_symbols=YI_SPECIALS,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "tokenizer.model"
        model.write_bytes(buf.getvalue())
        # Yi-1.5-Chat's tokenizer_config: no automatic bos/eos, eos <|im_end|>, pad <unk>.
        return _sentencepiece_tokenizer(
            model,
            {
                "tokenizer_class": "LlamaTokenizer",
                "legacy": True,
                "add_bos_token": False,
                "add_eos_token": False,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<unk>",
                "unk_token": "<unk>",
            },
        )


# --- models --------------------------------------------------------------------------------------


def _save(
    folder: Path, config: Any, tok: Any, template_key: str, generation: dict[str, Any], tokenizer_class: str
) -> None:
    """Random tiny weights of the config's real class, bf16 like the hub's, plus tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Norm gains not all ones, so a swapped or dropped norm would change the outputs.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    GenerationConfig(**generation).save_pretrained(folder)
    tok.save_pretrained(folder)
    _hub_tokenizer_config(folder, template_key, tokenizer_class)


def _hub_tokenizer_config(folder: Path, template_key: str, tokenizer_class: str) -> None:
    """The template inside tokenizer_config.json and the hub's tokenizer class, as these repos ship them.

    transformers 5 saves a template to chat_template.jinja instead; the hub's files predate that.
    """
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for noise in ("is_local", "local_files_only", "backend"):
        cfg.pop(noise, None)
    cfg.update(tokenizer_class=tokenizer_class, chat_template=official_template(template_key))
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_llama3_1(folder: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128256,
        **TINY,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        tie_word_embeddings=False,
    )
    gen = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True}
    _save(
        folder,
        config,
        llama3_tokenizer(),
        "llama3_1",
        {**gen, "temperature": 0.6, "top_p": 0.9},
        "PreTrainedTokenizerFast",
    )


def build_mistral_v3(folder: Path) -> None:
    from transformers import MistralConfig

    config = MistralConfig(
        vocab_size=32768,
        **TINY,
        head_dim=16,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    _save(
        folder,
        config,
        mistral_v3_tokenizer(),
        "mistral_v3",
        {"bos_token_id": 1, "eos_token_id": 2},
        "LlamaTokenizer",
    )


def build_qwen2_5(folder: Path) -> None:
    from transformers import Qwen2Config

    # Qwen2's attention has q/k/v biases (Qwen2Attention builds them); the 0.5B/1.5B tie embeddings.
    config = Qwen2Config(
        vocab_size=151936,
        **TINY,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=True,
    )
    gen = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643]}
    _save(
        folder,
        config,
        qwen25_tokenizer(),
        "qwen2_5",
        {**gen, "do_sample": True, "temperature": 0.7},
        "Qwen2Tokenizer",
    )


def build_yi_1_5(folder: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=64000,
        **TINY,
        max_position_embeddings=4096,
        rope_theta=5000000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    # Yi-1.5-Chat's generation_config names <|endoftext|> (2) as eos while its turns end with <|im_end|> (7)
    # (from memory of the hub files: not checked offline; the stand-in keeps the trap either way).
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    _save(folder, config, yi_standin_tokenizer(), "yi_1_5", gen, "LlamaTokenizer")


def build_internlm2_5(folder: Path) -> None:
    """tiny-a as a user's download: hub layout, remote-code files, the official template already inside."""
    skip = ("reference.json", "reference.safetensors")  # the InternLM2 tests' references, not hub files
    shutil.copytree(
        INTERNLM2_TINY, folder, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in skip]
    )


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family(
            "llama3_1",
            ("llama3_1-8b-instruct-qlora",),
            "<|eot_id|>",
            "CI: tiny Llama-3.1 + real tokenizer",
            build_llama3_1,
            {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009, "<|end_of_text|>": 128001},
        ),
        Family(
            "mistral_v3",
            ("mistral-7b-instruct-qlora",),
            "</s>",
            "CI: tiny Mistral-v0.3 + real tokenizer",
            build_mistral_v3,
            {"<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4},
        ),
        Family(
            "qwen2_5",
            ("qwen2_5-0_5b-instruct-qlora", "qwen2_5-1_5b-instruct-qlora", "qwen2_5-7b-instruct-qlora"),
            "<|im_end|>",
            "CI: tiny Qwen2.5 + real BPE",
            build_qwen2_5,
            {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|file_sep|>": 151664},
        ),
        Family(
            "yi_1_5",
            ("yi-1_5-6b-chat-qlora",),
            "<|im_end|>",
            "CI: tiny Yi-1.5 + stand-in tokenizer",
            build_yi_1_5,
            {"<|startoftext|>": 1, "<|endoftext|>": 2, "<|im_start|>": 6, "<|im_end|>": 7, "<|im_sep|>": 8},
        ),
        Family(
            "internlm2_5",
            ("internlm2_5-7b-chat-qlora", "internlm2_5-7b-chat-qlora-oasst1", "internlm2-chat-1_8b-qlora"),
            "<|im_end|>",
            "CI: tiny InternLM2 checkpoint",
            build_internlm2_5,
            {"<s>": 1, "</s>": 2, "<|im_end|>": 1022, "<|im_start|>": 1023},
        ),
    )
}


def family_model(key: str) -> Path:
    """The family's hub-like tiny model folder, built on first use (staging folder, then a rename)."""
    family = FAMILIES[key]
    target = cache_dir() / "families" / f"{key}-tiny"
    done = target / ".complete"
    if done.is_file() and done.read_text() == BUILD:
        return target
    with staged_dir(target) as staging:
        family.build(staging)
        (staging / ".complete").write_text(BUILD)
    return target
