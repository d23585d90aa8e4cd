"""Peak memory of a run, reported honestly.

`torch.cuda.max_memory_allocated` only sees the caching allocator; the AOTI container
allocates its own constant blob and cuBLAS/Triton workspaces outside it. So on CUDA a
background thread also samples NVML (when pynvml is importable): the device's used memory
(which also counts what the driver reserves and any other process) and this process's own
(what a card must hold for this run: context, allocator, everything outside it); the summary
shows them. On CPU the figure is the process's peak RSS.
"""

from __future__ import annotations

import os
import resource
import threading
from dataclasses import dataclass

import torch

GiB = 1024**3


@dataclass
class MemoryPeak:
    device: str
    allocator_bytes: int = 0  # torch caching allocator peak (CUDA)
    reserved_bytes: int = 0  # the allocator's reserved peak: allocated plus the blocks it keeps cached
    nvml_bytes: int | None = None  # device memory used, sampled (CUDA, needs pynvml)
    nvml_process_bytes: int | None = None  # this process's device memory per NVML, sampled
    host_rss_bytes: int = 0  # process peak resident set

    def describe(self) -> str:
        if self.device.startswith("cuda"):
            nvml = "n/a" if self.nvml_bytes is None else f"{self.nvml_bytes / GiB:.2f} GiB"
            mine = "" if self.nvml_process_bytes is None else f" / {self.nvml_process_bytes / GiB:.2f} GiB this process"
            return f"GPU peak {self.allocator_bytes / GiB:.2f} GiB allocator / {nvml} device (NVML){mine}"
        return f"GPU peak n/a (cpu run; host peak RSS {self.host_rss_bytes / GiB:.2f} GiB)"


class PeakSampler:
    """Context manager: samples NVML used memory every `period_s` while active."""

    def __init__(self, device: str, period_s: float = 0.02):
        self.device = device
        self.period_s = period_s
        self.peak = MemoryPeak(device)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = _nvml_handle(device)

    def __enter__(self) -> "PeakSampler":
        if self.device.startswith("cuda"):
            torch.cuda.init()  # resetting the stats of a device not yet initialised is an error
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._handle is not None:
            self._thread = threading.Thread(target=self._sample_loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.snapshot()

    def snapshot(self) -> MemoryPeak:
        """The peaks so far (also while sampling: a chat's summary after each reply), into `peak`."""
        self._sample_once()
        if self.device.startswith("cuda"):
            self.peak.allocator_bytes = torch.cuda.max_memory_allocated(self.device)
            self.peak.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        self.peak.host_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.peak

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample_once()

    def _sample_once(self) -> None:
        if self._handle is None:
            return
        import pynvml

        used = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
        self.peak.nvml_bytes = max(self.peak.nvml_bytes or 0, used)
        try:
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # not supported here: the device figure only
            return
        # absent when the process is not listed yet or NVML sees another pid namespace
        mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory is not None]
        if mine:
            self.peak.nvml_process_bytes = max(self.peak.nvml_process_bytes or 0, mine[0])


def _nvml_handle(device: str):
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.device(device).index or 0
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # pynvml absent or no driver access: report the allocator figure only
        return None
