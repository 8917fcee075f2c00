"""Import rules: which layer may import which, and what the core and `forge --help` must not pay for.

Layers: `core` is headless and imports neither `training` nor `tui`; the thin `tui` drives
core and never imports `training` (training runs in its own process); `bench/` holds measuring scripts
that nothing in the package or the tests imports. The rules are checked on the source (ast), so an
import inside a function, or through importlib with a literal name, counts as much as one at the top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "assistant_forge"
# A bench script is imported by its file name once bench/ is on sys.path, so those names count too.
BENCH_NAMES = {"bench"} | {p.stem for p in (ROOT / "bench").glob("*.py")}
# (files under this folder, what they must not import)
FORBIDDEN = [
    ("assistant_forge/core", (f"{PKG}.training", f"{PKG}.tui")),
    ("assistant_forge/tui", (f"{PKG}.training",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file `module`, wherever it stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports pkg.mod when mod is a module; count both names.
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _broken_rule(rel: str, name: str) -> str | None:
    if name.split(".")[0] in BENCH_NAMES:
        return "bench/ holds scripts that nothing imports"
    for folder, banned in FORBIDDEN:
        if rel.startswith(folder + "/") and any(_under(name, prefix) for prefix in banned):
            return f"{folder.rpartition('/')[2]} must not import {', '.join(banned)}"
    return None


def layering_violations() -> list[str]:
    bad = {}
    for path in sorted([*(ROOT / PKG).rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for line, name in imported_modules(path, module_name(path)):
            rule = _broken_rule(rel, name)
            if rule:
                bad.setdefault(f"{rel}:{line}", f"{rel}:{line} imports {name}: {rule}")
    return list(bad.values())


def test_layers_import_only_downwards() -> None:
    bad = layering_violations()
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_layering_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The checker itself: a relative import, one inside a function and one through importlib."""
    src = tmp_path / "mod.py"
    src.write_text(
        "import os\n"
        "from ..training import speed\n"
        "def f():\n"
        "    from assistant_forge.training.modeling import pick_device\n"
        "    importlib.import_module('gpu_train')\n"
    )
    names = {n for _, n in imported_modules(src, "assistant_forge.core.mod")}
    assert {"os", "assistant_forge.training.speed", "assistant_forge.training.modeling", "gpu_train"} <= names


CHECK = """
import sys
import assistant_forge.core.config, assistant_forge.core.dataset, assistant_forge.core.runs
import assistant_forge.core.formats, assistant_forge.core.sources, assistant_forge.core.mixing
import assistant_forge.core.presets, assistant_forge.core.identity, assistant_forge.core.evaluate
import assistant_forge.core.chat, assistant_forge.core.merge, assistant_forge.core.pipeline, assistant_forge.core.models
import assistant_forge.core.hardware, assistant_forge.core.run_state, assistant_forge.core.tail
import assistant_forge.core.known_models, assistant_forge.core.ollama, assistant_forge.core.gguf_export
import assistant_forge.cli
# datasets (0.7 s, pyarrow) too: the data modules import it inside functions.
bad = [m for m in ("torch", "textual", "transformers", "datasets") if m in sys.modules]
print(bad)
sys.exit(1 if bad else 0)
"""


def test_core_and_cli_import_neither_torch_nor_textual():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_forge_help_does_not_import_torch():
    code = "import sys; from assistant_forge.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().endswith("False"), proc.stdout + proc.stderr
