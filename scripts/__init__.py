"""Benchmarks, variant sweeps and GPU-machine helpers, each run as `python -m scripts.NAME` (scripts/README.md)."""

import sys


def needs_cuda(name: str, instead: str = "") -> bool:
    """True where a CUDA GPU is visible; else says on stderr that `name` needs one (and what runs `instead`), and
    the caller exits 2."""
    import torch

    if torch.cuda.is_available():
        return True
    print(f"{name}: needs a CUDA GPU (it times kernels){'; ' + instead if instead else ''}", file=sys.stderr)
    return False
