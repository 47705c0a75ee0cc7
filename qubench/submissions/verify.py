"""`qubench verify submissions/<name> --cells N`: re-run N cells of a submission and compare every
measured number with the submitted one; the record goes to the maintainers' folder
(`leaderboard/verifications/<name>.yaml`), never into the submission.

The re-runs recompute unlearning, quantization and every evaluation in a scratch cache; only the
task data and the project's own target/retrain models are reused from the cache, since they do
not depend on the submission. A cell matches when every measured value of every metric (pre, post,
target_pre, target_post, retrain, ...: `integrity.measured_fields`) is within the tolerance
(absolute: `points` on the 0-100 scales, `auc` on AUC); derived fields follow from those (validate
checks that they do). The record carries the re-run's own numbers, so the leaderboard repeats the
comparison itself. The cells are drawn from a seed derived from a nonce drawn now and the digest of
the submission as it is now (`verification.selection_seed`): a submitter cannot know them in advance.
"""

from __future__ import annotations

import os
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
from qubench.submissions import integrity, schema, verification
from qubench.submissions.install import install_into
from qubench.submissions.schema import RerunCell, Selection, Submission, Tolerance, Verification

Log = Callable[[str], None]
DEFAULT_TOLERANCE = Tolerance(points=1.0, auc=0.01)
#: Stages shared from the existing cache: they depend on the task only, never on the submission.
SHARED_KINDS = (TaskData.kind, Download.kind, TrainedModels.kind)


def compare(stored: RunResult, rerun: RunResult, tolerance: Tolerance) -> tuple[list[str], float]:
    """Mismatches, and the largest |stored - re-run| as a multiple of its tolerance."""
    return verification.compare(verification.measured(stored.metrics), verification.measured(rerun.metrics),
                                tolerance)


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
           install: bool = True, device: str = "auto", log: Log = lambda msg: None,
           verifications: Path = Path(schema.VERIFICATIONS_DIR)) -> Verification:
    """Re-run `cells` cells of the submission in `folder` and write the record to
    `verifications/<name>.yaml`. `seed` replaces the fresh nonce (tests, or repeating a draw)."""
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
    if sub.name != folder.name:
        raise ConfigError(f"{folder}: its submission.yaml names {sub.name!r}; run `qubench validate {folder}`")
    grid = parse_spec(sub.preset.grid, f"{schema.SUBMISSION_FILE} preset.grid")
    results_dir = folder / schema.RESULTS_DIR
    stored: dict[str, tuple[Path, RunResult]] = {}
    for path in integrity.result_files(results_dir):
        result, _, reason = integrity.read_result(path, results_dir)
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

    digest = verification.submission_digest(folder)
    nonce = secrets.token_hex(16) if seed is None else str(seed)
    selection = Selection(nonce=nonce, submission_digest=digest, seed=verification.selection_seed(nonce, digest))
    chosen = verification.choose(grid_cells, cells, selection.seed)
    checks = []
    with scratch_home():
        for cell in chosen:
            path, result = stored[cell.spec.run_id()]
            sha256 = integrity.file_sha256(path)
            log(f"re-running {cell.id} ...")
            with tempfile.TemporaryDirectory(prefix="qubench-verify-results-") as out:
                rerun_numbers, error = {}, None
                try:  # a fresh results folder and a scratch cache: every submission-specific stage is built anew
                    rerun = pipeline.run(cell.spec, Path(out), log=lambda msg: None, progress=False, device=device)
                except pipeline.RunFailed as exc:
                    mismatches, worst, error = [f"the re-run failed: {exc}"], None, str(exc)
                else:
                    rerun_numbers = verification.measured(rerun.metrics)
                    mismatches, worst = compare(result, rerun, tolerance)
            check = RerunCell(cell=cell.id, run_id=cell.spec.run_id(), result_file=path.relative_to(folder).as_posix(),
                              submitted_sha256=sha256, rerun=rerun_numbers, error=error, matches=not mismatches,
                              max_deviation=worst, mismatches=mismatches)
            log(f"{cell.id}: {'matches' if check.matches else 'DOES NOT MATCH'}"
                + (f" (largest difference {worst:.2f} x tolerance)" if worst is not None else ""))
            checks.append(check)
    git = git_state()
    record = Verification(
        submission=sub.name, verified=all(c.matches for c in checks), cells_in_grid=len(grid_cells), cells=checks,
        selection=selection, detection_probability=verification.detection_probability(len(checks), len(grid_cells)),
        tolerance=tolerance,
        verified_by=schema.Producer(qubench_version=library_versions().get("qubench"), git_commit=git.get("commit"),
                                    git_dirty=git.get("dirty")),
        note=("cells re-run from scratch (unlearning, quantization, evaluation) with the task data and "
              "target/retrain models of the verifier's cache"),
        device={**device.record(), "hardware": hardware()},
    )
    schema.dump_yaml(record, schema.verification_path(verifications, sub.name))
    return record
