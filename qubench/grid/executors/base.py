"""What every executor shares: the unit of work (a group of cells), how a worker runs it, outcomes.

A worker runs a group's cells through `pipeline.run` one after the other. A failing cell is
recorded (pipeline.run writes the failed result with its traceback) and the next one runs. When
the failure is in a stage every cell of the group shares (task/models preparation, unlearning),
the remaining cells would fail the same way, so they are recorded as failed with that error
instead of repeating the work; a later `qubench grid` retries them all.
"""

from __future__ import annotations

import os
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from qubench import pipeline, results
from qubench.specs import RunSpec
from qubench.stages import step_is_group_shared


@dataclass
class CellOutcome:
    cell_id: str
    status: Literal["ok", "failed"]
    result_file: str
    seconds: float = 0.0
    reused: bool = False                 # a stored ok result: nothing was run
    error: dict | None = None            # stage, type, message

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GroupJob:
    """A group of cells as plain data, so it pickles into a worker process or a Ray task."""

    group_id: str
    cells: list[tuple[str, dict, str]]   # (cell id, RunSpec as JSON, result file)
    results_dir: str                     # the cells/ folder results are written to
    home: str | None = None              # QUBENCH_HOME for the worker
    threads: int | None = None           # torch threads in a worker process
    verbose: bool = True
    device: str = "auto"                 # the --device choice, resolved in the worker (qubench.device)
    visible_gpus: str | None = None      # CUDA_VISIBLE_DEVICES of a worker process given its own GPUs
    no_rebuild: bool = False             # --no-rebuild: a damaged cached artifact fails its cells
    meta: dict = field(default_factory=dict)


Report = Callable[[CellOutcome], None]


def run_group(job: GroupJob, report: Report) -> None:
    """Run a group's cells in order, reporting each outcome as soon as its result is written."""
    if job.home:
        os.environ["QUBENCH_HOME"] = job.home
    if job.no_rebuild:  # workers on other machines (Ray) do not share the driver's environment
        from qubench.store import NO_REBUILD_ENV

        os.environ[NO_REBUILD_ENV] = "1"
    log = _logger(job.verbose)
    shared_failure: tuple[str, results.ErrorInfo] | None = None
    for cell_id, spec_json, result_file in job.cells:
        spec = RunSpec.model_validate(spec_json)
        out = Path(result_file)
        t0 = time.perf_counter()
        if shared_failure is not None:
            first, err = shared_failure
            report(record_failure(cell_id, spec, out, err.stage, err.type,
                                  f"not attempted: the {err.stage} stage it shares with {first} failed: "
                                  f"{err.message}", err.traceback))
            continue
        reused = results.stored_ok(out, spec) is not None
        try:
            pipeline.run(spec, Path(job.results_dir), log=lambda msg: log(f"{cell_id}: {msg}"), progress=False,
                         device=job.device)
        except pipeline.RunFailed as exc:
            err = exc.result.error
            report(CellOutcome(cell_id, "failed", str(out), time.perf_counter() - t0,
                               error={"stage": err.stage, "type": err.type, "message": err.message}))
            if step_is_group_shared(err.stage):  # every other cell of the group needs the same artifact
                shared_failure = (cell_id, err)
        except Exception as exc:  # failed before pipeline.run could record it (e.g. invalid parameters)
            report(record_failure(cell_id, spec, out, "setup", type(exc).__name__, str(exc),
                                  traceback.format_exc(), time.perf_counter() - t0))
        else:
            report(CellOutcome(cell_id, "ok", str(out), time.perf_counter() - t0, reused=reused))


def record_failure(cell_id: str, spec: RunSpec, out: Path, stage: str, type_: str, message: str, tb: str,
                   seconds: float = 0.0) -> CellOutcome:
    """Write a failed result for a cell (unless an ok one is stored) and return its outcome."""
    if results.stored_ok(out, spec) is not None:  # it finished before whatever went wrong
        return CellOutcome(cell_id, "ok", str(out), seconds, reused=True)
    result = results.RunResult(run_id=spec.run_id(), status="failed", spec=spec,
                               error=results.ErrorInfo(stage=stage, type=type_, message=message, traceback=tb))
    try:
        results.save(result, out)
    except OSError as exc:  # the outcome is still reported; the next grid run retries the cell anyway
        message = f"{message} (and its failed result could not be written: {exc.strerror or exc})"
    return CellOutcome(cell_id, "failed", str(out), seconds, error={"stage": stage, "type": type_, "message": message})


def fill_missing(job: GroupJob, seen: set[str], reason: str, report: Report) -> None:
    """Record every cell of `job` that reported no outcome (its worker died) as failed with `reason`."""
    for cell_id, spec_json, result_file in job.cells:
        if cell_id not in seen:
            report(record_failure(cell_id, RunSpec.model_validate(spec_json), Path(result_file), "worker",
                                  "WorkerDied", reason, f"(no traceback: {reason})"))


def _logger(verbose: bool) -> Callable[[str], None]:
    if not verbose:
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.print(msg, highlight=False, soft_wrap=True)  # one log line, however long


class Executor(ABC):
    """Runs group jobs and reports every cell outcome through `report` (in the driver process)."""

    @abstractmethod
    def run(self, jobs: list[GroupJob], report: Report, group_done: Callable[[GroupJob], None]) -> None:
        """Run all `jobs`; call `group_done(job)` once each group has finished (for checkpoint pruning)."""
