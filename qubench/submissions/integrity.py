"""Checks of result files that need no plugin code: digests, spec hashes, derived fields.

Used by `qubench validate` and by the leaderboard, which must never import or run a submission's
code. A digest detects accidental or naive edits only: anyone can recompute it after editing a
number. Re-running cells (`qubench verify`) is the real check.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qubench import metric_catalog, untrusted
from qubench.results import MetricRow, RunResult, catalogued_row

MAX_RESULT_BYTES = 5_000_000
#: Files a grid writes beside its cells that are not results.
GRID_FILES = frozenset({"grid.json", "aggregate.json", "last_run.json"})
#: How closely a stored gap/recovery/target_change must follow from the stored pre/post/target values
#: (they are computed from those very numbers, so only float rounding is allowed).
DERIVED_TOLERANCE = 1e-6


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in chunks, never through a symlink."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder` (hidden files and folders such as lock files skipped,
    symlinks never followed: `symlinks` lists them), keyed by its POSIX path relative to `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    files, _ = untrusted.walk(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def symlinks(folder: Path) -> list[Path]:
    """Symlinks under `folder` (files or folders): refused wherever results are read."""
    return untrusted.walk(folder)[1] if Path(folder).is_dir() else []


def combined_digest(digests: dict[str, str]) -> str:
    """One digest for a whole set of files (names included)."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def spec_hash_problem(result: RunResult) -> str | None:
    expected = result.spec.run_id()
    if result.run_id != expected:
        return (f"run_id {result.run_id} is not the hash of the spec in the file ({expected}): "
                "the spec or the run_id was edited")
    return None


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= DERIVED_TOLERANCE * max(1.0, abs(a), abs(b))


def measured_fields() -> tuple[str, ...]:
    """The fields of a metric row that hold the metric's own measured value: the inputs of
    `results.catalogued_row`. Every other number in the row is derived from them (gap, recovery and
    whatever the row gains later), so it is checked by recomputing it, and these against the range the
    metric catalogue gives the metric."""
    return tuple(p for p in inspect.signature(catalogued_row).parameters if p in MetricRow.model_fields)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_finite(value: Any, where: str) -> str | None:
    """The first non-finite number inside `value` (nested dicts and lists), named by its path."""
    if _is_number(value):
        return None if math.isfinite(value) else f"{where} = {value!r}"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}")
        if found:
            return found
    return None


def metric_problems(result: RunResult) -> list[str]:
    """Numbers a real run cannot produce: non-finite values anywhere in the measurements, measured
    values outside their metric's valid range (metric catalogue), derived fields (gap, recoveries,
    positions, ...) that do not follow from the stored measurements, and a separation that does not
    follow from them."""
    problems = []
    measured = measured_fields()
    for name, row in result.metrics.items():
        values = row.model_dump()
        bad = [k for k, v in values.items() if _is_number(v) and not math.isfinite(v)]
        if bad:
            problems.append(f"metric {name}: non-finite {', '.join(bad)}")
            continue
        if name not in metric_catalog.BY_NAME:
            problems.append(f"metric {name}: not a qubench metric (known: {', '.join(metric_catalog.BY_NAME)})")
            continue
        spec = metric_catalog.get(name)
        outside = [f"{k} = {values[k]:g}" for k in measured
                   if values.get(k) is not None and not spec.low <= values[k] <= spec.high]
        if outside:
            problems.append(f"metric {name}: {', '.join(outside)} outside the valid range [{spec.low:g}, "
                            f"{spec.high:g}] of {name}")
            continue
        expected = catalogued_row(name, **{k: values[k] for k in measured}).model_dump()
        for field, value in values.items():
            if field in measured or not (_is_number(value) or _is_number(expected.get(field))):
                continue
            if not _close(value, expected.get(field)):
                problems.append(f"metric {name}: {field} {value!r} does not follow from its measured values "
                                f"(expected {expected.get(field)!r})")
    dump = result.model_dump(include={"diagnostics", "timings", "probes"})
    for part in ("diagnostics", "timings", "probes"):
        found = _non_finite(dump.get(part), part)
        if found:
            problems.append(f"non-finite {found}")
    negative = [k for k, v in result.timings.items() if v < 0]
    if negative:
        problems.append(f"negative timings: {', '.join(negative)}")
    share = result.diagnostics.quantized_disagreement
    if share is not None and math.isfinite(share) and not 0 <= share <= 1:
        problems.append(f"diagnostics.quantized_disagreement = {share:g} is not a share in [0, 1]")
    return problems + separation_problems(result)


def separation_problems(result: RunResult) -> list[str]:
    """A stored separation must follow from the stored target/retrain values and its own thresholds
    (recorded per metric, so a file stays valid when a later qubench changes the thresholds)."""
    sep = result.separation
    if sep is None:
        return []
    problems = []
    for check in sep.metrics:
        row = result.metrics.get(check.metric)
        ref_row = result.metrics.get(check.reference_metric) if check.reference_metric else None
        metric = metric_catalog.BY_NAME.get(check.metric)
        if row is None or metric is None:
            problems.append(f"separation: {check.metric} is not a measured qubench metric of this result")
            continue
        reference = (None if ref_row is None else ref_row.retrain if check.reference_kind == "retrain"
                     else ref_row.target_pre)
        margin = None if reference is None or row.target_pre is None else (row.target_pre - reference) * metric.memorised
        separated = None if margin is None else margin >= check.threshold
        if not (_close(check.target, row.target_pre) and _close(check.reference, reference)
                and _close(check.margin, margin) and check.separated == separated):
            problems.append(f"separation of {check.metric} does not follow from its target/retrain values "
                            f"(expected margin {margin!r}, separated {separated!r})")
    flags = [c.separated for c in sep.metrics if c.separated is not None]
    status = ("unchecked" if not flags else "separated" if all(flags) else "not separated" if not any(flags)
              else "partly separated")
    if sep.status != status:
        problems.append(f"separation status {sep.status!r} does not follow from its metrics (expected {status!r})")
    return problems


def result_files(folder: Path) -> list[Path]:
    """Every file under `folder` that should be a result: the JSON files but the grid's own files and
    hidden ones (locks, temporaries of an interrupted write), and every symlink, so that reading it
    rejects it by name rather than leaving it out silently."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files, links = untrusted.walk(folder)
    return sorted([p for p in files if p.suffix == ".json" and p.name not in GRID_FILES] + links)


def read_result(path: Path, root: Path | None = None) -> tuple[RunResult | None, str, str | None]:
    """(result, text, None) for a valid result file, else (None, "", reason). Never raises for a bad
    file: its size and nesting are bounded before parsing, and a symlink (the file, or a folder between
    `root` and it) is refused."""
    try:
        _, text = untrusted.read_json(Path(path), MAX_RESULT_BYTES, root)
    except untrusted.UntrustedFileError as exc:
        return None, "", str(exc)
    try:
        result = RunResult.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors()
        shown = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        return None, "", f"not a qubench result: {shown}{more}"
    except (ValueError, RecursionError) as exc:  # defensive: whatever else the parser may say
        return None, "", f"not a qubench result: {exc}"
    problems = [p for p in [spec_hash_problem(result), *metric_problems(result)] if p]
    if problems:
        return None, "", "; ".join(problems)
    return result, text, None
