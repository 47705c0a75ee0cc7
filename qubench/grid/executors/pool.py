"""`--workers N`: groups in up to N local worker processes, one fresh process per group.

A fresh (spawned) process per group isolates the hard failures an exception cannot report: a
worker killed by the kernel's out-of-memory killer, or crashing in native code, takes down only
its own group, whose unfinished cells are recorded as failed; the other workers go on. Workers
racing for a shared stage (the target, its evaluations) wait on the stage's lock, so it is
computed once.

On GPUs (`--device cuda` or `auto` where GPUs are visible), each worker process sees its own share of
them through CUDA_VISIBLE_DEVICES (`qubench.device.worker_gpus`): 8 GPUs and 4 workers give each
worker 2; more workers than GPUs take turns on them. A share is handed back when its worker ends.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import wait

from qubench.grid.executors.base import Executor, GroupJob, Report, fill_missing, run_group


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the driver dies (even by SIGKILL), so that a
    killed grid leaves no orphan computing on; elsewhere, orphans finish their current cell."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(job: GroupJob, conn) -> None:
    if job.visible_gpus is not None:  # before anything asks CUDA which GPUs there are
        os.environ["CUDA_VISIBLE_DEVICES"] = job.visible_gpus
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides how an interrupt ends the grid
    from qubench.quiet import quiet_libraries

    quiet_libraries()
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    run_group(job, conn.send)
    conn.close()


def death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (e.g. by the kernel's out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {exitcode} before finishing its cells"


class ProcessPoolExecutor(Executor):
    def __init__(self, workers: int):
        self.workers = workers

    def run(self, jobs: list[GroupJob], report: Report, group_done: Callable[[GroupJob], None]) -> None:
        ctx = mp.get_context("spawn")  # forking a process that has loaded torch can deadlock
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        pending = list(jobs)
        running: dict = {}  # sentinel -> [process, connection, job, cell ids reported]
        free_gpus = _gpu_shares(jobs, self.workers)  # one share per worker slot (None: no GPUs dealt)
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    job = pending.pop(0)
                    job.threads = job.threads or threads
                    job.visible_gpus = free_gpus.pop(0)
                    receiver, sender = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_worker, args=(job, sender), name=f"qubench-grid-{job.group_id}")
                    proc.start()
                    sender.close()
                    running[proc.sentinel] = [proc, receiver, job, set()]
                ready = wait([r[1] for r in running.values()] + list(running))
                for sentinel, (proc, receiver, job, seen) in list(running.items()):
                    _drain(receiver, seen, report)
                    if sentinel in ready or not proc.is_alive():
                        proc.join()
                        _drain(receiver, seen, report)
                        fill_missing(job, seen, death_reason(proc.exitcode), report)
                        receiver.close()
                        del running[sentinel]
                        free_gpus.append(job.visible_gpus)
                        group_done(job)
        finally:
            for proc, receiver, _, _ in running.values():
                proc.terminate()
                proc.join()
                receiver.close()


def _gpu_shares(jobs: list[GroupJob], workers: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES value of each worker slot, for the device the jobs ask for."""
    if not jobs:
        return [None] * workers
    from qubench.device import resolve, worker_gpus

    return worker_gpus(workers, resolve(jobs[0].device))


def _drain(receiver, seen: set[str], report: Report) -> None:
    try:
        while receiver.poll():
            outcome = receiver.recv()
            seen.add(outcome.cell_id)
            report(outcome)
    except (EOFError, OSError):
        pass
