"""The on-disk cache (QUBENCH_HOME) and atomic writes.

Every stage output lives in a folder named by a hash of everything that
determines it, so identical work is done once and reused across runs. A
folder is built under a temporary name and renamed into place in one step:
a half-written artifact is never visible under its final name, so an
interrupted run can never be read back as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir


def home() -> Path:
    """QUBENCH_HOME, default under the user's cache directory."""
    path = Path(os.environ.get("QUBENCH_HOME") or user_cache_dir("qubench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hash of a JSON-able object that does not depend on key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def cached_dir(path: Path, build: Callable[[Path], Any]) -> Path:
    """Return `path`, building it with `build(tmp_dir)` first if it does not exist yet."""
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # anything but "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
