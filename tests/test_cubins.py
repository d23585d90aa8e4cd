"""export/cubins.py without a GPU: cubins compiled offline for sm_90 and stored
inside other bytes (as a `.so` embeds its kernels) are found whole, and cuobjdump's resource line of each
function is read: a kernel with a per-thread local array shows its stack."""

from __future__ import annotations

import os

import pytest
import triton
import triton.language as tl

from export.cubins import cubins, deep_stacks, kernel_resources

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="offline compiles need Triton's compiler, not its interpreter")


@triton.jit
def _double(x, y, B: tl.constexpr):
    o = tl.arange(0, B)
    tl.store(y + o, tl.load(x + o) * 2)


@triton.jit
def _spilled(x, y, B: tl.constexpr):
    """Each value stored at a place of a 2 KiB per-thread local array it picks, one word read back."""
    o = tl.arange(0, B)
    v = tl.inline_asm_elementwise("{ .local .align 4 .b8 buf[2048]; .reg .b32 a; and.b32 a, $1, 511; "
                                  "shl.b32 a, a, 2; mov.u32 $0, buf; add.u32 a, a, $0; st.local.u32 [a], $1; "
                                  "ld.local.u32 $0, [buf+4]; }", "=r,r", [tl.load(x + o)],
                                  dtype=tl.int32, is_pure=True, pack=1)
    tl.store(y + o, v)


def _compile(fn, sig: dict, consts: dict) -> bytes:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, consts),
                          target=GPUTarget("cuda", 90, 32)).asm["cubin"]


def test_embedded_cubins_are_found_whole_and_read():
    a = _compile(_double, {"x": "*fp32", "y": "*fp32"}, {"B": 128})
    b = _compile(_double, {"x": "*fp32", "y": "*fp32"}, {"B": 256})
    blob = b"\x7fELF" + b"host code " * 500 + a + b"\x00" * 333 + b + b"\x7fELF tail"
    found = cubins(blob)
    assert found == [a, b]
    rows = kernel_resources(found[0])
    assert len(rows) == 1 and "_double" in rows[0]["kernel"], rows
    assert rows[0]["reg"] > 0 and rows[0]["stack"] == 0 and rows[0]["local"] == 0, rows


def test_a_kernel_with_a_local_array_shows_it():
    rows = kernel_resources(_compile(_spilled, {"x": "*i32", "y": "*i32"}, {"B": 128}))
    assert len(rows) == 1 and rows[0]["stack"] >= 2048, rows


def test_a_host_elf_is_not_taken_for_a_cubin():
    host = open("/bin/true", "rb").read()
    assert cubins(b"x" + host) == []


def test_deep_stacks_names_the_kernels_over_the_context_default():
    deep = _compile(_spilled, {"x": "*i32", "y": "*i32"}, {"B": 128})
    shallow = _compile(_double, {"x": "*fp32", "y": "*fp32"}, {"B": 128})
    so = b"\x7fELF host" + shallow + b"\x00" * 16 + deep
    found = deep_stacks(so)
    assert [r["kernel"] for r in found] == [kernel_resources(deep)[0]["kernel"]], found
    assert found[0]["stack"] > 1024
    assert deep_stacks(so, limit=found[0]["stack"]) == []


def test_the_cuda_backend_notes_a_program_with_a_kernel_over_the_context_stack():
    """The export says which kernel will make the context reserve more device memory than the plan has."""
    from export import stages
    from export.backends.cuda import Gemma4CudaBackend

    deep = _compile(_spilled, {"x": "*i32", "y": "*i32"}, {"B": 128})
    shallow = _compile(_double, {"x": "*fp32", "y": "*fp32"}, {"B": 128})
    events = []
    with stages.Stages(events.append).active():
        Gemma4CudaBackend.check_compiled("prefill_layer4", b"\x7fELF host" + shallow)
        assert events == []
        Gemma4CudaBackend.check_compiled("prefill_layer4", b"\x7fELF host" + shallow + deep)
    notes = [e.detail for e in events if e.kind == stages.NOTE]
    name = kernel_resources(deep)[0]["kernel"]
    assert len(notes) == 1 and notes[0].startswith(f"prefill_layer4: kernel {name} needs "), notes
