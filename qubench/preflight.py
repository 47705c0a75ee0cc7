"""Checks that run before any work, so that nothing fails after minutes or hours of compute for a
reason that was visible at the start: a results folder or QUBENCH_HOME that cannot be written or
has no room, a model folder that cannot be loaded."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from qubench.errors import ConfigError, StorageError

#: The least free space a run asks for up front: a results file is tens of KB; the cache needs room
#: for at least the small artifacts (task data, evaluations) even when the models are cached.
MIN_FREE_RESULTS = 16 << 20
MIN_FREE_HOME = 256 << 20

#: What `AutoTokenizer.from_pretrained` can build a tokenizer from (any one suffices).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "sentencepiece.bpe.model")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 10 << 30 else f"{n / 2**30:,.1f} GiB"


def writable_folder(folder: Path, what: str, need: int) -> Path:
    """Create `folder` if needed, prove it writable by writing and removing a probe file, and check
    that it has `need` bytes free; a StorageError saying which and why otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".qubench-write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StorageError(f"{what} {folder} is not writable ({reason}); nothing was run. Choose another "
                           f"folder{' with --results' if what == 'results folder' else ' (QUBENCH_HOME)'} or "
                           "fix its permissions") from None
    free = _free(folder)
    if free < need:
        raise StorageError(f"{what} {folder} has {_mib(free)} free, less than the {_mib(need)} this needs; "
                           "nothing was run. Free some space (for the cache: `qubench cache clean`) or choose "
                           "another folder")
    return folder


def free_space(folder: Path, need: int, what: str) -> None:
    """Before building an artifact of about `need` bytes in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = _free(folder)
    if free < need + MIN_FREE_HOME // 4:
        raise StorageError(f"not enough space in {folder} to build {what}: {_mib(free)} free, about {_mib(need)} "
                           "needed; free some space (`qubench cache clean`) and run again (finished stages are kept)")


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_model_folder(path: Path, option: str) -> None:
    """A local model folder that `from_pretrained` can load: config, weights, a tokenizer, and weight
    files whose format is sound. The ConfigError names the option, the folder and what is missing."""
    from qubench.manifest import format_problem

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{option} {path} is not a folder (pass a save_pretrained model folder or a hub ID)")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)})
    if not weights:
        missing.append(f"weights ({' or '.join(WEIGHT_PATTERNS)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)}: save it with "
                       "tokenizer.save_pretrained(folder))")
    if missing:
        raise ConfigError(f"{option} {path} is not a complete model folder; it lacks {'; '.join(missing)}")
    for p in [path / "config.json", *weights]:
        problem = format_problem(p)
        if problem:
            raise ConfigError(f"{option} {path}: {p.name}: {problem}")
