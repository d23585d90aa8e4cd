"""Run a module while a thread samples its main thread's stack: where do the minutes go?

    python -m scripts.stack_sample OUT.txt PERIOD_S -m export.gemma4 --preset 31b ...

Every PERIOD_S seconds one line is appended to OUT.txt (flushed, so a run killed by a
timeout keeps its samples): elapsed seconds, the innermost frames of the main thread, and
the innermost frames in this repository, then the whole stack indented
(`grep -v '^ '` keeps the one-line summaries). A Python thread reading `sys._current_frames()`
(faulthandler's timed dumps crashed Python 3.12 inside dynamo's frame hooks).
"""

from __future__ import annotations

import runpy
import sys
import threading
import time
import traceback


def _short(frame: traceback.FrameSummary) -> str:
    path = frame.filename.split("site-packages/")[-1].split("/work/main/")[-1]
    return f"{path}:{frame.lineno} {frame.name}"


def sample_forever(out, period: float, main_id: int) -> None:
    t0 = time.perf_counter()
    while True:
        time.sleep(period)
        frame = sys._current_frames().get(main_id)
        if frame is None:
            return
        stack = traceback.extract_stack(frame)[::-1]  # innermost first
        ours = [f for f in stack if "site-packages" not in f.filename and "<frozen" not in f.filename
                and "stack_sample" not in f.filename]
        out.write(f"{time.perf_counter() - t0:7.1f} s | {' < '.join(_short(f) for f in stack[:4])}"
                  f" || {' < '.join(_short(f) for f in ours[:2])}\n")
        out.write("".join(f"          {_short(f)}\n" for f in stack))  # the whole stack, indented
        out.flush()


USAGE = "usage: python -m scripts.stack_sample OUT.txt PERIOD_S -m MODULE [ARGS...]"


def _refuse(msg: str) -> None:
    """Bad arguments: the message on stderr, exit status 2 (as argparse's)."""
    print(msg, file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    if len(args) < 4 or args[2] != "-m":
        _refuse(f"{USAGE}\n(got {' '.join(args) or 'no arguments'}; --help explains)")
    out_path, period, _, module, *rest = args
    try:
        period_s = float(period)
    except ValueError:
        period_s = -1.0
    if not period_s > 0:
        _refuse(f"{USAGE}\nPERIOD_S: a number of seconds > 0, got {period!r}")
    try:
        out = open(out_path, "w")
    except OSError as e:
        _refuse(f"OUT.txt {out_path!r}: cannot be written ({e.strerror})")
    threading.Thread(target=sample_forever, args=(out, period_s, threading.get_ident()), daemon=True).start()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
