"""What a result needs to be reproduced: library versions and the git state of qubench."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = ("qubench", "torch", "transformers", "tokenizers", "accelerate", "lm-eval", "llmcompressor",
             "compressed-tensors", "datasets", "rouge-score", "scikit-learn", "numpy", "pydantic")


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


def environment(spec=None) -> dict:
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "cuda": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "libraries": library_versions(),
        "git": git_state(),
        **({"plugins": plugin_sources(spec)} if spec is not None else {}),
    }
