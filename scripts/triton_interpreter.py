"""Triton's interpreter on the CPU, for the tests and smoke runs that run kernels in a subprocess:
import this before any kernel module. It sets TRITON_INTERPRET=1 (read when a kernel is decorated)
and gives the interpreter's tensors `__index__`, which numpy >= 2.4 needs (it refuses int() of a
1-element array, and the interpreter's scalars are such arrays)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import triton.runtime.interpreter as _ti  # noqa: E402

_orig = _ti._patch_lang_tensor


def _patched(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


_ti._patch_lang_tensor = _patched
