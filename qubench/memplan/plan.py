"""The memory plan of a run: its stages' per-device peaks against the devices it would run on, and,
when a stage does not fit, the options that would make it fit.

Built from configs only (the model's config on the meta device, the plugins' configs, the task data
when it is already prepared), so `qubench run --dry-run` prints it without loading any weights, and a
run that cannot fit stops before it loads anything.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench.errors import QubenchError
from qubench.memplan.estimate import StagePlan, TrainSettings, unlearning
from qubench.memplan.lengths import Lengths
from qubench.memplan.shape import ModelShape, parse_size

GiB = 2**30
#: Process counts tried when suggesting FSDP.
PROCESS_COUNTS = (2, 4, 8, 16, 32, 64)
#: A fit with less than this share of the budget to spare is reported as tight.
TIGHT = 0.1
#: The host budget of a simulated machine whose host RAM was not given: never exceeded.
UNCHECKED = 2**62


class MemoryPlanError(QubenchError):
    """The run cannot fit the devices; the message lists the options that would."""


class Hardware(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["cpu", "cuda", "simulated"]
    devices: int = Field(1, ge=1)
    device_bytes: int        # budget of each device (on a CPU: the host RAM all processes share)
    host_bytes: int          # host RAM available
    source: str

    @property
    def accelerator(self) -> bool:
        return self.kind != "cpu"


def detect_hardware(max_memory: str | None = None, device: str = "auto") -> Hardware:
    """The visible devices and their free memory; `max_memory` ("24GiB" per device, or "8x80GB" for
    8 simulated accelerators) replaces the detected budget."""
    import psutil
    import torch

    host = psutil.virtual_memory().available
    if max_memory and "x" in max_memory.lower():
        devices, _, host_text = max_memory.lower().partition("+")
        count, _, size = devices.partition("x")
        if not count.strip().isdigit() or int(count) < 1:
            raise MemoryPlanError(f"--max-memory {max_memory!r}: write SIZE (per device), COUNTxSIZE or "
                                  "COUNTxSIZE+HOST, e.g. 24GiB, 8x80GB or 8x80GB+2TB")
        # A simulated machine's host RAM is not this machine's: checked only when given.
        return Hardware(kind="simulated", devices=int(count), device_bytes=parse_size(size),
                        host_bytes=parse_size(host_text) if host_text else UNCHECKED,
                        source=f"--max-memory {max_memory}: {int(count)} simulated accelerator(s), host RAM "
                               + ("as given" if host_text else "not checked"))
    if device != "cpu" and torch.cuda.is_available():
        ids = [int(device.split(":")[1])] if device.startswith("cuda:") else list(range(torch.cuda.device_count()))
        free = min(torch.cuda.mem_get_info(i)[0] for i in ids)
        hw = Hardware(kind="cuda", devices=len(ids), device_bytes=free, host_bytes=host,
                      source=f"{len(ids)} CUDA device(s), free memory of the fullest; host RAM available")
    else:
        hw = Hardware(kind="cpu", devices=1, device_bytes=host, host_bytes=host, source="CPU: host RAM available")
    if max_memory:
        size = parse_size(max_memory)
        hw = hw.model_copy(update={"device_bytes": size, "source": f"--max-memory {max_memory} per device",
                                   **({"host_bytes": size} if hw.kind == "cpu" else {})})
    return hw


class Verdict(BaseModel):
    stage: str
    fits: bool
    memory_fits: bool
    tight: bool = False   # fits with less than TIGHT of the budget to spare
    phase: str            # the phase with the largest need
    need: str             # e.g. "151.6 GiB per device" (accelerators) or "16.6 GiB of RAM" (CPU)
    budget: str
    problem: str | None = None


def _gib(n: int) -> str:
    return f"{n / GiB:,.1f} GiB"


def judge(stage: StagePlan, hw: Hardware) -> Verdict:
    """Whether every phase of `stage` fits `hw`: per device and in host RAM on an accelerator machine;
    on a CPU all processes and the host items share one RAM."""
    worst = None
    for phase in stage.phases:
        if hw.accelerator:
            over = max(phase.device - hw.device_bytes, phase.host - hw.host_bytes)
            need = f"{_gib(phase.device)} per device" + (f" and {_gib(phase.host)} of host RAM" if phase.host else "")
        else:
            total = phase.device * stage.processes + phase.host
            over, need = total - hw.host_bytes, f"{_gib(total)} of RAM"
        if worst is None or over > worst[0]:
            worst = (over, phase.name, need)
    over, phase, need = worst
    if hw.accelerator:
        budget = f"{_gib(hw.device_bytes)} per device" + (
            f" and {_gib(hw.host_bytes)} of host RAM" if hw.host_bytes != UNCHECKED else "")
    else:
        budget = f"{_gib(hw.host_bytes)} of RAM"
    problem = None
    if over > 0:
        problem = f"its {phase} phase needs {need}; the budget is {budget}"
    elif hw.accelerator and stage.processes > hw.devices:
        problem = f"needs {stage.processes} devices, {hw.devices} visible"
    # Allocators keep some freed memory (measured on CPU: up to ~40% more than the live bytes for LoRA's
    # many small tensors, see benchmarks/results/memory_plan.md), so a close fit is flagged.
    tight = -TIGHT * (hw.device_bytes if hw.accelerator else hw.host_bytes) < over <= 0
    return Verdict(stage=stage.stage, fits=problem is None, memory_fits=over <= 0, tight=tight, phase=phase,
                   need=need, budget=budget, problem=problem)


@dataclass(frozen=True)
class Move:
    """One kind of change that lowers the unlearn stage's memory. `variants` gives, for settings, the
    ways to apply it (the options a user passes, the settings they lead to), most preferred first."""

    name: str
    variants: Callable[[TrainSettings], list[tuple[str, TrainSettings]]]


def _combined(moves: tuple[Move, ...], settings: TrainSettings, options: tuple[str, ...] = ()):
    if not moves:
        yield options, settings
        return
    for text, changed in moves[0].variants(settings):
        yield from _combined(moves[1:], changed, (*options, text))


class MemoryPlan(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    shape: ModelShape = Field(exclude=True)
    hardware: Hardware
    lengths: Lengths = Field(exclude=True)
    stages: list[StagePlan]
    train: TrainSettings | None = Field(None, exclude=True)
    moves: list[Move] = Field(default_factory=list, exclude=True)
    #: Other stages' alternatives: stage name -> [(options, that stage's plan with them)], most preferred first.
    alternatives: dict[str, list[tuple[str, StagePlan]]] = Field(default_factory=dict, exclude=True)

    def verdicts(self) -> list[Verdict]:
        return [judge(stage, self.hardware) for stage in self.stages]

    def suggestions(self) -> list[str]:
        """For each stage that does not fit: the options that make it fit, each alone, else the fewest
        combined (the first fitting variant of each combination)."""
        found = []
        for verdict in self.verdicts():
            if verdict.fits:
                continue
            if verdict.stage == "unlearn" and self.train is not None:
                found += self._unlearn_options()
            else:
                found += [text for text, stage in self.alternatives.get(verdict.stage, [])
                          if judge(stage, self.hardware).fits][:2]
        return found

    def _unlearn_options(self) -> list[str]:
        for size in (1, 2, 3):
            hits = []
            for combo in itertools.combinations(self.moves, size):
                for options, settings in _combined(combo, self.train):
                    verdict = judge(unlearning(self.shape, settings, self.hardware.accelerator), self.hardware)
                    if verdict.memory_fits:
                        hits.append(" with ".join(options) + (f" ({verdict.problem} here)" if verdict.problem else ""))
                        break
            if hits:
                return hits
        return []

    def check(self) -> None:
        """Raise MemoryPlanError naming what does not fit and what would, unless every stage fits."""
        failing = [v for v in self.verdicts() if not v.fits]
        if not failing:
            return
        lines = [f"the memory plan says this run does not fit ({self.hardware.source}):"]
        lines += [f"  - {v.stage}: {v.problem}" for v in failing]
        options = self.suggestions()
        if options:
            lines.append("options that would fit:")
            lines += [f"  - {o}" for o in options]
        else:
            lines.append("nothing tried fits (more processes with FSDP, CPU offload, LoRA, gradient checkpointing, "
                         "a smaller batch, alone or up to three together)")
        lines.append("`qubench run ... --dry-run` prints the plan. It is an estimate: --max-memory SIZE sets the budget "
                     "per device if you know better.")
        raise MemoryPlanError("\n".join(lines))
