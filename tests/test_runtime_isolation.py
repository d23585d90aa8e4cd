"""runtime/ depends on the artifact alone: never on export/, the model, ExecuTorch or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
FORBIDDEN = ("export", "executorch", "transformers", "tests")


def test_importing_runtime_loads_no_exporter_code():
    code = (
        "import sys, runtime, runtime.runner, runtime.artifact, runtime.tokenizer, runtime.__main__\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=RUNTIME.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"runtime imported {out.stdout.strip()}"


def test_no_runtime_module_names_the_exporter():
    """Catches lazy imports inside functions, which the subprocess check cannot see."""
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
