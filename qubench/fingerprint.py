"""Cheap, stable identities for model folders, used in cache keys and results.

Hashing every byte of a 7B checkpoint on each run would cost minutes, so large
weight files contribute their size and first MiB; small files are hashed whole. qubench's own side files (`qubench_*.json`: logs with
wall times) are left out, so identical weights give identical fingerprints.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WHOLE_FILE_LIMIT = 64 << 20


def model_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if not p.is_file() or p.name.startswith("qubench_"):
            continue  # qubench's own logs (timings) are not part of the model
        size = p.stat().st_size
        h.update(f"{p.relative_to(path)}:{size}".encode())
        with open(p, "rb") as fh:
            h.update(fh.read() if size <= WHOLE_FILE_LIMIT else fh.read(1 << 20))
    return h.hexdigest()[:16]
