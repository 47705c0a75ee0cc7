"""Install a submission's package into a folder of its own (`pip install --target`), never into the
running environment, so checking a submission leaves the environment as it was."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from qubench.errors import ConfigError
from qubench.submissions.schema import Submission


def pip_argument(folder: Path, sub: Submission) -> str:
    """A path source is relative to the submission folder; anything else is a pip requirement."""
    source = sub.package.source
    candidate = (Path(folder) / source)
    if source.startswith((".", "/")) or candidate.exists():
        return str(candidate.resolve())
    return source


#: Left out when a package folder is copied before building: build output and the submission's own files.
_NOT_SOURCE = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "results", ".locks")


def install_into(folder: Path, sub: Submission, target: Path, timeout: float = 600) -> None:
    """pip install the package (without dependencies: qubench and torch are there already) into `target`."""
    with tempfile.TemporaryDirectory(prefix="qubench-build-") as scratch:
        argument = pip_argument(folder, sub)
        if Path(argument).is_dir():  # build a copy: building in place would leave build/ in the submission
            argument = str(shutil.copytree(argument, Path(scratch) / "src", ignore=_NOT_SOURCE))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--target", str(target), argument]
        if importlib.util.find_spec("setuptools") is not None:
            cmd.insert(4, "--no-build-isolation")  # build with the setuptools here rather than fetch one
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"pip install of {sub.package.source!r} took more than {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ConfigError(f"the package does not install (pip install {pip_argument(folder, sub)}):\n{tail}")
