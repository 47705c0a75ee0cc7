"""Load result files from folder trees, as untrusted input.

Nothing here imports or runs a submission's code: files are read as bytes, parsed as JSON or
YAML (safe loader) and validated against qubench's own schemas. A file that does not validate,
whose run_id is not the hash of its spec, or whose gap/recovery do not follow from its numbers is
listed in `Board.rejected` with the reason; loading never raises for a bad file.

Sources:
- a results folder (a grid's output, e.g. the shipped reference grid). A folder with a
  MANIFEST.yaml written by `leaderboard/ship_reference.py` is the project's reference.
- a submissions folder: every sub-folder with a submission.yaml; its results/ are read and it is
  verified when its verification.yaml says so and still matches the files (digest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench.results import RunResult
from qubench.submissions import integrity, schema

REFERENCE_MANIFEST = "MANIFEST.yaml"
Badge = Literal["reference", "verified", "not verified"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(Strict):
    name: str
    kind: Literal["reference", "submission", "results"]
    folder: str
    badge: Badge
    note: str = ""                          # why the badge is what it is
    package: str | None = None              # a submission's plugin distribution
    version: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)  # manifest / submission.yaml / verification, as read

    @property
    def verified(self) -> bool:
        """Reference results (produced by the project itself) count as verified."""
        return self.badge in ("reference", "verified")


class Run(Strict):
    key: str          # "<source>/<path>": the address of its detail page
    source: str
    path: str         # relative to the source folder
    sha256: str
    text: str         # the file as read, for download
    result: RunResult


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


def load_board(results: list[Path] | tuple[Path, ...] = (), submissions: Path | None = None) -> Board:
    board = Board()
    for folder in results:
        _load_results_folder(board, Path(folder))
    if submissions is not None and Path(submissions).is_dir():
        for folder in sorted(p for p in Path(submissions).iterdir() if p.is_dir() and not p.name.startswith(".")):
            _load_submission(board, folder)
    return board


def signature(results: list[Path] | tuple[Path, ...] = (), submissions: Path | None = None) -> str:
    """Changes whenever a file under the sources changes (cache key for the page)."""
    parts = []
    for root in [*results, *([submissions] if submissions else [])]:
        root = Path(root)
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    parts.append((str(p), st.st_mtime_ns, st.st_size))
    return integrity.combined_digest({str(i): repr(p) for i, p in enumerate(parts)})


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
    if manifest_path.exists():
        try:
            manifest = schema.read_yaml(manifest_path)
            if not isinstance(manifest, dict):
                raise ValueError("not a mapping")
        except Exception as exc:  # untrusted file: any parse failure is a rejection
            board.rejected.append(Rejected(path=str(manifest_path), reason=f"unreadable manifest: {exc}"))
            manifest = None
    else:
        manifest = None
    if manifest is not None:
        source = Source(name=_unique_name(board, "reference"), kind="reference", folder=str(folder), badge="reference",
                        note="the project's own results of `qubench grid` (see the manifest)", details=manifest)
    else:
        source = Source(name=_unique_name(board, folder.name or "results"), kind="results", folder=str(folder),
                        badge="not verified", note="local results: nobody re-ran them")
    board.sources.append(source)
    _load_runs(board, source, folder)


def _load_submission(board: Board, folder: Path) -> None:
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
    results_dir = folder / schema.RESULTS_DIR
    badge, note, verification = _verification_state(folder, results_dir)
    source = Source(name=_unique_name(board, sub.name), kind="submission", folder=str(folder), badge=badge,
                    note=note, package=sub.package.name, version=sub.package.version,
                    details={"submission": sub.model_dump(mode="json"), "verification": verification})
    board.sources.append(source)
    _load_runs(board, source, results_dir)


def _verification_state(folder: Path, results_dir: Path) -> tuple[Badge, str, dict | None]:
    try:
        ver = schema.load_verification(folder)
    except ValueError as exc:
        return "not verified", f"verification record rejected: {exc}", None
    if ver is None:
        return "not verified", "not re-run by `qubench verify` yet", None
    record = ver.model_dump(mode="json")
    if ver.submission != folder.name:
        return "not verified", "verification record names another submission", record
    if ver.results_digest != integrity.combined_digest(integrity.folder_digests(results_dir)):
        return "not verified", "results changed after verification", record
    if not ver.verified:
        return "not verified", f"verification failed on {sum(not c.matches for c in ver.cells)} re-run cell(s)", record
    return "verified", (f"{len(ver.cells)} of {ver.cells_in_grid} cells re-run on {ver.date:%Y-%m-%d}, within "
                        f"{ver.tolerance.points:g} points / {ver.tolerance.auc:g} AUC"), record


def _load_runs(board: Board, source: Source, folder: Path) -> None:
    if not folder.is_dir():
        board.rejected.append(Rejected(path=str(folder), reason="no results folder"))
        return
    seen: dict[str, str] = {}
    for path in integrity.result_files(folder):
        rel = path.relative_to(folder)
        shown = f"{source.name}/{rel.as_posix()}"
        result, text, reason = integrity.read_result(path)
        if reason is None and result.run_id in seen:
            reason = f"duplicate of {seen[result.run_id]} (same run_id)"
        if reason is not None:
            board.rejected.append(Rejected(path=shown, reason=reason))
            continue
        seen[result.run_id] = rel.as_posix()
        run = Run(key=shown, source=source.name, path=rel.as_posix(), sha256=integrity.file_sha256(path), text=text,
                  result=result)
        (board.runs if result.status == "ok" else board.failed).append(run)
