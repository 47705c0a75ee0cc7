"""`qubench cache ls|clean`: what QUBENCH_HOME holds, and removing it safely.

Every artifact is removed under its build lock and renamed away before deletion, so a running
job never sees a half-deleted folder under its final name, and one in use is skipped.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qubench import store
from qubench.stages import OTHER_KINDS, STAGE_KINDS

#: Every kind of artifact a run can leave under QUBENCH_HOME, in pipeline order, with its description.
KINDS: dict[str, str] = {**{kind: cls.description for kind, cls in STAGE_KINDS.items()}, **OTHER_KINDS}


@dataclass
class KindUsage:
    kind: str
    description: str = ""
    entries: int = 0
    bytes: int = 0
    stale_temporaries: int = 0     # leftovers of interrupted builds (their process is gone)
    stale_bytes: int = 0


@dataclass
class CacheUsage:
    home: str
    kinds: list[KindUsage] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(k.bytes + k.stale_bytes for k in self.kinds)

    def as_dict(self) -> dict:
        return {"home": self.home, "total_bytes": self.total_bytes, "kinds": [asdict(k) for k in self.kinds]}


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def entries(kind: str) -> list[Path]:
    folder = store.home() / kind
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def stale(kind: str) -> list[Path]:
    folder = store.home() / kind
    return sorted(p for p in folder.glob(".*") if store.is_stale_temporary(p)) if folder.is_dir() else []


def usage() -> CacheUsage:
    out = CacheUsage(home=str(store.home()))
    for kind in KINDS:
        live, dead = entries(kind), stale(kind)
        out.kinds.append(KindUsage(kind, KINDS[kind], len(live), sum(map(size_of, live)), len(dead),
                                   sum(map(size_of, dead))))
    return out


@dataclass
class CleanReport:
    removed: list[str] = field(default_factory=list)
    skipped_in_use: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def clean(kinds: list[str], dry_run: bool = False) -> CleanReport:
    """Remove stale temporaries everywhere, and every artifact of `kinds` (skipping any in use)."""
    report = CleanReport()
    for kind in KINDS:
        for path in stale(kind):
            report.freed_bytes += size_of(path)
            report.removed.append(str(path))
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for kind in kinds:
        for path in entries(kind):
            size = size_of(path)
            if dry_run or store.remove_cached(path, blocking=False):
                report.removed.append(str(path))
                report.freed_bytes += size
            else:
                report.skipped_in_use.append(str(path))
    return report
