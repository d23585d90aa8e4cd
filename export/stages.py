"""One protocol for what an export reports while it runs: stage events.

Every long step announces itself as a `StageEvent` ("start", "advance" with units done,
"end" with its wall time) to the listeners of the current `Stages` bus. Progress bars,
timings, log lines and benchmarks are listeners; nothing else reports. The bus is held in a
context variable, so code that runs deep inside ExecuTorch (the backend's preprocess) emits
to the export that called it without a global list:

    bus = Stages(Timings(), my_listener)
    with bus.active():
        with stage("lower", total=2, unit="method") as s:
            ...; s.advance(1, "prefill: compiled")
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

START, ADVANCE, END, NOTE = "start", "advance", "end", "note"
# the stages every export goes through (ExportResult.seconds has one entry each, and "total")
LOAD, TORCH_EXPORT, LOWER, WRITE = "load_and_quantize", "torch_export", "lower", "write"


@dataclass(frozen=True)
class StageEvent:
    stage: str  # e.g. "load_and_quantize", "torch_export", "lower", "write"
    kind: str  # START, ADVANCE, END or NOTE (a line of text, `detail`)
    detail: str = ""  # what is happening now ("prefill: AOTInductor compile")
    n: int = 0  # ADVANCE: units just done
    total: int | None = None  # START: units the stage will take (None: unknown)
    unit: str = ""  # START: what a unit is ("method", "B", "unit")
    seconds: float | None = None  # END: wall time of the stage
    error: str = ""  # END: what the block raised, if it did


Listener = Callable[[StageEvent], None]


class Stages:
    """The listeners an export reports to."""

    def __init__(self, *listeners: Listener):
        self.listeners = list(listeners)

    def emit(self, event: StageEvent) -> None:
        for listener in list(self.listeners):
            listener(event)

    @contextlib.contextmanager
    def active(self) -> Iterator["Stages"]:
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


_CURRENT: contextvars.ContextVar[Stages] = contextvars.ContextVar("export_stages", default=Stages())


def current() -> Stages:
    return _CURRENT.get()


def emit(event: StageEvent) -> None:
    current().emit(event)


def note(stage_name: str, text: str) -> None:
    """A line for the user (e.g. "model ready: ...")."""
    emit(StageEvent(stage_name, NOTE, detail=text))


class StageHandle:
    def __init__(self, name: str):
        self.name = name

    def advance(self, n: int = 1, detail: str = "") -> None:
        emit(StageEvent(self.name, ADVANCE, detail=detail, n=n))

    def detail(self, text: str) -> None:
        emit(StageEvent(self.name, ADVANCE, detail=text, n=0))


@contextlib.contextmanager
def stage(name: str, total: int | None = None, unit: str = "") -> Iterator[StageHandle]:
    """Emit START, then END with the wall time (also when the block raises)."""
    emit(StageEvent(name, START, total=total, unit=unit))
    t0 = time.perf_counter()
    try:
        yield StageHandle(name)
    except BaseException as e:
        emit(StageEvent(name, END, seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"))
        raise
    emit(StageEvent(name, END, seconds=time.perf_counter() - t0))


# ---- listeners ---------------------------------------------------------------------------------

@dataclass
class Timings:
    """stage -> seconds (the last END of each stage)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, event: StageEvent) -> None:
        if event.kind == END and event.seconds is not None:
            self.seconds[event.stage] = event.seconds


class ProgressBars:
    """A tqdm bar per stage that announces a total; redrawn every second while it runs (its
    elapsed time moves during a minute-long compile). Notes go to `print_line`."""

    def __init__(self, print_line: Callable[[str], None] = print, every_s: float = 1.0):
        self.print_line, self.every_s = print_line, every_s
        self.bars: dict[str, tuple] = {}

    def __call__(self, event: StageEvent) -> None:
        if event.kind == NOTE:
            self.print_line(event.detail)
        elif event.kind == START and event.total is not None:
            self._open(event)
        elif event.stage in self.bars:
            bar = self.bars[event.stage][0]
            if event.kind == ADVANCE:
                bar.update(event.n)
                if event.detail:
                    bar.set_postfix_str(event.detail)
            elif event.kind == END:
                bar, stop, thread = self.bars.pop(event.stage)
                stop.set()
                thread.join()
                bar.close()

    def _open(self, event: StageEvent) -> None:
        from tqdm import tqdm

        kw = {"unit_scale": True} if event.unit == "B" else {}
        bar = tqdm(total=event.total, desc=event.stage.replace("_", " "), unit=event.unit or "it", **kw)
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.every_s):
                bar.refresh()

        thread = threading.Thread(target=tick, name="progress-tick", daemon=True)
        thread.start()
        self.bars[event.stage] = (bar, stop, thread)


class Heartbeat:
    """A line every `every_s` while a long stage runs, so a log shows where a many-minute
    lowering is: the stage, its elapsed time, its last detail ("prefill: AOTInductor
    compile") and, from `where(thread_id)`, what the thread that started the stage is
    inside right now (export/pipeline.py `lowering_phase`)."""

    def __init__(self, print_line: Callable[[str], None] = print, every_s: float = 60.0,
                 watch: tuple[str, ...] = (LOWER,), where: Callable[[int], str] | None = None):
        self.print_line, self.every_s, self.watch, self.where = print_line, every_s, watch, where
        self.running: dict[str, tuple[threading.Event, dict]] = {}

    def __call__(self, event: StageEvent) -> None:
        if event.stage not in self.watch:
            return
        if event.kind == START:
            state = {"t0": time.perf_counter(), "detail": event.detail, "thread": threading.get_ident()}
            stop = threading.Event()
            self.running[event.stage] = (stop, state)
            threading.Thread(target=self._beat, args=(event.stage, stop, state), name="heartbeat", daemon=True).start()
        elif event.stage in self.running:
            stop, state = self.running[event.stage]
            if event.detail:
                state["detail"] = event.detail
            if event.kind == END:
                stop.set()
                del self.running[event.stage]

    def line(self, stage_name: str, state: dict) -> str:
        minutes, seconds = divmod(int(time.perf_counter() - state["t0"]), 60)
        where = self.where(state["thread"]) if self.where else ""
        return (f"{stage_name}: {minutes}m{seconds:02d}s, {state['detail'] or 'running'}"
                + (f" ({where})" if where else ""))

    def _beat(self, stage_name: str, stop: threading.Event, state: dict) -> None:
        while not stop.wait(self.every_s):
            self.print_line(self.line(stage_name, state))
