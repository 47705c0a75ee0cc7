"""Unlearning-method plugins: take the target model, return an unlearned model folder.

A method receives an `UnlearnContext` (where the target lives, the task data,
where to write, the seed) and writes a `save_pretrained` folder (model and
tokenizer) to `ctx.out_dir`. Loss-based methods share one training loop
(`qubench.methods.train_loop`) and only supply their loss.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qubench.plugin import Plugin
from qubench.tasks.muse_layout import TaskData

if TYPE_CHECKING:
    from qubench.methods.runtime import Parallelism


@dataclass(frozen=True)
class UnlearnContext:
    target_dir: Path          # save_pretrained folder of the target model (model + tokenizer)
    retrain_dir: Path | None  # the retrain reference, when one exists
    data: TaskData
    out_dir: Path             # where the unlearned model must be saved
    seed: int = 0
    progress: bool = True     # show progress while training (qubench.progress.Steps); off in tests, --json, grids
    # How training is spread over processes and devices (None: one process, CUDA when visible). Not part
    # of the result's identity; `qubench.methods.launch.unlearn` starts the processes it asks for.
    parallelism: Parallelism | None = None
    # The device the run asked for ("cpu", "cuda:N"; qubench.device.Device.torch_device): training runs on
    # it (an index picks the GPU of a one-process run).
    device: str = "cpu"


@dataclass
class UnlearnOutcome:
    """What a method reports besides the weights it saved."""

    steps: int = 0                                              # optimizer steps taken
    log: list[dict[str, float]] = field(default_factory=list)  # one entry per optimizer step
    final_losses: dict[str, float] = field(default_factory=dict)  # loss terms of the last step
    extra: dict[str, Any] = field(default_factory=dict)


class UnlearnMethod(Plugin):
    #: True when the method's output depends on the retrain model (the `retrain` reference copies it),
    #: so that the unlearned model's cache key includes the retrain model's content.
    uses_retrain_model: ClassVar[bool] = False
    #: True for a known-answer control (e.g. `+inbucket`, forgetting hidden inside one quantizer's rounding
    #: buckets): the leaderboard shows it, labelled, and never ranks it among methods.
    is_control: ClassVar[bool] = False

    @abstractmethod
    def unlearn(self, ctx: UnlearnContext) -> UnlearnOutcome:
        """Write the unlearned model to `ctx.out_dir` (model + tokenizer, save_pretrained)."""
