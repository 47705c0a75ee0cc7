"""One loader for the MUSE GitHub layout (see `qubench.tasks.base` for the file list).

Both the synthetic default task and real MUSE folders are read here, so one
evaluator serves both.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from qubench.errors import DataError
from qubench.tasks import classify
from qubench.tasks.classify import ClassifyFormat, ClassifyItem

#: Where the lm-eval task YAMLs (tasks/qubench_*) find a task's data folder when the task
#: metadata gives no data_root.
DATA_ROOT_ENV = "QUBENCH_DATA_ROOT"
HOW_TO_SET_DATA_ROOT = (
    f"pass metadata data_root=<folder> (simple_evaluate/TaskManager metadata, or lm-eval "
    f"--metadata '{{\"data_root\": \"<folder>\"}}') or set the environment variable {DATA_ROOT_ENV}"
)

DOC_SEPARATOR = "\n\n\n"  # between documents in raw/*.txt (documents may hold single blank lines)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class VerbMemProbe:
    prompt: str
    gt: str


@dataclass(frozen=True)
class TaskData:
    root: Path
    forget: list[str]                      # raw training documents
    retain: list[str]
    holdout: list[str]
    verbmem_forget: list[VerbMemProbe]
    knowmem_forget: list[QA]
    knowmem_retain: list[QA]
    knowmem_forget_icl: list[QA]
    knowmem_retain_icl: list[QA]
    privleak_forget: list[str]
    privleak_retain: list[str]
    privleak_holdout: list[str]
    verbmem_holdout: list[VerbMemProbe] = field(default_factory=list)  # qubench's own, optional
    verbmem_retain: list[VerbMemProbe] = field(default_factory=list)   # qubench's own, optional
    # The optional classification view (qubench.tasks.classify): None/empty for tasks without one.
    classify_format: ClassifyFormat | None = None
    classify_forget: list[ClassifyItem] = field(default_factory=list)
    classify_holdout: list[ClassifyItem] = field(default_factory=list)
    classify_retain: list[ClassifyItem] = field(default_factory=list)
    classify_test: list[ClassifyItem] = field(default_factory=list)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every data file, recorded in results so a reader can tell which data was used
        (qubench's own `qubench_*` side files, such as the cache manifest, are not data)."""
        return {
            str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and not p.name.startswith("qubench_")
        }


def data_file(rel: str, data_root: str | os.PathLike | None, suite: str, missing: str = "") -> Path:
    """`rel` inside the data folder named by the metadata `data_root`, else by $QUBENCH_DATA_ROOT;
    a DataError saying what to set when neither names one, or (with `missing`, what a missing file
    means) that the file is not there."""
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise DataError(f"{suite} tasks need the task's data folder: {HOW_TO_SET_DATA_ROOT}")
    path = Path(root).expanduser() / rel
    if not path.is_file():
        source = "metadata data_root" if data_root else f"env {DATA_ROOT_ENV}"
        why = f": {missing}" if missing else ""
        raise DataError(f"{path} not found (data folder {root} from {source}){why}; {HOW_TO_SET_DATA_ROOT}")
    return path


def read_docs(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [d.strip("\n") for d in text.split(DOC_SEPARATOR) if d.strip()]


def write_docs(path: Path, docs: list[str]) -> None:
    for d in docs:
        if DOC_SEPARATOR in d:
            raise DataError(f"document contains the separator {DOC_SEPARATOR!r}: {d[:60]!r}...")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DOC_SEPARATOR.join(docs) + "\n", encoding="utf-8")


def _json(root: Path, rel: str, required: bool = True):
    path = root / rel
    if not path.exists():
        if required:
            raise DataError(f"missing {rel} in task data folder {root} (expected the MUSE layout)")
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None


def _qa(root: Path, rel: str) -> list[QA]:
    # Optional: tasks without facts to ask about (e.g. social-media posts) have no KnowMem;
    # the evaluator then skips it instead of scoring empty sets.
    rows = _json(root, rel, required=False)
    try:
        return [QA(str(r["question"]), str(r["answer"])) for r in rows]
    except (KeyError, TypeError):
        raise DataError(f"{root / rel}: every entry needs 'question' and 'answer'") from None


def _verbmem(root: Path, rel: str, required: bool = True) -> list[VerbMemProbe]:
    rows = _json(root, rel, required)
    try:
        return [VerbMemProbe(r["prompt"], r["gt"]) for r in rows]
    except (KeyError, TypeError):
        raise DataError(f"{root / rel}: every entry needs 'prompt' and 'gt'") from None


def load(root: Path | str) -> TaskData:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"task data folder {root} does not exist")
    fmt, sets = classify.load(root)
    return TaskData(
        root=root,
        forget=read_docs(root / "raw/forget.txt"),
        retain=read_docs(root / "raw/retain.txt"),
        holdout=read_docs(root / "raw/holdout.txt"),
        verbmem_forget=_verbmem(root, "verbmem/forget.json"),
        knowmem_forget=_qa(root, "knowmem/forget_qa.json"),
        knowmem_retain=_qa(root, "knowmem/retain_qa.json"),
        knowmem_forget_icl=_qa(root, "knowmem/forget_qa_icl.json"),
        knowmem_retain_icl=_qa(root, "knowmem/retain_qa_icl.json"),
        privleak_forget=_json(root, "privleak/forget.json"),
        privleak_retain=_json(root, "privleak/retain.json"),
        privleak_holdout=_json(root, "privleak/holdout.json"),
        verbmem_holdout=_verbmem(root, "verbmem/holdout.json", required=False),
        verbmem_retain=_verbmem(root, "verbmem/retain.json", required=False),
        classify_format=fmt,
        **{f"classify_{split}": items for split, items in sets.items()},
    )
