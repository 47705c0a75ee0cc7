"""The QUAIL hinge's cached inputs (built while unlearning, shared by every run with the same target
and forget windows): the target's forget logits, and a quantizer-derived margin delta_q."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qubench import store
from qubench.fingerprint import model_fingerprint
from qubench.stages.base import Stage


class HingeLogits(Stage):
    """The target's logits (all K of them, or its top-k with their ids) at every forget-window position."""

    kind = "hinge_logits"
    description = "QUAIL hinge: the target's forget logits (safetensors)"
    step = "unlearn"
    group_shared = True
    is_file = True
    suffix = ".safetensors"

    def __init__(self, target_dir: Path, windows: list[list[int]], top_k: int | None, model=None, pad_id: int = 0):
        # `model` (the target, in memory) is only needed to build the cache, not to find it.
        self.target_dir, self.windows, self.top_k, self.model, self.pad_id = target_dir, windows, top_k, model, pad_id

    def identity(self) -> dict[str, Any]:
        return {"model": model_fingerprint(self.target_dir), "windows": store.stable_hash(self.windows),
                "top_k": self.top_k}

    def activity(self) -> str:
        return "computing the target's forget logits (QUAIL hinge)"

    def build(self, tmp: Path) -> None:
        from qubench.methods.hinge import write_logit_cache

        write_logit_cache(tmp, self.model, self.windows, self.pad_id, self.top_k)


class HingeMargin(Stage):
    """delta_q derived from a quantizer: 2 x the mean logit change its rounding causes on the target."""

    kind = "hinge_delta"
    description = "QUAIL hinge: margins delta_q derived from a quantizer (JSON)"
    step = "unlearn"
    group_shared = True
    is_file = True
    suffix = ".json"

    def __init__(self, quantizer, target_dir: Path, windows: list[list[int]], top_k: int | None, pad_id: int = 0):
        self.quantizer, self.target_dir, self.windows, self.top_k, self.pad_id = (
            quantizer, target_dir, windows, top_k, pad_id)

    def identity(self) -> dict[str, Any]:
        return {"model": model_fingerprint(self.target_dir), "windows": store.stable_hash(self.windows),
                "top_k": self.top_k, "quant": self.quantizer.name, "params": self.quantizer.params()}

    def activity(self) -> str:
        return f"deriving the QUAIL hinge margins from {self.quantizer.name}"

    def build(self, tmp: Path) -> None:
        from qubench.methods.hinge import derive_delta_q

        delta = derive_delta_q(self.quantizer, self.target_dir, self.windows, self.pad_id, self.top_k)
        if not delta > 0:
            from qubench.errors import ConfigError

            raise ConfigError(
                f"hinge_delta_q={self.quantizer.name!r}: this quantizer leaves the logits unchanged (no rounding "
                "grid), so it gives no margin; set hinge_delta_q to a number instead")
        with open(tmp, "w", encoding="utf-8") as fh:
            store.dump_json(fh, {"delta_q": delta, "quantizer": self.quantizer.name,
                                 "params": self.quantizer.params()})

    def delta_q(self) -> float:
        return store.read_json(self.get(), "delta_q")
