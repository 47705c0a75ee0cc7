"""Where a run executes: `--device auto|cpu|cuda|cuda:N`, resolved once per process.

How a run executes is not what it measures, so the device is not part of `RunSpec` or the run ID:
the same spec on a laptop and on a GPU node names the same result. But the numbers of the stages
that compute (training the target, unlearning, quantization, evaluation) can differ in their last
bits between a CPU and a GPU (other kernels, other reduction orders, bf16 autocast in training), so
those stages add the device *kind* to their identity when it is not the CPU (`Device.identity()`):
CPU and GPU artifacts never share a cache entry, and CPU keys stay exactly what they were before
devices existed (every CPU artifact cached so far stays valid, and CPU numbers do not move).

- `auto`: CUDA when torch sees a GPU, else the CPU.
- `cuda`: every visible GPU (one process; models larger than one GPU are spread over them).
- `cuda:N`: GPU N only.
- `cpu`: the CPU, even where GPUs are visible.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from qubench.errors import ConfigError

CHOICES = "auto, cpu, cuda or cuda:N"
_CHOICE = re.compile(r"^(auto|cpu|cuda|cuda:(\d+))$")
#: GPU memory a device map may fill with weights; the rest is left for activations and the KV cache.
WEIGHT_SHARE = 0.85


def check_choice(text: str) -> str:
    """`text` normalised (stripped, lower case) if it is a device choice, else a ConfigError."""
    choice = str(text).strip().lower()
    if not _CHOICE.match(choice):
        raise ConfigError(f"device {text!r} is not one of {CHOICES} (e.g. --device cuda:0)")
    return choice


@dataclass(frozen=True)
class Device:
    """A resolved device choice."""

    kind: Literal["cpu", "cuda"]
    index: int | None = None      # cuda:N; None: every visible GPU (kind cuda) or the CPU
    count: int = 0                # GPUs this process may use
    requested: str = "cpu"        # what was asked for (auto, cuda, ...)

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_device(self) -> str:
        """The device a model on one device goes to: "cpu", or "cuda:N" (the first GPU for `cuda`)."""
        if not self.is_cuda:
            return "cpu"
        return f"cuda:{self.index if self.index is not None else 0}"

    @property
    def choice(self) -> str:
        """The resolved choice as `--device` spells it: cpu, cuda (every visible GPU) or cuda:N."""
        if not self.is_cuda:
            return "cpu"
        return "cuda" if self.index is None else f"cuda:{self.index}"

    def gpu_indices(self) -> list[int]:
        if not self.is_cuda:
            return []
        return [self.index] if self.index is not None else list(range(self.count))

    def identity(self) -> dict[str, str]:
        """What a stage adds to its identity: nothing on the CPU (so CPU keys are what they always
        were), the device kind elsewhere. The kind, not the GPU model or count: the same kernels
        run on every GPU of a kind, and a key must not change with the size of the machine."""
        return {} if self.kind == "cpu" else {"device": self.kind}

    def record(self) -> dict[str, Any]:
        """For `result.resolved["device"]`."""
        return {"requested": self.requested, "kind": self.kind, "index": self.index, "count": self.count,
                "torch_device": self.torch_device}

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` keyword arguments that place a model on this device.

        Nothing on the CPU: models load there exactly as they always did. One GPU (`cuda:N`, or
        `cuda` with one visible GPU): the whole model on it. Several GPUs (`cuda`): accelerate's
        "sequential" device map, which fills GPU 0 first and moves on only when it is full, so a
        model that fits one GPU stays on one (no hops between GPUs), and a larger one is spread over
        as many as it needs; each GPU is filled to WEIGHT_SHARE of its memory at most, leaving room
        for activations and the KV cache."""
        if not self.is_cuda:
            return {}
        if self.index is not None or self.count == 1:
            return {"device_map": {"": self.torch_device}}
        import torch

        max_memory = {i: int(torch.cuda.get_device_properties(i).total_memory * WEIGHT_SHARE)
                      for i in self.gpu_indices()}
        return {"device_map": "sequential", "max_memory": max_memory}


CPU = Device("cpu", None, 0, "cpu")


def resolve(choice: str | Device | None = "auto") -> Device:
    """The device `choice` names on this machine; a ConfigError, saying what is visible, when it
    names a GPU this process cannot see."""
    if isinstance(choice, Device):
        return choice
    choice = check_choice(choice or "auto")
    if choice == "cpu":
        return CPU
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "auto":
        return Device("cuda", None, count, "auto") if count else Device("cpu", None, 0, "auto")
    if not count:
        raise ConfigError(f"--device {choice}: {_no_gpu_reason(torch)}. Use --device cpu (or auto, which falls "
                          "back to the CPU)")
    if choice == "cuda":
        return Device("cuda", None, count, choice)
    index = int(choice.split(":")[1])
    if index >= count:
        raise ConfigError(f"--device {choice}: torch sees {count} GPU(s) (cuda:0 .. cuda:{count - 1}"
                          f"{_visible_note()}); choose one of them, or --device cuda for all")
    return Device("cuda", index, 1, choice)


def _visible_note() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""


def _no_gpu_reason(torch) -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA wheel of torch"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU{_visible_note()}"


def device_kwargs(fn: Callable, device: Device) -> dict[str, Any]:
    """`{"device": device}` for a plugin method that takes a `device` argument, on a GPU; nothing on
    the CPU (the call is then exactly what it was before devices existed) or for a third-party
    plugin that does not take one (it runs wherever it runs, as before)."""
    if not device.is_cuda:
        return {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    takes = "device" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"device": device} if takes else {}


def worker_gpus(workers: int, device: Device) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of `workers` grid worker processes: the visible GPUs dealt out
    so that workers do not pile onto one GPU. With at least as many GPUs as workers each worker gets
    its own share (8 GPUs, 2 workers: 4 each); with fewer, workers take turns on them (4 workers,
    2 GPUs: two per GPU). None for every worker where nothing is dealt out: on the CPU, for one
    worker (it sees what this process sees), or for an explicit `cuda:N` (the user chose the GPU)."""
    if not device.is_cuda or workers <= 1 or device.index is not None or device.count < 1:
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in
                                                                                  range(device.count)]
    names = names[:device.count]
    if workers >= len(names):
        return [names[w % len(names)] for w in range(workers)]
    share = len(names) // workers
    return [",".join(names[w * share:(w + 1) * share]) for w in range(workers)]
