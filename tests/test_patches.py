"""The patch register (export/patches.py): every registered target exists on the pinned
stack, a patch holds only inside its block, and another stack is refused with a clear
message before anything is replaced."""

from __future__ import annotations

import pytest

from export import patches


def test_every_registered_target_exists_on_the_pinned_stack():
    for name, entry in patches.PATCHES.items():
        owner, attr = patches._owner(entry.target)
        assert hasattr(owner, attr), entry.target
        assert entry.reason and entry.lib in patches.PINNED


def test_a_patch_holds_inside_its_block_only():
    from torch._inductor import codecache

    original = codecache.convert_cubin_to_obj
    with patches.patched("convert_cubin_to_obj", lambda orig: lambda *a: ("patched", orig)):
        assert codecache.convert_cubin_to_obj()[0] == "patched"
    assert codecache.convert_cubin_to_obj is original


def test_a_classmethod_stays_a_classmethod_and_is_restored():
    from torch._inductor.codecache import AotCodeCompiler

    original = AotCodeCompiler.__dict__["compile"]
    with patches.patched("AotCodeCompiler.compile", lambda orig: lambda cls, *a, **k: cls):
        assert AotCodeCompiler.compile() is AotCodeCompiler
    assert AotCodeCompiler.__dict__["compile"] is original


def test_another_stack_is_refused_before_patching(monkeypatch):
    from torch._inductor import codecache

    original = codecache.convert_cubin_to_obj
    monkeypatch.setattr(patches, "installed_version", lambda lib: "2.12.0" if lib == "torch" else "1.2.0")
    with pytest.raises(patches.StackMismatch, match=r"torch 2\.12\.0 is installed.*torch 2\.11\.0"):
        with patches.patched("convert_cubin_to_obj", lambda orig: None):
            pass
    assert codecache.convert_cubin_to_obj is original
