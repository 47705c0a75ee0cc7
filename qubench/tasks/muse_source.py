"""Read MUSE data (News or Books) from wherever it lives, into one in-memory form.

Two sources, one result (`MuseParts`):

- a folder in MUSE's GitHub layout (`raw/*.txt`, `verbmem/forget.json`,
  `knowmem/*.json`, `privleak/*.json`), as in `git clone` of the MUSE repo's data;
- a dataset on the Hugging Face hub (`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`)
  or a local snapshot of one, read through `datasets` with MUSE's configs
  (raw, verbmem, knowmem, privleak) and splits.

Writing the parts back out (`write_layout`) gives qubench's MUSE layout, so the
real data and the synthetic default go through the same loader and evaluator.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from qubench.errors import DataError
from qubench.tasks.muse_layout import DOC_SEPARATOR, write_docs

#: config -> split -> the file in MUSE's GitHub layout holding the same rows.
HUB_LAYOUT = {
    "raw": {"forget": "raw/forget.txt", "retain1": "raw/retain1.txt", "retain2": "raw/retain2.txt",
            "holdout": "raw/holdout.txt"},
    "verbmem": {"forget": "verbmem/forget.json"},
    "knowmem": {"forget_qa": "knowmem/forget_qa.json", "retain_qa": "knowmem/retain_qa.json",
                "forget_qa_icl": "knowmem/forget_qa_icl.json", "retain_qa_icl": "knowmem/retain_qa_icl.json"},
    "privleak": {"forget": "privleak/forget.json", "retain": "privleak/retain.json",
                 "holdout": "privleak/holdout.json"},
}
#: Files every MUSE evaluation needs; the raw corpora are needed only to unlearn.
REQUIRED = ("verbmem/forget.json", "knowmem/forget_qa.json", "knowmem/retain_qa.json",
            "privleak/forget.json", "privleak/holdout.json")


@dataclass
class MuseParts:
    """MUSE data keyed by its GitHub-layout path: raw/*.txt -> list of documents, *.json -> rows."""

    source: str
    files: dict[str, list] = field(default_factory=dict)

    def get(self, rel: str) -> list:
        return self.files.get(rel, [])


def is_github_layout(path: Path) -> bool:
    return (path / "verbmem" / "forget.json").is_file() or (path / "raw" / "forget.txt").is_file()


def read_muse(source: str, revision: str | None = None) -> MuseParts:
    """MUSE data from a GitHub-layout folder, a local dataset snapshot, or a hub dataset ID."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"MUSE source {source} is a file; pass the folder that holds raw/, verbmem/, knowmem/, privleak/")
        parts = _read_github_layout(path) if is_github_layout(path) else _read_dataset(str(path), revision)
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        parts = _read_dataset(source, revision)
    else:
        raise DataError(f"MUSE source {source!r} is neither an existing folder nor a hub dataset ID (owner/name)")
    for rel, rows in parts.files.items():
        check_rows(rel, rows, f"{path / rel}" if path.is_dir() and is_github_layout(path) else f"{source}: {rel}")
    missing = [rel for rel in REQUIRED if rel not in parts.files]
    if missing:
        raise DataError(f"MUSE source {source} lacks {', '.join(missing)} (expected MUSE's layout: "
                        "verbmem/forget.json, knowmem/{forget,retain}_qa.json, privleak/{forget,holdout}.json)")
    return parts


#: The fields each kind of MUSE JSON entry needs (all strings); privleak entries are plain strings.
ROW_FIELDS = {"verbmem": ("prompt", "gt"), "knowmem": ("question", "answer")}


def check_rows(rel: str, rows, where: str) -> None:
    """A DataError naming the file, the entry and the field when MUSE data does not have MUSE's shape
    (a list of entries; verbmem {prompt, gt}, knowmem {question, answer}, privleak and raw strings)."""
    if not isinstance(rows, list):
        raise DataError(f"{where}: expected a JSON list of entries, found {type(rows).__name__} "
                        "(MUSE's files are lists)")
    fields = ROW_FIELDS.get(rel.split("/")[0])
    for i, row in enumerate(rows):
        if fields is None:
            if not isinstance(row, str):
                raise DataError(f"{where}: entry {i} is {type(row).__name__}, not a text string")
            continue
        if not isinstance(row, dict):
            raise DataError(f"{where}: entry {i} is {type(row).__name__}, not an object with "
                            f"{' and '.join(repr(f) for f in fields)}")
        for field in fields:
            if field not in row:
                raise DataError(f"{where}: entry {i} has no {field!r} (every entry needs "
                                f"{' and '.join(repr(f) for f in fields)})")
            if not isinstance(row[field], str):
                raise DataError(f"{where}: entry {i}: {field!r} is {type(row[field]).__name__}, not a string")


def _read_github_layout(root: Path) -> MuseParts:
    parts = MuseParts(source=str(root))
    for splits in HUB_LAYOUT.values():
        for rel in splits.values():
            p = root / rel
            if not p.is_file():
                continue
            if rel.endswith(".txt"):
                # MUSE's raw files are one running text, not separate documents: keep it whole
                # (training cuts it into windows) unless it already carries qubench's separator.
                text = p.read_text(encoding="utf-8")
                parts.files[rel] = [d.strip("\n") for d in text.split(DOC_SEPARATOR) if d.strip()]
            else:
                try:
                    parts.files[rel] = json.loads(p.read_text(encoding="utf-8"))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p} is not valid JSON: {exc}") from None
    return parts


def _read_dataset(ref: str, revision: str | None) -> MuseParts:
    """Every (config, split) of a MUSE dataset through `datasets`; absent raw splits are allowed."""
    import datasets

    parts = MuseParts(source=ref if revision is None else f"{ref}@{revision}")
    # Required configs first, so an unreachable hub fails on them before any optional retries.
    for config in ("verbmem", "knowmem", "privleak", "raw"):
        splits = HUB_LAYOUT[config]
        try:
            ds = datasets.load_dataset(ref, config, revision=revision)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not reachable"
            if config == "raw":
                continue  # evaluation works without the corpora; unlearning then says what is missing
            raise DataError(
                f"could not load config {config!r} of MUSE dataset {ref!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}). Without hub access, pass a local folder in MUSE's "
                "layout instead: --task-param source=/path/to/muse/news"
            ) from None
        for split, rel in splits.items():
            if split in ds:
                parts.files[rel] = [_row(config, r) for r in ds[split]]
    return parts


def _row(config: str, row: dict):
    if config in ("raw", "privleak"):
        return row["text"]
    if config == "verbmem":
        return {"prompt": row["prompt"], "gt": row["gt"]}
    return {"question": row["question"], "answer": row["answer"]}


def write_layout(parts: MuseParts, out_dir: Path) -> None:
    """qubench's MUSE layout: retain1 + retain2 become raw/retain.txt."""
    out_dir = Path(out_dir)
    raw = {"forget": parts.get("raw/forget.txt"), "holdout": parts.get("raw/holdout.txt"),
           "retain": parts.get("raw/retain1.txt") + parts.get("raw/retain2.txt")}
    for split, docs in raw.items():
        if docs:
            write_docs(out_dir / "raw" / f"{split}.txt", docs)
    for rel in [r for splits in list(HUB_LAYOUT.values())[1:] for r in splits.values()]:
        if rel in parts.files:
            dump_json(out_dir / rel, parts.files[rel])


def dump_json(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


def folder_fingerprint(path: Path) -> str:
    """sha256 over a folder's files (names and bytes): a changed local source rebuilds the task."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and ".cache" not in p.parts:
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]
