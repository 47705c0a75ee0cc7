"""What a result needs to be reproduced: library versions, the git state of qubench, the hardware."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = ("qubench", "torch", "transformers", "tokenizers", "accelerate", "lm-eval", "llmcompressor",
             "compressed-tensors", "datasets", "rouge-score", "scikit-learn", "numpy", "pydantic", "bitsandbytes",
             "gptqmodel", "vllm")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def git_state() -> dict[str, str | bool | None]:
    """The commit of the qubench checkout (None when installed from a wheel) and whether it had local edits."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    # Only the checkout qubench itself lives in: an installed package inside some other repository
    # (a virtualenv in a project folder) must not report that repository's commit.
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return {"commit": None, "dirty": None}
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "qubench", "tasks", "pyproject.toml")
    return {"commit": commit, "dirty": bool(dirty) if commit else None}


def plugin_sources(spec) -> dict[str, str | None]:
    """Which installed package (and version) provided each plugin of a run: a third-party method's
    numbers mean little without the exact release that produced them."""
    from qubench import registry

    refs = {"task": ("tasks", spec.task), "method": ("methods", spec.method), "quant": ("quantizers", spec.quant),
            "engine": ("engines", spec.engine)}
    if getattr(spec, "audit", None) is not None:  # an audit's "method" is a checkpoint, no plugin
        refs.pop("method")
    return {key: registry.source(family, ref.name) for key, (family, ref) in refs.items()}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _driver_version() -> str | None:
    """The NVIDIA driver's version: NVML (nvidia-ml-py) when installed, else nvidia-smi, else None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            found = pynvml.nvmlSystemGetDriverVersion()
            return found.decode() if isinstance(found, bytes) else str(found)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # not installed, or no NVIDIA driver: try the command line tool
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def hardware() -> dict:
    """The machine a result was computed on: the CPU, and every GPU torch sees (names, memory,
    compute capability) with the CUDA runtime, cuDNN and driver versions when there are any."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    info = {"accelerator": "cuda" if gpus else "none", "gpu_count": len(gpus), "gpus": gpus,
            "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count()}}
    if gpus:
        info.update(cuda_runtime=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    driver=_driver_version(), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return info


def environment(spec=None) -> dict:
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "hardware": hardware(),
        "libraries": library_versions(),
        "git": git_state(),
        **({"plugins": plugin_sources(spec)} if spec is not None else {}),
    }
