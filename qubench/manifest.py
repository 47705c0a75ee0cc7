"""Content manifests of cached artifacts: what a stage wrote, checked every time it is read back.

When a stage is built (`qubench.store.cached_dir` / `cached_file`), the sha256 and size of every file
it wrote are recorded: in `qubench_manifest.json` inside a folder artifact (a `qubench_*` side file,
so it is no part of a model's fingerprint), or in `.manifests/<name>.json` beside a file artifact
(a hidden folder, like the `.locks/` beside it). Reading the artifact back checks it against the record. The check is cheap: sizes
first, then each file's digest through `qubench.fingerprint.file_digest`, which re-reads a file only
when its size, inode or modification/change time differ from when it was last hashed. So a truncated
checkpoint, a cut-short JSON or a tensor zeroed in place (still valid floats) is found before
anything loads it, and named.

Artifacts built before manifests existed have none: they are checked for readable formats (JSON
parses, a safetensors header matches the file's size) and, if sound, get their manifest then.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

#: Inside folder artifacts.
MANIFEST_FILE = "qubench_manifest.json"
#: Beside file artifacts: the folder of their manifests.
MANIFEST_DIR = ".manifests"
MANIFEST_VERSION = 1
#: No safetensors header qubench reads is larger (the format's own limit is 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000


def sidecar(path: Path) -> Path:
    """Where the manifest of a file artifact lives: in a hidden folder beside it."""
    return path.parent / MANIFEST_DIR / f"{path.name}.json"


def manifest_path(path: Path) -> Path:
    return path / MANIFEST_FILE if path.is_dir() else sidecar(path)


def artifact_files(path: Path) -> dict[str, Path]:
    """The files that make up an artifact, by their path relative to it (a file artifact: its name)."""
    path = Path(path)
    if not path.is_dir():
        return {path.name: path}
    found = {}
    for top, dirs, names in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            p = Path(top) / name
            rel = p.relative_to(path).as_posix()
            if rel != MANIFEST_FILE:
                found[rel] = p
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def record(path: Path, name: str | None = None) -> dict:
    """The manifest of the artifact at `path` (a file artifact is recorded under `name`, its final name)."""
    files = artifact_files(path)
    if name is not None and not Path(path).is_dir():
        files = {name: Path(path)}
    return {"version": MANIFEST_VERSION,
            "files": {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in files.items()}}


def write(manifest: dict, where: Path) -> None:
    from qubench import store

    store.write_json_atomic(where, manifest)


def read(path: Path) -> dict | None:
    """The recorded manifest of the artifact at `path`; None when it has none; ValueError when unreadable."""
    where = manifest_path(path)
    if not where.exists():
        return None
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"size", "sha256"} <= set(v)
                                                  for v in files.values()):
            raise ValueError("no file list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"its manifest {where.name} is unreadable ({type(exc).__name__}: {exc})") from None
    return data


def check(path: Path) -> str | None:
    """None when the artifact at `path` is exactly what was recorded when it was built; otherwise what
    differs, naming the file. An artifact without a manifest is checked with `format_problem` only."""
    from qubench.fingerprint import file_digest

    path = Path(path)
    try:
        manifest = read(path)
    except ValueError as exc:
        return str(exc)
    if manifest is None:
        return unrecorded_problem(path)
    recorded = manifest["files"]
    present = artifact_files(path)
    missing = sorted(set(recorded) - set(present))
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else "")
    extra = sorted(set(present) - set(recorded))
    if extra:
        return f"{extra[0]} was not written by the build" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for rel, expected in recorded.items():
        size = present[rel].stat().st_size
        if size != expected["size"]:
            return f"{rel} is {size} bytes, {expected['size']} when it was built" + (
                " (truncated)" if size < expected["size"] else "")
    for rel, expected in recorded.items():
        if file_digest(present[rel]) != expected["sha256"]:
            return f"{rel} has changed since it was built (its sha256 differs from the one recorded then)"
    return None


def has_manifest(path: Path) -> bool:
    return manifest_path(Path(path)).exists()


def unrecorded_problem(path: Path) -> str | None:
    """For an artifact built before manifests: the first file whose format is broken."""
    for rel, p in artifact_files(path).items():
        problem = format_problem(p)
        if problem:
            return f"{rel}: {problem}" if Path(path).is_dir() else problem
    return None


def format_problem(path: Path) -> str | None:
    """What is wrong with a JSON or safetensors file's format (None: readable, or a format not checked)."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            return safetensors_problem(path)
    except (OSError, ValueError) as exc:
        return f"unreadable {path.suffix[1:].upper()} ({type(exc).__name__}: {exc})"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Checks what safetensors checks on load, without loading: the header parses and the file is as
    long as the tensors it declares."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"truncated safetensors: {size} bytes, not even a header length"
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_SAFETENSORS_HEADER, size - 8):
            return f"truncated safetensors: the header says {n} bytes of metadata, the file has {size - 8} after it"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "corrupt safetensors header (not JSON)"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"truncated safetensors: {size} bytes, its header declares {expected}" if size < expected else \
            f"safetensors file is {size} bytes, its header declares {expected}"
    return None
