"""Checks of result files that need no plugin code: digests, spec hashes, derived fields.

Used by `qubench validate` and by the leaderboard, which must never import or run a submission's
code. A digest detects accidental or naive edits only: anyone can recompute it after editing a
number. Re-running cells (`qubench verify`) is the real check.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from pydantic import ValidationError

from qubench import metric_catalog
from qubench.results import RunResult, catalogued_row

MAX_RESULT_BYTES = 5_000_000
#: Files a grid writes beside its cells that are not results.
GRID_FILES = frozenset({"grid.json", "aggregate.json", "last_run.json"})
#: How closely a stored gap/recovery/target_change must follow from the stored pre/post/target values
#: (they are computed from those very numbers, so only float rounding is allowed).
DERIVED_TOLERANCE = 1e-6
#: The fields of a metric row computed from its measurements (results.metric_row), re-derived here.
DERIVED_FIELDS = ("gap", "recovery", "target_change", "position_pre", "position_post", "controlled_recovery")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder` (hidden files and folders such as lock files skipped),
    keyed by its POSIX path relative to `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = file_sha256(path)
    return out


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


def metric_problems(result: RunResult) -> list[str]:
    """Non-finite numbers, gaps/recoveries/target changes that do not follow from the stored measurements
    (only forget metrics have a recovery), and a separation that does not follow from them."""
    problems = []
    for name, row in result.metrics.items():
        values = {k: v for k, v in row.model_dump().items() if not k.endswith("_note")}  # the numbers
        bad = [k for k, v in values.items() if v is not None and not math.isfinite(v)]
        if bad:
            problems.append(f"metric {name}: non-finite {', '.join(bad)}")
            continue
        if name not in metric_catalog.BY_NAME:
            problems.append(f"metric {name}: not a qubench metric (known: {', '.join(metric_catalog.BY_NAME)})")
            continue
        expected = catalogued_row(name, row.pre, row.post, row.target_pre, row.target_post, row.retrain,
                                  row.retrain_post)
        for field in DERIVED_FIELDS:
            if not _close(getattr(row, field), getattr(expected, field)):
                problems.append(f"metric {name}: {field} {getattr(row, field)!r} does not follow from its "
                                f"pre/post/target values (expected {getattr(expected, field)!r})")
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
    """Every JSON file under `folder` that should be a result: all but the grid's own files and
    hidden ones (locks, temporaries of an interrupted write)."""
    folder = Path(folder)
    return [p for p in sorted(folder.rglob("*.json"))
            if p.name not in GRID_FILES and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def read_result(path: Path) -> tuple[RunResult | None, str, str | None]:
    """(result, text, None) for a valid result file, else (None, "", reason)."""
    try:
        size = path.stat().st_size
        if size > MAX_RESULT_BYTES:
            return None, "", f"file is {size} bytes, more than the {MAX_RESULT_BYTES} a result can have"
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, "", f"unreadable: {type(exc).__name__}: {exc}"
    try:
        json.loads(text)
    except ValueError as exc:
        return None, "", f"not JSON: {exc}"
    try:
        result = RunResult.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors()
        shown = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        return None, "", f"not a qubench result: {shown}{more}"
    problems = [p for p in [spec_hash_problem(result), *metric_problems(result)] if p]
    if problems:
        return None, "", "; ".join(problems)
    return result, text, None
