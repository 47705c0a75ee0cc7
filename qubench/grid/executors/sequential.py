"""The default executor: every group in this process, one after the other, in plan order."""

from __future__ import annotations

from collections.abc import Callable

from qubench.grid.executors.base import Executor, GroupJob, Report, run_group


class SequentialExecutor(Executor):
    def run(self, jobs: list[GroupJob], report: Report, group_done: Callable[[GroupJob], None]) -> None:
        for job in jobs:
            run_group(job, report)
            group_done(job)
