"""Content identities of files and model folders, used in cache keys and recorded in results.

Every byte counts: two checkpoints that differ anywhere (say, only in the last tensor of a 7B
shard, which is where safetensors' name order puts the layers SURE and LoRA change) never share
an identity. Reading a 7B checkpoint takes tens of seconds, so each file's sha256 is remembered
(QUBENCH_HOME/hashes), keyed by the file's absolute path and checked against its size, inode and
modification and change times: a file that has not been touched since it was hashed is not read
again, and one that was rewritten in place (new mtime/ctime) is hashed anew.

qubench's own side files (`qubench_*`: logs with wall times, manifests) are left out of a model's
fingerprint, so identical weights give identical fingerprints wherever they were built.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qubench import store

#: The cache kind (folder under QUBENCH_HOME) of remembered file digests.
MEMO_KIND = "hashes"
_CHUNK = 8 << 20


def _stat_key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _memo_path(path: Path) -> Path:
    return store.home() / MEMO_KIND / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"


def file_digest(path: Path | str) -> str:
    """The sha256 (hex) of the file's whole content, remembered while the file stays untouched."""
    path = Path(path).absolute()
    st = path.stat()
    memo = _memo_path(path)
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if known.get("path") == str(path) and known.get("stat") == _stat_key(st):
            return known["sha256"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # no memo yet, or an unreadable one: hash the file
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    after = path.stat()
    if _stat_key(after) == _stat_key(st):  # not changed while it was read: safe to remember
        store.write_json_atomic(memo, {"path": str(path), "stat": _stat_key(st), "sha256": digest})
    return digest


def remember(path: Path | str, digest: str) -> None:
    """Record `digest` as the content of `path` as it is now (its builder has just hashed it)."""
    path = Path(path).absolute()
    store.write_json_atomic(_memo_path(path), {"path": str(path), "stat": _stat_key(path.stat()), "sha256": digest})


def model_files(path: Path) -> list[Path]:
    """The files that make up a model folder (everything but qubench's own `qubench_*` side files)."""
    return [p for p in sorted(Path(path).rglob("*")) if p.is_file() and not p.name.startswith("qubench_")]


def model_fingerprint(path: Path) -> str:
    """A hash of every file of the folder: relative path, size and full content digest."""
    path = Path(path)
    h = hashlib.sha256()
    for p in model_files(path):
        h.update(f"{p.relative_to(path).as_posix()}:{p.stat().st_size}:{file_digest(p)}\n".encode())
    return h.hexdigest()[:16]
