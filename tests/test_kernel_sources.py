"""The op families' Triton kernels as AOTInductor copies them into the generated module: for a kernel
launched through `wrap_triton` it splices in the source of every jit function the kernel calls (found by
name in the kernel's globals), and that source defines the function under its own name. A jit function
imported under another name (`from m import f as _f`) is then undefined in the artifact's compile
("NameError: _f is not defined", on the GPU only). Checked here without a GPU: every name a kernel (or a
function it calls) loads that is a jit function is that function's own name."""

from __future__ import annotations

import importlib

import pytest
from triton.runtime.jit import JITFunction

MODULES = ("export.kernels.int4_matmul", "export.kernels.attention", "export.kernels.hadamard",
           "export.kernels.moe_int4", "export.kernels.pdl")


def _jit_functions(module) -> list[tuple[str, JITFunction]]:
    return [(name, obj) for name, obj in vars(module).items() if isinstance(obj, JITFunction)]


def aliased_calls(kernels) -> list[str]:
    """'<caller> calls <function> as <name>' for every jit function reached under another name."""
    seen, bad = set(), []

    def walk(fn: JITFunction) -> None:
        if id(fn) in seen:
            return
        seen.add(id(fn))
        for name in fn.fn.__code__.co_names:
            dep = fn.fn.__globals__.get(name)
            if isinstance(dep, JITFunction):
                if dep.fn.__name__ != name:
                    bad.append(f"{fn.fn.__name__} calls {dep.fn.__name__} as {name}")
                walk(dep)

    for fn in kernels:
        walk(fn)
    return bad


@pytest.mark.parametrize("module_name", MODULES)
def test_kernels_call_jit_functions_by_their_own_names(module_name):
    kernels = [fn for _, fn in _jit_functions(importlib.import_module(module_name))]
    assert kernels
    assert not aliased_calls(kernels)


def test_the_check_sees_an_alias(tmp_path, monkeypatch):
    """A kernel calling `pdl_wait` imported as `_pdl_wait` is reported."""
    (tmp_path / "aliased_kernel.py").write_text(
        "import triton\nimport triton.language as tl\n"
        "from export.kernels.pdl import pdl_wait as _pdl_wait\n\n\n"
        "@triton.jit\ndef k(PDL: tl.constexpr):\n    _pdl_wait(PDL, True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("aliased_kernel")
    assert aliased_calls([module.k]) == ["k calls pdl_wait as _pdl_wait"]
