"""A memory plan before any work (issue #13): per-device peak memory of every stage of a run, from
configs alone (no weights loaded), held against the devices, with the options that would make a run
fit. `shape` reads a model's shape on the meta device, `estimate` (unlearning) and `inference`
(quantization, evaluation) do the arithmetic, `plan` judges it, `build` maps a run spec onto it and
`report` prints it."""

from qubench.memplan.plan import Hardware, MemoryPlan, MemoryPlanError, detect_hardware
from qubench.methods.runtime import Parallelism

__all__ = ["Hardware", "MemoryPlan", "MemoryPlanError", "Parallelism", "detect_hardware"]
