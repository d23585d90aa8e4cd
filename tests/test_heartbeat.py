"""The lowering heartbeat (export/stages.py `Heartbeat`): while a watched stage runs, a line
per period names the stage, its elapsed time, its last detail and the phase the stage's
thread is in (export/pipeline.py `lowering_phase`); nothing after the stage ends."""

from __future__ import annotations

import threading
import time

from export import stages
from export.pipeline import lowering_phase


def aot_compile(seconds: float) -> None:  # named like Inductor's entry point: a known phase
    time.sleep(seconds)


def test_lines_name_stage_detail_and_phase_then_stop():
    lines: list[str] = []
    beat = stages.Heartbeat(lines.append, every_s=0.05, where=lowering_phase)
    with stages.Stages(beat).active():
        with stages.stage(stages.LOWER, total=2, unit="method") as s:
            s.detail("prefill: AOTInductor compile")
            aot_compile(0.3)
        n = len(lines)
        time.sleep(0.2)
    assert n >= 2 and len(lines) == n  # beats while running, silence after
    assert all(line.startswith("lower: 0m00s, prefill: AOTInductor compile") for line in lines), lines
    assert "(Inductor)" in lines[-1]


def test_phase_is_the_innermost_known_function():
    found: list[str] = []
    main = threading.get_ident()
    done = threading.Event()

    def probe():
        time.sleep(0.05)
        found.append(lowering_phase(main))
        done.set()

    def run_pipeline():  # our passes, called inside Inductor's entry point: the inner one wins
        threading.Thread(target=probe).start()
        done.wait(2)

    def aot_compile():  # noqa: F811  (Inductor's entry point, around our passes here)
        run_pipeline()

    aot_compile()
    assert found == ["our graph passes"]
    assert lowering_phase(-1) == ""  # no such thread
