"""Quantizer plugins: take a model folder, write a quantized checkpoint folder.

`quantize` writes a checkpoint that `load_quantized` reads back as an
in-memory model for evaluation; `scheme` is the exact description recorded
in results (library, version, format, bits, group size, symmetry, ...).

Devices: on a GPU run, the stages call `quantize(..., device=...)` and
`load_quantized(..., device=...)` with a `qubench.device.Device`; on the CPU
they call them without it, exactly as before devices existed (so a plugin that
takes no `device` argument keeps working, and runs where it runs).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qubench.plugin import Plugin

# The output head stays in full precision, as in the usual weight-only recipes
# (and in arXiv 2410.16454); embeddings are not Linear, so they are never targeted.
DEFAULT_IGNORE = ("lm_head",)


@dataclass
class QuantOutcome:
    seconds: float = 0.0
    size_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class QuantizedWeights(dict):
    """Effective (dequantized) weight of every quantized module, keyed by module name.

    `steps` holds, per module, the quantization step (the scale, shaped like the
    checkpoint's scales: one per row and group). It lets the diagnostics compare
    grid positions instead of raw values: two checkpoints whose weights sit on the
    same grid level differ in value only through a slightly different scale, and
    that is not a weight that quantization failed to map back. Empty for a
    full-precision checkpoint, which has no grid.
    """

    def __init__(self, weights: dict[str, torch.Tensor], steps: dict[str, torch.Tensor] | None = None):
        super().__init__(weights)
        self.steps = dict(steps or {})


def quantizable_linears(model: torch.nn.Module, ignore: list[str] | tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The Linear modules a weight-only scheme targets, minus `ignore`, matched exactly as
    llm-compressor / compressed-tensors match them (names, `re:` patterns, class names)."""
    from compressed_tensors.utils import match_named_modules

    return dict(match_named_modules(model, ["Linear"], list(ignore)))


def per_weight(step: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast a (rows, groups) step tensor to the (rows, columns) weight it quantizes."""
    return step.repeat_interleave(shape[-1] // step.shape[-1], dim=-1)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Quantizer(Plugin):
    @abstractmethod
    def scheme(self) -> dict[str, Any]:
        """The exact scheme, recorded verbatim in every result."""

    @abstractmethod
    def quantize(self, model_dir: Path, out_dir: Path, calibration: list[str], device=None) -> QuantOutcome:
        """Quantize the save_pretrained model in `model_dir` into `out_dir` (plus its tokenizer), on
        `device` (a qubench.device.Device; None: the CPU)."""

    @abstractmethod
    def load_quantized(self, out_dir: Path, device=None) -> torch.nn.Module:
        """Load a checkpoint written by `quantize` as a model ready for evaluation: on the CPU
        (device None) in float32; on a GPU `device`, placed there (spread over its GPUs if needed)."""

    @abstractmethod
    def dequantized_weights(self, out_dir: Path) -> QuantizedWeights:
        """The effective (dequantized) weight of every quantized module, keyed by module name.
        Used by the mechanism diagnostics to compare quantized target and quantized unlearned."""

    @abstractmethod
    def step_size(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantization step this scheme would use for `weight`, shaped like its scales
        (rows, groups)."""

    def ignored(self) -> list[str]:
        return list(getattr(self.config, "ignore", DEFAULT_IGNORE))

    def quantized_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The modules whose weights this scheme rounds (for a full-precision control:
        the ones a weight-only quantizer would round), keyed by module name."""
        return quantizable_linears(model, self.ignored())
