"""Load result files from folder trees, as untrusted input.

Nothing here imports or runs a submission's code: files are read as bytes, parsed as JSON or
YAML (safe loader) and validated against qubench's own schemas. A file that does not validate,
whose run_id is not the hash of its spec, or whose gap/recovery do not follow from its numbers is
listed in `Board.rejected` with the reason; loading never raises for a bad file.

Sources:
- a results folder (a grid's output, e.g. the shipped reference grid). A folder with a
  MANIFEST.yaml written by `leaderboard/ship_reference.py` is the project's reference.
- a submissions folder: every sub-folder with a submission.yaml; its results/ are read. Each of its
  cells is *verified* when the maintainers' record (`leaderboard/verifications/<name>.yaml`, written
  by `qubench verify`, never by the submitter) re-ran it and its numbers still match the re-run's,
  else *submitted* (`qubench.submissions.verification`). A verification file inside a submission
  folder is never read.

Every file is read bounded (size and nesting limits before parsing, `qubench.untrusted`) and
symlinks are refused, so one hostile file is one rejected line, never a page that falls over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench.results import RunResult
from qubench.submissions import integrity, schema, verification

REFERENCE_MANIFEST = "MANIFEST.yaml"
#: reference: the project's own runs; verified: re-run by `qubench verify` and matched; submitted: a
#: submission's cell nobody re-ran (or that no longer matches); not verified: a local results folder.
Badge = Literal["reference", "verified", "submitted", "not verified"]
TRUSTED_BADGES = ("reference", "verified")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(Strict):
    name: str
    kind: Literal["reference", "submission", "results"]
    folder: str
    badge: Badge                            # the source as a whole: verified only if every cell is
    note: str = ""                          # why the badge is what it is (how many cells are verified)
    package: str | None = None              # a submission's plugin distribution
    version: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)  # manifest / submission.yaml / verification, as read

    @property
    def verified(self) -> bool:
        """Reference results (produced by the project itself) count as verified."""
        return self.badge in TRUSTED_BADGES


class Run(Strict):
    key: str          # "<source>/<path>": the address of its detail page
    source: str
    path: str         # relative to the source folder
    sha256: str
    text: str         # the file as read, for download
    result: RunResult
    badge: Badge      # this cell's own: reference, verified (re-run and matched), submitted, not verified
    badge_note: str = ""

    @property
    def verified(self) -> bool:
        return self.badge in TRUSTED_BADGES


class Rejected(Strict):
    path: str
    reason: str


class Board(Strict):
    sources: list[Source] = Field(default_factory=list)
    runs: list[Run] = Field(default_factory=list)      # status ok
    failed: list[Run] = Field(default_factory=list)    # well-formed results of runs that failed
    rejected: list[Rejected] = Field(default_factory=list)

    def run(self, key: str) -> Run | None:
        return next((r for r in self.runs + self.failed if r.key == key), None)

    def source(self, name: str) -> Source | None:
        return next((s for s in self.sources if s.name == name), None)


def load_board(results: list[Path] | tuple[Path, ...] = (), submissions: Path | None = None,
               verifications: Path | None = None) -> Board:
    """Every source, read as untrusted input. `verifications` is the maintainers' folder of verification
    records (None: no submission cell is verified)."""
    board = Board()
    for folder in results:
        _guarded(board, Path(folder), lambda f=Path(folder): _load_results_folder(board, f))
    if submissions is not None and Path(submissions).is_dir():
        for folder in sorted(p for p in Path(submissions).iterdir() if not p.name.startswith(".")):
            if folder.is_symlink():
                board.rejected.append(Rejected(path=str(folder), reason="symlink refused (a submission must be a "
                                                                        "plain folder)"))
            elif folder.is_dir():
                _guarded(board, folder, lambda f=folder: _load_submission(board, f, verifications))
    return board


def _guarded(board: Board, folder: Path, load) -> None:
    """Run `load`; anything it did not foresee rejects the folder with the error's type and message
    (never a traceback on the page)."""
    try:
        load()
    except Exception as exc:  # noqa: BLE001 - untrusted input: the page must stay up whatever it holds
        board.rejected.append(Rejected(path=str(folder), reason=f"could not be read: {type(exc).__name__}: {exc}"))


def signature(results: list[Path] | tuple[Path, ...] = (), submissions: Path | None = None,
              verifications: Path | None = None) -> str:
    """Changes whenever a file under the sources changes (cache key for the page)."""
    parts = []
    for root in [*results, *([submissions] if submissions else []), *([verifications] if verifications else [])]:
        root = Path(root)
        if root.is_dir():
            for top, _, names in os.walk(root, followlinks=False):
                for name in sorted(names):
                    try:
                        st = os.lstat(os.path.join(top, name))
                    except OSError:
                        continue
                    parts.append((os.path.join(top, name), st.st_mtime_ns, st.st_size))
    return integrity.combined_digest({str(i): repr(p) for i, p in enumerate(sorted(parts))})


def _unique_name(board: Board, name: str) -> str:
    taken = {s.name for s in board.sources}
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


def _load_results_folder(board: Board, folder: Path) -> None:
    if not folder.is_dir():
        board.rejected.append(Rejected(path=str(folder), reason="results folder does not exist"))
        return
    manifest_path = folder / REFERENCE_MANIFEST
    manifest = None
    if manifest_path.exists() or manifest_path.is_symlink():
        try:
            manifest = schema.read_yaml(manifest_path, folder)
            if not isinstance(manifest, dict):
                raise ValueError("not a mapping")
        except ValueError as exc:  # untrusted file: any parse failure is a rejection
            board.rejected.append(Rejected(path=str(manifest_path), reason=f"unreadable manifest: {exc}"))
            manifest = None
    if manifest is not None:
        source = Source(name=_unique_name(board, "reference"), kind="reference", folder=str(folder), badge="reference",
                        note="the project's own results of `qubench grid` (see the manifest)", details=manifest)
    else:
        source = Source(name=_unique_name(board, folder.name or "results"), kind="results", folder=str(folder),
                        badge="not verified", note="local results: nobody re-ran them")
    board.sources.append(source)
    _load_runs(board, source, folder)


def _load_submission(board: Board, folder: Path, verifications: Path | None) -> None:
    where = str(folder / schema.SUBMISSION_FILE)
    if not (folder / schema.SUBMISSION_FILE).exists():
        board.rejected.append(Rejected(path=str(folder), reason=f"no {schema.SUBMISSION_FILE}: not a submission"))
        return
    try:
        sub = schema.load_submission(folder)
    except ValueError as exc:
        board.rejected.append(Rejected(path=where, reason=f"invalid submission: {exc}"))
        return
    if sub.name != folder.name:
        board.rejected.append(Rejected(path=where, reason=f"name {sub.name!r} differs from its folder {folder.name!r}"))
        return
    record, problem = None, ""
    if verifications is not None:
        try:
            record = schema.load_verification(verifications, sub.name)
        except ValueError as exc:
            problem = f"verification record rejected: {exc}"
    if record is not None and record.submission != sub.name:
        record, problem = None, "verification record names another submission"
    source = Source(name=_unique_name(board, sub.name), kind="submission", folder=str(folder), badge="submitted",
                    note=problem or "not re-run by `qubench verify` yet", package=sub.package.name,
                    version=sub.package.version,
                    details={"submission": sub.model_dump(mode="json"),
                             "verification": record.model_dump(mode="json") if record else None})
    board.sources.append(source)
    runs = _load_runs(board, source, folder / schema.RESULTS_DIR, record, check_cells=True)
    if record is not None and runs:
        verified = sum(r.badge == verification.VERIFIED for r in runs)
        source.badge = "verified" if verified == len(runs) else "submitted"
        source.note = verification.describe(record, verified, len(runs))


def _load_runs(board: Board, source: Source, folder: Path, record=None, check_cells: bool = False) -> list[Run]:
    """Read every result under `folder` into the board; returns the runs read (ok and failed)."""
    if not folder.is_dir() or folder.is_symlink():
        board.rejected.append(Rejected(path=str(folder), reason="no results folder" if not folder.is_symlink()
                                       else "symlink refused (the results folder is a symbolic link)"))
        return []
    seen: dict[str, str] = {}
    loaded = []
    for path in integrity.result_files(folder):
        rel = path.relative_to(folder)
        shown = f"{source.name}/{rel.as_posix()}"
        result, text, reason = integrity.read_result(path, folder)
        if reason is None and result.run_id in seen:
            reason = f"duplicate of {seen[result.run_id]} (same run_id)"
        if reason is not None:
            board.rejected.append(Rejected(path=shown, reason=reason))
            continue
        seen[result.run_id] = rel.as_posix()
        sha256 = integrity.file_sha256(path)
        if check_cells:
            state = verification.cell_state(record, result.run_id, sha256, result.metrics)
            badge, note = state.badge, state.note
        else:
            badge, note = source.badge, source.note
        run = Run(key=shown, source=source.name, path=rel.as_posix(), sha256=sha256, text=text, result=result,
                  badge=badge, badge_note=note)
        (board.runs if result.status == "ok" else board.failed).append(run)
        loaded.append(run)
    return loaded
