"""What a long run tells its user while it works, on a terminal or not.

- Every stage says when it starts and when it ends, with its elapsed time (`stage`), or that its
  artifact was cached (`cached`): `Stage.get` does this for every stage object, so a run, a grid cell
  or an audit that walks stages gets one line per stage without saying anything itself.
- A loop that knows its length (`Steps`: training epochs, unlearning steps) shows a rich progress bar
  when stderr is a terminal, and otherwise (CI logs, nohup, notebooks: where a bar is a wall of
  carriage returns or nothing at all) a plain line at most every `interval` seconds, with the steps
  done and an estimate of the time left.

Lines go to the reporter of the current run (`reporting(log)`; the pipeline sets its own log, so a
grid's lines carry their cell id). Without a reporter, stage lines are dropped (library use stays
silent) and step lines go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Log = Callable[[str], None]

#: Seconds between two plain progress lines of a loop (off a terminal); 0 logs every step.
INTERVAL_ENV = "QUBENCH_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0

_reporter: ContextVar[Log | None] = ContextVar("qubench_progress_reporter", default=None)


@contextmanager
def reporting(log: Log) -> Iterator[None]:
    """Send the stage and step lines of everything run inside to `log`."""
    token = _reporter.set(log)
    try:
        yield
    finally:
        _reporter.reset(token)


def say(message: str) -> None:
    """One line to the current run's reporter (dropped when there is none)."""
    log = _reporter.get()
    if log is not None:
        log(message)


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min: as precise as a reader of a log needs."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@contextmanager
def stage(activity: str) -> Iterator[None]:
    """'activity ...' before the work and 'activity: done in 12.3 s' (or 'failed after') after it."""
    say(f"{activity} ...")
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        say(f"{activity}: failed after {duration(time.perf_counter() - started)}")
        raise
    say(f"{activity}: done in {duration(time.perf_counter() - started)}")


def cached(activity: str) -> None:
    say(f"{activity}: cached")


def stderr_is_terminal() -> bool:
    from rich.console import Console

    return Console(stderr=True).is_terminal


def interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return DEFAULT_INTERVAL if raw is None else max(0.0, float(raw))
    except ValueError:
        return DEFAULT_INTERVAL


class Steps:
    """Progress of a loop of `total` steps: a rich bar on a terminal, plain lines with an estimate of the
    time left elsewhere, nothing when not `enabled` (tests, `--json`, grid workers)."""

    def __init__(self, label: str, total: int, enabled: bool = True, *, transient: bool = False,
                 terminal: bool | None = None):
        self.label, self.total, self.enabled, self.transient = label, max(0, int(total)), enabled, transient
        self.terminal = stderr_is_terminal() if terminal is None else terminal
        self.done, self.info = 0, ""
        self._bar = self._task = None

    def __enter__(self) -> "Steps":
        self.started = self.last_line = time.perf_counter()
        if self.enabled and self.terminal:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            # On stderr: stdout stays clean for --json.
            self._bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=self.transient)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, info="")
        return self

    def advance(self, steps: int = 1, info: str = "") -> None:
        self.done += steps
        self.info = info
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, info=info)
        elif self.enabled and not self.terminal:
            now = time.perf_counter()
            if now - self.last_line >= interval() and self.done < self.total:
                self.last_line = now
                self._line(now)

    def _line(self, now: float) -> None:
        spent = now - self.started
        left = spent / self.done * (self.total - self.done) if self.done else None
        estimate = f", about {duration(left)} left" if left is not None else ""
        info = f", {self.info}" if self.info else ""
        message = f"  {self.label}: {self.done}/{self.total} steps in {duration(spent)}{estimate}{info}"
        log = _reporter.get()
        if log is not None:
            log(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
