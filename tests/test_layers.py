"""The import direction of the layers: the generic pipeline (export/ outside export/gemma4/)
never imports the Gemma 4 wing, and the runtime never imports export/ at all (it depends on
the artifact alone). Every import counts, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute module names `path` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def offenders(files, forbidden: str) -> dict[str, list[str]]:
    bad = {}
    for f in files:
        hits = sorted(m for m in imports(f) if m == forbidden or m.startswith(forbidden + "."))
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    return bad


def test_generic_export_modules_never_import_the_gemma4_wing():
    generic = [f for f in (ROOT / "export").rglob("*.py") if "gemma4" not in f.relative_to(ROOT / "export").parts]
    assert len(generic) > 10  # the pipeline, constants, artifact, backends, passes, kernels, ...
    assert offenders(generic, "export.gemma4") == {}


def test_runtime_never_imports_export():
    files = list((ROOT / "runtime").rglob("*.py"))
    assert files
    assert offenders(files, "export") == {}


def test_the_check_sees_relative_and_local_imports(tmp_path):
    """The parser itself: a function-local import and a relative one are both found."""
    probe = tmp_path / "export" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("def f():\n    from export.gemma4 import model\nfrom .gemma4 import config\n")
    assert {"export.gemma4.model", "export.gemma4.config"} <= imports(probe, root=tmp_path)
