"""`qubench verify submissions/<name> --cells N`: re-run N randomly chosen cells of a submission and
compare every measured number with the submitted one.

The re-runs recompute unlearning, quantization and every evaluation in a scratch cache; only the
task data and the project's own target/retrain models are reused from the cache, since they do
not depend on the submission. A cell matches when every metric's pre, post, target_pre,
target_post and retrain value is within the tolerance (absolute: `points` on the 0-100 scales,
`auc` on AUC); gap and recovery follow from those (validate checks that they do). The cells are
drawn with a fresh random seed unless one is given, so a submitter cannot know which will be checked.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import invalidate_caches
from pathlib import Path

from qubench import pipeline, store
from qubench.env import git_state, library_versions
from qubench.errors import ConfigError
from qubench.results import RunResult
from qubench.stages import Download, TaskData, TrainedModels
from qubench.submissions import integrity, schema
from qubench.submissions.install import install_into
from qubench.submissions.schema import CellCheck, Submission, Tolerance, Verification

Log = Callable[[str], None]
DEFAULT_TOLERANCE = Tolerance(points=1.0, auc=0.01)
COMPARED = ("pre", "post", "target_pre", "target_post", "retrain")
#: Stages shared from the existing cache: they depend on the task only, never on the submission.
SHARED_KINDS = (TaskData.kind, Download.kind, TrainedModels.kind)


def compare(stored: RunResult, rerun: RunResult, tolerance: Tolerance) -> tuple[list[str], float]:
    """Mismatches, and the largest |stored - re-run| as a multiple of its tolerance."""
    mismatches, worst = [], 0.0
    for name in sorted(set(stored.metrics) | set(rerun.metrics)):
        a, b = stored.metrics.get(name), rerun.metrics.get(name)
        if a is None or b is None:
            mismatches.append(f"{name}: {'absent from the submitted result' if a is None else 'not measured by the re-run'}")
            continue
        tol = tolerance.auc if name.endswith("_auc") else tolerance.points
        for field in COMPARED:
            x, y = getattr(a, field), getattr(b, field)
            if x is None and y is None:
                continue
            if x is None or y is None:
                mismatches.append(f"{name}.{field}: submitted {x}, re-run {y}")
                continue
            ratio = abs(x - y) / tol
            worst = max(worst, ratio)
            if ratio > 1:
                mismatches.append(f"{name}.{field}: submitted {x:.4g}, re-run {y:.4g} (|difference| "
                                  f"{abs(x - y):.3g} > tolerance {tol:g})")
    return mismatches, worst


@contextmanager
def scratch_home() -> Iterator[Path]:
    """A fresh QUBENCH_HOME that shares only the task data and target/retrain models of the current one."""
    current = store.home()
    scratch = Path(tempfile.mkdtemp(prefix="qubench-verify-"))
    for kind in SHARED_KINDS:
        (current / kind).mkdir(parents=True, exist_ok=True)
        (scratch / kind).symlink_to(current / kind, target_is_directory=True)
    previous = os.environ.get("QUBENCH_HOME")
    os.environ["QUBENCH_HOME"] = str(scratch)
    try:
        yield scratch
    finally:
        if previous is None:
            os.environ.pop("QUBENCH_HOME", None)
        else:
            os.environ["QUBENCH_HOME"] = previous
        shutil.rmtree(scratch, ignore_errors=True)  # removes the links, not what they point at


def make_importable(folder: Path, sub: Submission) -> None:
    """Install the package into a scratch folder first on sys.path (the running environment stays as it was)."""
    target = Path(tempfile.mkdtemp(prefix=f"qubench-plugin-{sub.package.name}-"))
    install_into(folder, sub, target)
    sys.path.insert(0, str(target))
    invalidate_caches()


def _check_method_package(sub: Submission) -> None:
    from qubench.submissions.submit import distribution_of, method_entry_point

    package, version = distribution_of(method_entry_point(sub.method.name))
    if (package, version) != (sub.package.name, sub.package.version):
        raise ConfigError(f"method {sub.method.name!r} is provided here by {package} {version}, but the submission "
                          f"declares {sub.package.name} {sub.package.version}; install the declared version or "
                          "drop --no-install")


def verify(folder: Path, cells: int = 1, seed: int | None = None, tolerance: Tolerance = DEFAULT_TOLERANCE,
           install: bool = True, device: str = "auto", log: Log = lambda msg: None) -> Verification:
    from qubench.device import resolve as resolve_device
    from qubench.env import hardware
    from qubench.grid.plan import all_cells, expand
    from qubench.grid.spec import parse_spec

    folder = Path(folder)
    try:
        sub = schema.load_submission(folder)
    except ValueError as exc:
        raise ConfigError(f"{folder}: {exc}") from None
    if cells < 1:
        raise ConfigError("--cells must be at least 1")
    device = resolve_device(device)  # a GPU that is not there fails here, before anything is installed
    grid = parse_spec(sub.preset.grid, f"{schema.SUBMISSION_FILE} preset.grid")
    results_dir = folder / schema.RESULTS_DIR
    stored: dict[str, tuple[Path, RunResult]] = {}
    for path in integrity.result_files(results_dir):
        result, _, reason = integrity.read_result(path)
        if result is not None and result.status == "ok":
            stored[result.run_id] = (path, result)
    grid_cells = all_cells(expand(grid))
    missing = [c.id for c in grid_cells if c.spec.run_id() not in stored]
    if missing:
        raise ConfigError(f"{len(missing)} cell(s) have no valid ok result ({', '.join(missing[:5])}); "
                          f"run `qubench validate {folder}` for the details")
    if install:
        make_importable(folder, sub)
    _check_method_package(sub)

    seed = secrets.randbits(32) if seed is None else seed
    chosen = random.Random(seed).sample(grid_cells, min(cells, len(grid_cells)))
    checks = []
    with scratch_home():
        for cell in chosen:
            path, result = stored[cell.spec.run_id()]
            log(f"re-running {cell.id} ...")
            with tempfile.TemporaryDirectory(prefix="qubench-verify-results-") as out:
                try:
                    rerun = pipeline.run(cell.spec, Path(out), force=True, log=lambda msg: None, progress=False,
                                         device=device)
                except pipeline.RunFailed as exc:
                    mismatches, worst = [f"the re-run failed: {exc}"], None
                else:
                    mismatches, worst = compare(result, rerun, tolerance)
            check = CellCheck(cell=cell.id, run_id=cell.spec.run_id(), result_file=str(path.relative_to(folder)),
                              matches=not mismatches, max_deviation=worst, mismatches=mismatches)
            log(f"{cell.id}: {'matches' if check.matches else 'DOES NOT MATCH'}"
                + (f" (largest difference {worst:.2f} x tolerance)" if worst is not None else ""))
            checks.append(check)
    git = git_state()
    record = Verification(
        submission=sub.name, verified=all(c.matches for c in checks), cells_in_grid=len(grid_cells), cells=checks,
        selection_seed=seed, tolerance=tolerance,
        results_digest=integrity.combined_digest(integrity.folder_digests(results_dir)),
        verified_by=schema.Producer(qubench_version=library_versions().get("qubench"), git_commit=git.get("commit"),
                                    git_dirty=git.get("dirty")),
        note=("cells re-run from scratch (unlearning, quantization, evaluation) with the task data and "
              "target/retrain models of the verifier's cache"),
        device={**device.record(), "hardware": hardware()},
    )
    schema.dump_yaml(record, folder / schema.VERIFICATION_FILE)
    return record
