"""What every command-line entry point of export/ and scripts/ shares: bad input ends in one
short line (naming the flag or file and what to do) and exit code 2, never a traceback;
torch-internal warnings a user cannot act on stay quiet.

`--debug` anywhere on the command line lets the traceback through instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from collections.abc import Callable

from runtime.cli_types import non_negative_int, positive_int  # noqa: F401  (re-exported for export's CLIs)

# Raised for bad input (files, configs, flags); anything else is a bug and says so.
BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, IsADirectoryError,
                                               NotADirectoryError, PermissionError)

# Deprecations inside torch / ExecuTorch that fire during export; nothing in a user's hands.
_INTERNAL_WARNINGS = (
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)"),
    (FutureWarning, r"guard_size_oblivious will be removed"),
)


def quiet_internal_warnings() -> None:
    """Silence the torch-internal warnings above (by message) and torch's CUDA-probe log line."""
    for category, message in _INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
        prog: str = "error") -> int:
    """Call `main(argv)`; bad input becomes 'prog: error: message' and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        return main([a for a in args if a != "--debug"]) or 0
    except BAD_INPUT as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, the traceback on request
        if debug:
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


# ---- argparse types: a bad value is refused at parse time, naming the flag ----------------
# positive_int and non_negative_int are the runtime's (re-exported here for export's CLIs)

def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
