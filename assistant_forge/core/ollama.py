"""An Ollama `Modelfile` for an exported GGUF: FROM, TEMPLATE, stop tokens and SYSTEM.

The TEMPLATE is not chosen from a list of known formats: it is read off the model's own chat
template. Rendering a conversation whose texts are markers shows the literal text the template puts
before the system prompt, between system and user, after a user turn and after an answer; these
pieces make a Go template of one fixed shape. Before it is written, the same pieces rebuild the
probe conversations in Python and must equal the Jinja rendering byte for byte (less the BOS that
llama.cpp adds itself); a template of another shape (Mistral's system prompt inside the last user
turn) gets a template without a system prompt, or a refusal.

SYSTEM is the prompt the model was trained under: the run's `data.system_prompt`, else the model's
default (what its template writes when a conversation has none). A different prompt, even one naming
the assistant, can change what a small model answers to "Who are you?" (measured on the demo model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assistant_forge.core.fsutil import atomic_write_text
from assistant_forge.errors import ForgeError

if TYPE_CHECKING:  # gguf and numpy load only when a file is written
    from assistant_forge.core.gguf_export import ExportResult, Progress

_MARK = "\ue000{}\ue000"
_SPLIT = re.compile("\ue000([A-Z0-9]+)\ue000")


@dataclass(frozen=True)
class Pieces:
    """A chat format as literal text around the system prompt, user turns and answers."""

    head: str  # before the system prompt (or before the first user turn when `system` is False)
    after_system: str
    after_user: str  # also the generation prompt
    answer_head: str  # before an answer's text, after the generation prompt (Mistral's space)
    after_answer: str
    system: bool  # whether the format has a system prompt at all

    def render(self, messages: list[dict], system: str | None) -> str:
        """What the Go template below renders (Ollama's `.System` and `.Messages`)."""
        out = self.head + (f"{system}{self.after_system}" if self.system else "")
        for m in messages:
            if m["role"] == "user":
                out += m["content"] + self.after_user
            else:
                out += self.answer_head + m["content"] + self.after_answer
        return out

    def go_template(self) -> str:
        system = f"{{{{ .System }}}}{_go(self.after_system)}" if self.system else ""
        return (
            f"{_go(self.head)}{system}{{{{ range .Messages }}}}"
            f'{{{{ if eq .Role "user" }}}}{{{{ .Content }}}}{_go(self.after_user)}'
            f'{{{{ else if eq .Role "assistant" }}}}{_go(self.answer_head)}{{{{ .Content }}}}{_go(self.after_answer)}'
            "{{ end }}{{ end }}"
        )


def _go(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs quoting."""
    return text.replace("{{", '{{ "{{" }}')


def _render(tok: Any, messages: list[dict]) -> str:
    from assistant_forge.core.templates import render

    text = render(tok, messages, add_generation_prompt=True)
    bos = tok.bos_token
    adds_bos = bos and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    return text[len(bos) :] if adds_bos and text.startswith(bos) else text


def _conversations(system: str | None) -> list[list[dict]]:
    sys_ = [{"role": "system", "content": system}] if system is not None else []
    return [
        [*sys_, {"role": "user", "content": "Who are you?"}],
        [
            *sys_,
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    ]


def _pieces(tok: Any, with_system: bool) -> Pieces | None:
    msgs = [
        {"role": "user", "content": _MARK.format("U1")},
        {"role": "assistant", "content": _MARK.format("A1")},
        {"role": "user", "content": _MARK.format("U2")},
    ]
    if with_system:
        msgs.insert(0, {"role": "system", "content": _MARK.format("S")})
    parts = _SPLIT.split(_render(tok, msgs))
    order = parts[1::2]
    if order != (["S"] if with_system else []) + ["U1", "A1", "U2"]:
        return None
    text = parts[0::2]
    head, rest = text[0], text[1:]
    after_system = rest.pop(0) if with_system else ""
    before_answer, after_answer, generation = rest
    if not before_answer.startswith(generation):  # the generation prompt also ends each user turn
        return None
    return Pieces(head, after_system, generation, before_answer[len(generation) :], after_answer, with_system)


def default_system(tok: Any, pieces: Pieces) -> str | None:
    """The system prompt the template writes when a conversation brings none."""
    if not pieces.system:
        return None
    text = _render(tok, [{"role": "user", "content": _MARK.format("U1")}])
    before = text.split(_MARK.format("U1"))[0]
    if before.startswith(pieces.head) and before.endswith(pieces.after_system):
        return before[len(pieces.head) : len(before) - len(pieces.after_system)]
    return None


def chat_pieces(tok: Any) -> Pieces:
    """The model's chat format as Pieces, checked against its own template; or a one-line refusal."""
    probe = "You are a concise assistant."
    for with_system in (True, False):
        p = _pieces(tok, with_system)
        if p is None:
            continue
        checks = [(c, probe if with_system else None) for c in _conversations(probe if with_system else None)]
        default = default_system(tok, p)
        if with_system and default is not None:
            checks += [(c, default) for c in _conversations(None)]
        if all(p.render([m for m in c if m["role"] != "system"], s) == _render(tok, c) for c, s in checks):
            return p
    raise ForgeError(
        "forge cannot write an Ollama TEMPLATE that renders this model's chat template exactly; "
        "export without --ollama and write the Modelfile by hand."
    )


def stop_texts(tok: Any, generation_eos: Any = None) -> list[str]:
    from assistant_forge.core.encoding import stop_token_ids

    return [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok, generation_eos)]


def modelfile_text(gguf_name: str, tok: Any, system: str | None, generation_eos: Any = None) -> str:
    pieces = chat_pieces(tok)
    if system is None:
        system = default_system(tok, pieces)
    lines = [
        "# Written by `forge export gguf --ollama`.",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{pieces.go_template()}"""',
    ]
    lines += [f'PARAMETER stop "{s}"' for s in stop_texts(tok, generation_eos)]
    if pieces.system and system:
        lines.append(
            "# The system prompt the model was trained under (changing it can change who it says it is)."
        )
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def trained_system_prompt(merged: Path) -> str | None:
    """The run's data.system_prompt, found through the merged folder's forge_adapter.json."""
    from assistant_forge.core.chat import adapter_meta

    meta = adapter_meta(merged)
    return meta.get("system_prompt") or None


def modelfile_for(merged: str | Path, gguf_path: str | Path, force: bool = False) -> tuple[Path, str]:
    """Where the Modelfile goes (beside the GGUF) and its text; refuses before anything is written."""
    import json

    from transformers import AutoTokenizer

    merged, gguf_path = Path(merged).expanduser(), Path(gguf_path).expanduser()
    out = gguf_path.parent / "Modelfile"
    if out.exists() and not force:
        raise ForgeError(f"{out} already exists; pass --force to replace it.")
    tok = AutoTokenizer.from_pretrained(merged)
    if not getattr(tok, "chat_template", None):
        raise ForgeError(f"{merged} has no chat template, so forge cannot write an Ollama TEMPLATE.")
    gen = merged / "generation_config.json"
    eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.is_file() else None
    return out, modelfile_text(gguf_path.name, tok, trained_system_prompt(merged), eos)


def write_modelfile(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    path.chmod(0o644)  # Ollama's server often runs as its own user
    return path


def ollama_name(gguf_path: str | Path) -> str:
    """A model name for `ollama create`: the file's stem in lower case, safe characters only."""
    return re.sub(r"[^a-z0-9._-]+", "-", Path(gguf_path).stem.lower()).strip("-") or "assistant"


def create_command(modelfile: Path, gguf_path: Path) -> str:
    return f"cd {modelfile.parent} && ollama create {ollama_name(gguf_path)} -f {modelfile.name}"


@dataclass(frozen=True)
class GgufExport:
    gguf: ExportResult
    modelfile: Path | None

    def lines(self) -> list[str]:
        """What to tell the user: the file written and, with a Modelfile, the `ollama create` line."""
        r = self.gguf
        out = [
            f"wrote {r.path} ({r.quant}, {r.bytes / 2**20:.1f} MiB, {r.tensors} tensors, {r.seconds:.1f} s)"
        ]
        if self.modelfile:
            out += [
                f"wrote {self.modelfile}; add it to Ollama with:",
                f"  {create_command(self.modelfile, r.path)}",
            ]
        return out


def export_gguf_for(
    merged: str | Path,
    out: str | Path,
    quant: str = "f16",
    ollama: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> GgufExport:
    """`forge export gguf` (and the Export screen): every refusal comes before anything is written."""
    from assistant_forge.core.gguf_export import check_quant, check_source, export_gguf

    check_quant(quant)
    check_source(Path(merged).expanduser())
    modelfile = modelfile_for(merged, out, force=force) if ollama else None
    r = export_gguf(merged, out, quant=quant, force=force, progress=progress)
    return GgufExport(r, write_modelfile(*modelfile) if modelfile else None)
