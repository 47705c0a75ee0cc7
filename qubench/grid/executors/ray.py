"""`--executor ray`: groups as Ray tasks, on Ray's own local cluster or on a cluster by address.

On a single machine `ray.init()` starts a local instance (or joins the one already started in
this process). On a cluster (`--ray-address`), QUBENCH_HOME and the results folder must be on a
filesystem every node sees: workers share stages through the cache and write results there. A
task whose worker dies is not retried (`max_retries=0`); its unfinished cells are recorded as
failed and the other groups go on.

GPUs: on a CUDA device choice (`cuda`, or `auto` on a cluster that has GPUs) each group task asks
Ray for one GPU (`num_gpus=1`), and Ray gives it that GPU alone (CUDA_VISIBLE_DEVICES), so tasks
never share one; `cuda:N` is refused, since Ray, not the user, decides which GPU a task gets.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from qubench.errors import ConfigError
from qubench.grid.executors.base import CellOutcome, Executor, GroupJob, Report, fill_missing, run_group


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install -e '.[ray]'") from None
    return ray


def _run_group_task(job: GroupJob) -> list[CellOutcome]:
    from qubench.quiet import quiet_libraries

    quiet_libraries()
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    outcomes: list[CellOutcome] = []
    run_group(job, outcomes.append)
    return outcomes


def task_gpus(device: str, cluster_gpus: float) -> int:
    """GPUs each group task asks Ray for: 1 for a CUDA device choice, else 0."""
    from qubench.device import check_choice

    choice = check_choice(device)
    if choice.startswith("cuda:"):
        raise ConfigError(f"--device {choice} with --executor ray: Ray assigns each task its GPU; "
                          "use --device cuda (or auto)")
    if choice == "cuda" and not cluster_gpus:
        raise ConfigError("--device cuda with --executor ray: the Ray cluster has no GPU resources; "
                          "use --device cpu, or start Ray on GPU nodes")
    return 1 if choice == "cuda" or (choice == "auto" and cluster_gpus) else 0


class RayExecutor(Executor):
    def __init__(self, address: str | None = None, workers: int = 1):
        self.address = address
        self.workers = workers  # only used to size a local instance this executor starts

    def run(self, jobs: list[GroupJob], report: Report, group_done: Callable[[GroupJob], None]) -> None:
        ray = _ray()
        started_here = not ray.is_initialized()
        if started_here:
            kwargs = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None and self.workers > 1:
                kwargs["num_cpus"] = self.workers
            ray.init(address=self.address, **kwargs)
        # Environment a worker needs, whoever started the cluster: the cache location and the
        # driver's thread setting (a local instance does not always forward the driver's env).
        env = {k: os.environ[k] for k in ("QUBENCH_HOME", "OMP_NUM_THREADS") if k in os.environ}
        gpus = task_gpus(jobs[0].device if jobs else "cpu", ray.cluster_resources().get("GPU", 0))
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_run_group_task).options(
            runtime_env={"env_vars": env})
        futures = {task.remote(job): job for job in jobs}
        try:
            while futures:
                done, _ = ray.wait(list(futures), num_returns=1)
                job = futures.pop(done[0])
                seen: set[str] = set()
                try:
                    for outcome in ray.get(done[0]):
                        seen.add(outcome.cell_id)
                        report(outcome)
                    reason = "Ray task ended without reporting this cell"
                except Exception as exc:  # the worker died or the task could not run
                    reason = f"Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                fill_missing(job, seen, reason, report)
                group_done(job)
        finally:
            for ref in futures:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
