"""Inductor's compile worker pool, started early so AOTI compiles run in parallel.

Inductor compiles kernels in a pool of worker processes only once that pool is *ready*:
the first kernel it meets submits a readiness probe and compiles in-process, and so does
every kernel until the workers (each importing torch and Triton) answer. An AOTI compile
with the cpp wrapper defines all its Triton kernels back to back in one generated script
(`triton.autotune_at_compile_time`), well inside that window, so on the GPU machine every
kernel of the 31B slice's prefill compiled serially in the main process: ~200 s of its
335 s lowering. The pool also quiesces after 60 s idle, between the two methods.

`start()` creates the pool and submits the probe at the beginning of an export (the
workers start while the model loads and traces); `wait_ready()` blocks, bounded, before
lowering. Quiescing is turned off for this process.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


def start() -> bool:
    """Start the worker pool now; False if Inductor compiles in-process (one compile thread)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.async_compile import AsyncCompile, get_compile_threads

    if get_compile_threads() <= 1:
        return False
    inductor_config.quiesce_async_compile_pool = False  # read when the pool is created
    AsyncCompile.warm_pool()
    AsyncCompile.use_process_pool()  # submits the readiness probe: the workers start importing now
    return True


def wait_ready(timeout_s: float = 90.0) -> float | None:
    """Block until the pool answers; seconds waited, or None if there is no pool or it did
    not answer in time (compiles then start in-process, as without this module)."""
    from torch._inductor.async_compile import AsyncCompile, get_compile_threads

    if get_compile_threads() <= 1:
        return None
    t0 = time.perf_counter()
    try:
        AsyncCompile.wait_pool_ready(timeout=timeout_s)
    except Exception as e:  # a pool that cannot start must not fail the export
        log.warning("Inductor compile workers not ready after %.0f s (%s); compiling in-process", timeout_s, e)
        return None
    return time.perf_counter() - t0


# ---- the host's vector ISA, probed while the model loads -----------------------------------
#
# Inductor picks the C++ wrapper's vector ISA (`cpu_vec_isa.pick_vec_isa`, also on CUDA: the
# wrapper is built with its flags) by compiling a probe per candidate ISA and loading each
# in a fresh Python that imports torch: seconds per candidate, once per process (38 s on the
# H200 machine), serially inside the first method's compile. The probe's answer depends only
# on the host, so it runs on a thread from the start of the export (its subprocesses wait
# outside the GIL) and lowering joins it; the ISA Inductor picks is the same.

_isa_probe: threading.Thread | None = None


def start_isa_probe() -> None:
    global _isa_probe
    from torch._inductor import cpu_vec_isa

    if _isa_probe is None:
        _isa_probe = threading.Thread(target=cpu_vec_isa.valid_vec_isa_list, name="inductor-isa-probe", daemon=True)
        _isa_probe.start()


def wait_isa_probe() -> float | None:
    """Join the probe (its result is cached for the process); seconds waited, None if none ran."""
    if _isa_probe is None:
        return None
    t0 = time.perf_counter()
    _isa_probe.join()
    return time.perf_counter() - t0
