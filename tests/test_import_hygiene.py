"""The core and `forge --help` must not pay for torch or textual."""

import subprocess
import sys

CHECK = """
import sys
import assistant_forge.core.config, assistant_forge.core.dataset, assistant_forge.core.runs
import assistant_forge.core.formats, assistant_forge.core.sources, assistant_forge.core.mixing
import assistant_forge.core.presets, assistant_forge.core.identity, assistant_forge.core.evaluate
import assistant_forge.core.chat, assistant_forge.core.merge, assistant_forge.core.pipeline, assistant_forge.core.models
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
