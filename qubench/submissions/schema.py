"""The files of a submission folder, as strict schemas (unknown fields are errors).

    submissions/<name>/
      submission.yaml     what was submitted: package, entry point, grid, authors, licence, digests
      results/            the grid's output: cells/*.json (one RunResult each) and aggregate.json
      verification.yaml   written by `qubench verify`: which cells were re-run and how they compared

Reading these needs no plugin code, so the leaderboard can use this module safely.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUBMISSION_SCHEMA_VERSION = "1.0"
SUBMISSION_FILE = "submission.yaml"
VERIFICATION_FILE = "verification.yaml"
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


class CellCheck(Strict):
    cell: str
    run_id: str
    result_file: str
    matches: bool
    max_deviation: float | None = None   # largest |submitted - re-run| as a multiple of its tolerance
    mismatches: list[str] = Field(default_factory=list)


class Tolerance(Strict):
    points: float = Field(gt=0)   # absolute, on the 0-100 scales (ROUGE, accuracy, PrivLeak)
    auc: float = Field(gt=0)      # absolute, on AUC (0-1)


class Verification(Strict):
    schema_version: str = SUBMISSION_SCHEMA_VERSION
    submission: str
    verified: bool
    date: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    cells_in_grid: int
    cells: list[CellCheck]
    selection_seed: int
    tolerance: Tolerance
    results_digest: str           # integrity.combined_digest of results/ when it was verified
    verified_by: Producer = Field(default_factory=Producer)
    note: str = ""
    # Where the re-runs ran (qubench.device.Device.record() and the machine's hardware): a CPU and a
    # GPU re-run may differ within the tolerance.
    device: dict[str, Any] = Field(default_factory=dict)


def read_yaml(path: Path) -> Any:
    """YAML from an untrusted file: size-limited, safe loader only."""
    path = Path(path)
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_YAML_BYTES} bytes")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def explain(exc: ValidationError, where: str) -> list[str]:
    return [f"{where}: {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()]


def load_submission(folder: Path) -> Submission:
    """The folder's submission.yaml; raises ValueError (with every schema problem) when it is not valid."""
    path = Path(folder) / SUBMISSION_FILE
    try:
        raw = read_yaml(path)
        return Submission.model_validate(raw)
    except ValidationError as exc:
        raise ValueError("\n".join(explain(exc, SUBMISSION_FILE))) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{SUBMISSION_FILE}: cannot read: {type(exc).__name__}: {exc}") from None


def load_verification(folder: Path) -> Verification | None:
    path = Path(folder) / VERIFICATION_FILE
    if not path.exists():
        return None
    try:
        return Verification.model_validate(read_yaml(path))
    except ValidationError as exc:
        raise ValueError("\n".join(explain(exc, VERIFICATION_FILE))) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{VERIFICATION_FILE}: cannot read: {type(exc).__name__}: {exc}") from None


def dump_yaml(model: BaseModel, path: Path) -> None:
    from qubench import store

    text = yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{store._temp_tag()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
