"""The models forge knows about: adapters and merged folders made from runs, and the base of each.

`forge convert` and `forge merge` record the folders they write in the run's `exports.json`; folders
made before that record existed are found where forge puts them by default (`<run>/adapter`,
`<run>/merged`, and `forge demo`'s `OUT/adapter`, `OUT/merged` beside `OUT/run`). A folder counts
only while its forge_adapter.json still names the run (a later merge may have replaced it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from assistant_forge.core.fsutil import atomic_write_json

EXPORTS = "exports.json"  # in the run directory: {"adapter": [folders], "merged": [folders]}
KINDS = ("adapter", "merged")
DEFAULT_FOLDERS = ("adapter", "merged")  # the Export screen's and `forge demo`'s folder names


@dataclass(frozen=True)
class KnownModel:
    kind: str  # "merged", "adapter" or "base"
    model: str  # what load_chat_model takes: a folder, a hub id or "demo" (an adapter's base)
    adapter: str | None
    base: str  # the model it was tuned from (a base model: itself)
    run: Path | None
    mtime: float

    @property
    def label(self) -> str:
        if self.kind == "base":
            return f"base · {Path(self.model).name if Path(self.model).is_absolute() else self.model}"
        where = self.run.name if self.run else ""
        return f"{self.kind} · {where} · {Path(self.adapter or self.model).name}"


def record_export(run: Path, kind: str, folder: Path) -> None:
    """Note in the run directory that `folder` holds its adapter or merged model (written atomically)."""
    path = run / EXPORTS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    entry = str(Path(folder).expanduser().resolve())
    items = [p for p in data.get(kind, []) if p != entry] + [entry]
    atomic_write_json(path, {**data, kind: items})


def _meta(folder: Path) -> dict:
    from assistant_forge.core.chat import adapter_meta

    try:
        return adapter_meta(folder)
    except (OSError, ValueError):
        return {}


def _same(a: str | Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def base_spec(meta: dict) -> str | None:
    """The base model an adapter or merged folder came from, in a form load_chat_model takes."""
    spec, path = meta.get("base_model"), meta.get("base_model_path")
    if spec == "demo" or (spec and Path(spec).expanduser().is_dir()):
        return spec
    if path and Path(path).is_dir():
        return path
    return spec or None


def _candidates(run: Path) -> list[Path]:
    try:
        recorded = json.loads((run / EXPORTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    found = [Path(p) for kind in KINDS for p in recorded.get(kind, [])]
    found += [parent / name for parent in (run, run.parent) for name in DEFAULT_FOLDERS]
    return list(dict.fromkeys(f.resolve() for f in found))


def run_models(run: Path) -> list[KnownModel]:
    """The adapter and merged folders made from `run` that still exist, newest first."""
    run = run.resolve()
    out = []
    for folder in _candidates(run):
        meta = _meta(folder)
        if not meta or not _same(meta.get("run", ""), run):
            continue
        base = base_spec(meta) or "demo"
        mtime = (folder / "forge_adapter.json").stat().st_mtime
        if (folder / "adapter_config.json").is_file():
            out.append(KnownModel("adapter", base, str(folder), base, run, mtime))
        elif (folder / "config.json").is_file():
            out.append(KnownModel("merged", str(folder), None, base, run, mtime))
    return sorted(out, key=lambda m: m.mtime, reverse=True)


def known_models(extra_base: str | None = None) -> list[KnownModel]:
    """Merged folders and adapters of every run (newest first), then the base of each once
    (and `extra_base`, e.g. the config being edited, or the demo model when nothing else is known)."""
    from assistant_forge.core.runs import list_runs

    tuned = sorted((m for r in list_runs() for m in run_models(r.path)), key=lambda m: m.mtime, reverse=True)
    tuned = list({(m.model, m.adapter): m for m in tuned}.values())  # a run linked twice counts once
    bases = list(dict.fromkeys([*(m.base for m in tuned), *([extra_base] if extra_base else [])]))
    return tuned + [KnownModel("base", b, None, b, None, 0.0) for b in bases or ["demo"]]


def default_model(models: list[KnownModel], run: Path | None) -> KnownModel:
    """The newest merged model of the watched run, else its newest adapter, else the newest merged
    model of any run, else the first listed."""
    watched = run.resolve() if run else None
    for want in (
        lambda m: m.run == watched and m.kind == "merged",
        lambda m: m.run == watched and m.kind == "adapter",
        lambda m: m.kind == "merged",
    ):
        if found := next((m for m in models if want(m)), None):
            return found
    return models[0]


def base_for(model: str, adapter: str | None) -> str | None:
    """The base to compare a tuned model with: what the adapter or merged folder records, or the
    adapter_config.json's base_model_name_or_path; None for a model forge knows nothing about."""
    folder = Path(adapter or model).expanduser()
    if not folder.is_dir():
        return None
    if spec := base_spec(_meta(folder)):
        return spec
    if adapter:
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cfg.get("base_model_name_or_path") or None
    return None
