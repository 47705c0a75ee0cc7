"""Stage 4: a model folder quantized by a quantizer plugin, calibrated on the task's retain corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qubench import store
from qubench.device import CPU, Device, device_kwargs
from qubench.fingerprint import model_fingerprint
from qubench.stages.base import Stage

#: The side file a quantized folder carries: time, size and the quantizer's own record.
RECORD_FILE = "qubench_quant.json"


def calibration_texts(data) -> list[str]:
    """Calibration for GPTQ/AWQ comes from the retain corpus, never the forget set:
    calibrating on forget text would let the quantizer fit the very knowledge
    under test and confound recovery with calibration leakage."""
    return list(data.retain or data.privleak_retain)


class Quantized(Stage):
    kind = "quantized"
    description = "quantized checkpoints"
    step = "quantize"
    group_shared = False

    def __init__(self, quant, model_dir: Path, data, what: str | None = None, device: Device = CPU):
        self.quant, self.model_dir, self.device = quant, Path(model_dir), device
        self.what = what or self.model_dir.name  # the model's role in the run (target, unlearned), for the log
        self.calibration = calibration_texts(data)

    def identity(self) -> dict[str, Any]:
        return {"model": model_fingerprint(self.model_dir), "quant": self.quant.name, "params": self.quant.params(),
                "calib": store.stable_hash(self.calibration), **self.device.identity()}

    def space_needed(self) -> int:
        from qubench.preflight import folder_size

        return folder_size(self.model_dir)  # at most the size of the model it starts from

    def label(self) -> str:
        return self.quant.name

    def activity(self) -> str:
        return f"quantizing {self.what} with {self.quant.name}"

    def build(self, tmp: Path) -> None:
        outcome = self.quant.quantize(self.model_dir, tmp, self.calibration,
                                      **device_kwargs(self.quant.quantize, self.device))
        store.write_json_atomic(tmp / RECORD_FILE, {"seconds": outcome.seconds, "size_bytes": outcome.size_bytes,
                                                    "extra": outcome.extra,
                                                    "calibration_hash": store.stable_hash(self.calibration),
                                                    "calibration_docs": len(self.calibration)})


def read_record(quantized_dir: Path) -> dict:
    return store.read_json(Path(quantized_dir) / RECORD_FILE)
