"""Executors run a grid's groups: in this process, in a local process pool, or on Ray."""

from __future__ import annotations

from qubench.errors import ConfigError
from qubench.grid.executors.base import Executor


def make_executor(kind: str, workers: int = 1, ray_address: str | None = None) -> Executor:
    if kind == "ray":
        from qubench.grid.executors.ray import RayExecutor

        return RayExecutor(address=ray_address, workers=workers)
    if kind != "local":
        raise ConfigError(f"unknown executor {kind!r}: choose local or ray")
    if workers <= 1:
        from qubench.grid.executors.sequential import SequentialExecutor

        return SequentialExecutor()
    from qubench.grid.executors.pool import ProcessPoolExecutor

    return ProcessPoolExecutor(workers)
