"""The files of a submission folder, and the maintainers' verification records, as strict schemas
(unknown fields are errors).

    submissions/<name>/
      submission.yaml     what was submitted: package, entry point, grid, authors, licence, digests
      results/            the grid's output: cells/*.json (one RunResult each) and aggregate.json
    leaderboard/verifications/<name>.yaml
                          written by `qubench verify` only, outside the submitter's folder: the cells
                          re-run, the re-run's own numbers, how the cells were drawn

A submission folder holds no verification claim: `qubench validate` fails one that does, and the
leaderboard never reads one there. Reading these needs no plugin code, so the leaderboard can use
this module safely.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qubench import untrusted

SUBMISSION_SCHEMA_VERSION = "1.0"
# 2.0: records live outside the submission folder, carry the re-run numbers and how cells were drawn.
VERIFICATION_SCHEMA_VERSION = "2.0"
SUBMISSION_FILE = "submission.yaml"
#: Where `qubench verify` writes and the leaderboard reads verification records (relative to the
#: repository root; `--verifications` changes it).
VERIFICATIONS_DIR = "leaderboard/verifications"
RESULTS_DIR = "results"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MAX_YAML_BYTES = 1_000_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Package(Strict):
    name: str = Field(min_length=1)      # the distribution name, as pip knows it
    version: str = Field(min_length=1)
    # What `pip install` is given: a requirement ("qubench-foo==0.1.0") or a path relative to the
    # submission folder ("." when the package's pyproject lives in the folder).
    source: str = Field(min_length=1)


class Method(Strict):
    name: str = Field(min_length=1)          # the entry-point name in the `qubench.methods` group
    entry_point: str = Field(min_length=1)   # its value, "module:Class"
    params: dict[str, Any] = Field(default_factory=dict)


class Preset(Strict):
    name: str                                 # a built-in grid preset ("default"), or "custom"
    overrides: dict[str, Any] = Field(default_factory=dict)  # e.g. {"seeds": [0]}
    grid: dict[str, Any]                      # the exact grid spec that was run (qubench.grid.spec.GridSpec)


class Producer(Strict):
    qubench_version: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None


class Submission(Strict):
    schema_version: str = SUBMISSION_SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)  # equals the folder name
    description: str = ""
    authors: list[str] = Field(min_length=1)
    license: str = Field(min_length=1)
    package: Package
    method: Method
    preset: Preset
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    produced_by: Producer = Field(default_factory=Producer)
    # sha256 of every file under results/ at submit time. Anyone can recompute these after editing
    # a number, so they only catch accidental edits; `qubench verify` is the real check.
    results_sha256: dict[str, str] = Field(default_factory=dict)


class RerunCell(Strict):
    """One cell re-run by `qubench verify`: the submitted file it was compared with, and the re-run's
    own measurements, so anyone can repeat the comparison without re-running anything."""

    cell: str
    run_id: str
    result_file: str                     # relative to the submission folder
    submitted_sha256: str                # the submitted result file the re-run was compared with
    rerun: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # metric -> measured field -> value
    error: str | None = None             # the re-run failed: why
    matches: bool
    max_deviation: float | None = None   # largest |submitted - re-run| as a multiple of its tolerance
    mismatches: list[str] = Field(default_factory=list)


class Tolerance(Strict):
    points: float = Field(gt=0)   # absolute, on the 0-100 scales (ROUGE, accuracy, PrivLeak)
    auc: float = Field(gt=0)      # absolute, on AUC (0-1)


class Selection(Strict):
    """How the re-run cells were drawn: from a seed that follows from a nonce drawn when `verify` ran
    and the digest of the submission as it was then, so the submitter could not know them in advance
    and anyone can check that these cells follow from the record."""

    nonce: str
    submission_digest: str        # qubench.submissions.verification.submission_digest at verify time
    seed: int                     # verification.selection_seed(nonce, submission_digest)
    rule: str = "random.Random(seed).sample(grid cells in grid order, k)"


class Verification(Strict):
    schema_version: str = VERIFICATION_SCHEMA_VERSION
    submission: str
    verified: bool                # every re-run cell matched
    date: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    cells_in_grid: int = Field(ge=1)
    cells: list[RerunCell] = Field(min_length=1)
    selection: Selection
    #: The probability that one tampered cell would have been among those re-run (k / n).
    detection_probability: float = Field(ge=0, le=1)
    tolerance: Tolerance
    verified_by: Producer = Field(default_factory=Producer)
    note: str = ""
    # Where the re-runs ran (qubench.device.Device.record() and the machine's hardware): a CPU and a
    # GPU re-run may differ within the tolerance.
    device: dict[str, Any] = Field(default_factory=dict)


def read_yaml(path: Path, root: Path | None = None) -> Any:
    """YAML from an untrusted file: size- and depth-limited, no symlink, safe loader only (raises
    ValueError with the reason)."""
    return untrusted.read_yaml(Path(path), MAX_YAML_BYTES, root)


def explain(exc: ValidationError, where: str) -> list[str]:
    return [f"{where}: {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()]


def load_submission(folder: Path) -> Submission:
    """The folder's submission.yaml; raises ValueError (with every schema problem) when it is not valid."""
    path = Path(folder) / SUBMISSION_FILE
    try:
        raw = read_yaml(path, Path(folder))
        return Submission.model_validate(raw)
    except ValidationError as exc:
        raise ValueError("\n".join(explain(exc, SUBMISSION_FILE))) from None
    except ValueError as exc:
        raise ValueError(f"{SUBMISSION_FILE}: cannot read: {exc}") from None


def verification_path(verifications: Path, name: str) -> Path:
    return Path(verifications) / f"{name}.yaml"


def load_verification(verifications: Path, name: str) -> Verification | None:
    """The maintainers' record for submission `name`, None when there is none; ValueError when unreadable."""
    path = verification_path(verifications, name)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return Verification.model_validate(read_yaml(path, Path(verifications)))
    except ValidationError as exc:
        raise ValueError("\n".join(explain(exc, path.name))) from None
    except ValueError as exc:
        raise ValueError(f"{path.name}: cannot read: {exc}") from None


def dump_yaml(model: BaseModel, path: Path) -> None:
    from qubench import store

    text = yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{store._temp_tag()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
