"""What a verification record proves, cell by cell, and how its cells are drawn.

A record (`leaderboard/verifications/<name>.yaml`, written by `qubench verify` only) names the cells
that were re-run and carries the re-run's own measurements. A cell of a submission is *verified*
when it was re-run, its result file is still the one that was compared (sha256), and its numbers
lie within the record's tolerance of the re-run's, compared here again rather than taken from the
record's verdict; every other cell is *submitted*. The cells are drawn from a seed that follows from
a nonce drawn when `verify` ran and the digest of the submission at that moment: the submitter
cannot know them in advance, and anyone can recompute them from the record.

No plugin code is imported here: the leaderboard uses this module.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qubench import metric_catalog
from qubench.submissions import integrity, schema
from qubench.submissions.schema import RerunCell, Tolerance, Verification

VERIFIED, SUBMITTED = "verified", "submitted"


def submission_digest(folder: Path) -> str:
    """One sha256 over submission.yaml and every file under results/ (names included)."""
    folder = Path(folder)
    digests = {f"{schema.RESULTS_DIR}/{rel}": d for rel, d in
               integrity.folder_digests(folder / schema.RESULTS_DIR).items()}
    sub = folder / schema.SUBMISSION_FILE
    if sub.is_file() and not sub.is_symlink():
        digests[schema.SUBMISSION_FILE] = integrity.file_sha256(sub)
    return integrity.combined_digest(digests)


def selection_seed(nonce: str, digest: str) -> int:
    return int(hashlib.sha256(f"{nonce}:{digest}".encode()).hexdigest()[:16], 16)


def choose(cells: list, k: int, seed: int) -> list:
    """The `k` cells (in grid order as given) that seed `seed` draws."""
    return random.Random(seed).sample(list(cells), min(k, len(cells)))


def detection_probability(rerun: int, cells: int, tampered: int = 1) -> float:
    """The probability that at least one of `tampered` altered cells is among `rerun` cells drawn
    uniformly without replacement from `cells`: 1 - C(cells - tampered, rerun) / C(cells, rerun)."""
    if cells <= 0 or rerun <= 0 or tampered <= 0:
        return 0.0
    rerun, tampered = min(rerun, cells), min(tampered, cells)
    return 1.0 - math.comb(cells - tampered, rerun) / math.comb(cells, rerun)


def cells_for(probability: float, cells: int) -> int:
    """The fewest re-run cells that catch one tampered cell with at least `probability`."""
    return min(cells, math.ceil(probability * cells - 1e-9))


def tolerance_for(metric: str, tolerance: Tolerance) -> float:
    """`auc` on the metrics whose whole range is at most 1 (AUC), `points` on the 0-100 scales."""
    spec = metric_catalog.BY_NAME.get(metric)
    narrow = spec is not None and spec.high - spec.low <= 1
    return tolerance.auc if narrow else tolerance.points


def measured(metrics: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """metric -> {measured field -> value} of a result's metric rows (the numbers a re-run compares)."""
    fields = integrity.measured_fields()
    out = {}
    for name, row in metrics.items():
        values = row.model_dump() if hasattr(row, "model_dump") else dict(row)
        out[name] = {f: values.get(f) for f in fields}
    return out


def compare(submitted: dict[str, dict[str, float | None]], rerun: dict[str, dict[str, float | None]],
            tolerance: Tolerance) -> tuple[list[str], float]:
    """Mismatches between submitted and re-run measurements (see `measured`), and the largest
    |submitted - re-run| as a multiple of its tolerance."""
    mismatches, worst = [], 0.0
    for name in sorted(set(submitted) | set(rerun)):
        a, b = submitted.get(name), rerun.get(name)
        if a is None or b is None:
            mismatches.append(f"{name}: {'absent from the submitted result' if a is None else 'not measured by the re-run'}")
            continue
        tol = tolerance_for(name, tolerance)
        for field in sorted(set(a) | set(b)):
            x, y = a.get(field), b.get(field)
            if x is None and y is None:
                continue
            if x is None or y is None:
                mismatches.append(f"{name}.{field}: submitted {x}, re-run {y}")
                continue
            ratio = abs(x - y) / tol
            worst = max(worst, ratio)
            if not ratio <= 1:
                mismatches.append(f"{name}.{field}: submitted {x:.4g}, re-run {y:.4g} (|difference| "
                                  f"{abs(x - y):.3g} > tolerance {tol:g})")
    return mismatches, worst


@dataclass(frozen=True)
class CellState:
    badge: str      # VERIFIED or SUBMITTED
    note: str


def cell_state(record: Verification | None, run_id: str, sha256: str, metrics: dict[str, Any]) -> CellState:
    """Whether one submitted cell (its run_id, the sha256 of its file as read now, its metric rows) is
    verified by `record`."""
    if record is None:
        return CellState(SUBMITTED, "not re-run: no verification record")
    cell: RerunCell | None = next((c for c in record.cells if c.run_id == run_id), None)
    if cell is None:
        return CellState(SUBMITTED, f"not among the {len(record.cells)} of {record.cells_in_grid} cells re-run")
    if cell.submitted_sha256 != sha256:
        return CellState(SUBMITTED, "re-run, but its result file changed after verification")
    if cell.error is not None:
        return CellState(SUBMITTED, f"the re-run failed: {cell.error}")
    mismatches, _ = compare(measured(metrics), cell.rerun, record.tolerance)
    if mismatches:
        return CellState(SUBMITTED, f"re-run and did not match: {mismatches[0]}"
                         + (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""))
    return CellState(VERIFIED, f"re-run on {record.date:%Y-%m-%d} and matched within {record.tolerance.points:g} "
                               f"points / {record.tolerance.auc:g} AUC")


def describe(record: Verification, verified: int, cells: int) -> str:
    """One line for a submission: how many of its cells are verified and what the draw could catch."""
    k = len(record.cells)
    return (f"{verified} of {cells} cells verified: {k} of {record.cells_in_grid} re-run by `qubench verify` on "
            f"{record.date:%Y-%m-%d}; one tampered cell would have been caught with probability "
            f"{record.detection_probability:.0%}")
