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


def main() -> None:
    out_path, period, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m scripts.stack_sample OUT.txt PERIOD_S -m MODULE [ARGS...]")
    out = open(out_path, "w")
    threading.Thread(target=sample_forever, args=(out, float(period), threading.get_ident()), daemon=True).start()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
