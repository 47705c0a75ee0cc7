"""Read labelled social-media posts from the two public COVID-19 misinformation corpora.

- CONSTRAINT-2021 shared task (Patwa et al., 2021), English fake-news track:
  CSV columns `id,tweet,label` with labels `real` / `fake`
  (Constraint_Train.csv, Constraint_Val.csv, english_test_with_labels.csv).
- COVID-19 rumor dataset (Cheng et al., 2021), tweets part: Twitter.csv with
  columns `No.,label,content,...` (UTF-8 with a byte-order mark) and labels
  `T` (true), `F` (false) and `U` (unverified). T maps to real, F to fake; U posts
  are dropped, since a post of unknown truth can be neither forgotten as misinformation
  nor kept as fact.

A source is a CSV file, a folder searched for CSV files (each recognised by its
header), or an http(s) URL of one CSV file, downloaded once into the qubench
cache. Texts are whitespace-normalised and de-duplicated (ignoring case and
links, so one tweet posted with two different t.co links counts once; posts
whose copies disagree on the label are dropped), so that a post held out from
training never reappears in it under another id.
"""

from __future__ import annotations

import csv
import hashlib
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from qubench.errors import DataError
from qubench.tasks.misinfo_layout import FAKE, REAL, Post

KINDS = ("constraint", "rumor")
#: kind -> (text column, label column, {raw label: label or None to drop}); headers are matched case-insensitively.
FORMATS = {
    "constraint": ("tweet", "label", {"real": REAL, "fake": FAKE}),
    "rumor": ("content", "label", {"t": REAL, "f": FAKE, "u": None}),
}
EXPECTED = ("expected the columns id,tweet,label (CONSTRAINT-2021, labels real/fake) "
            "or label,content (COVID-19 rumor Twitter.csv, labels T/F/U)")
HOW_TO_PASS = "pass a local copy: --task-param source=PATH (a CSV file or a folder of them)"
DOWNLOAD_TIMEOUT = 60


def detect_kind(header: list[str]) -> str | None:
    cols = {c.strip().lower() for c in header}
    if {"id", "tweet", "label"} <= cols:
        return "constraint"
    if {"label", "content"} <= cols:
        return "rumor"
    return None


def read_csv(path: Path, kind: str = "auto") -> list[Post]:
    """The labelled posts of one CSV file; `kind` 'auto' recognises the format by its header."""
    path = Path(path)
    # utf-8-sig drops the byte-order mark Twitter.csv starts with (else the first column is '\ufeffNo.').
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty; {EXPECTED}")
        found = detect_kind(header)
        if found is None or (kind != "auto" and found != kind):
            wanted = EXPECTED if kind == "auto" else f"expected the columns of dataset={kind}: " + \
                ("id,tweet,label" if kind == "constraint" else "label,content")
            raise DataError(f"{path}: unrecognised header {','.join(header)!r}; {wanted}")
        text_col, label_col, labels = FORMATS[found]
        index = {c.strip().lower(): i for i, c in enumerate(header)}
        posts = []
        # Records are numbered from 1 after the header (a quoted post may span several lines).
        for record, row in enumerate(reader, start=1):
            if not any(cell.strip() for cell in row):
                continue
            try:
                text, raw = row[index[text_col]], row[index[label_col]].strip().lower()
            except IndexError:
                raise DataError(f"{path} row {record}: {len(row)} fields, fewer than the header") from None
            if raw not in labels:
                raise DataError(f"{path} row {record}: label {raw!r} is not one of {sorted(labels)} ({found} format)")
            text = " ".join(text.split())
            if labels[raw] is not None and text:
                posts.append(Post(text, labels[raw], f"{path.name}#{record}"))
    return posts


def load_posts(source: str, kind: str = "auto") -> list[Post]:
    """Every labelled post of `source` (file, folder or URL), de-duplicated, in a stable order."""
    path = fetch(source) if is_url(source) else Path(source).expanduser()
    if not path.exists():
        raise DataError(f"source {source} does not exist; {HOW_TO_PASS}, or an http(s) URL")
    if path.is_file():
        return dedupe(read_csv(path, kind))
    posts = []
    for csv_path in sorted(path.rglob("*.csv")):
        with csv_path.open(encoding="utf-8-sig", newline="") as fh:
            found = detect_kind(next(csv.reader(fh), []))
        if found is not None and kind in ("auto", found):  # other CSVs in the folder are not posts
            posts += read_csv(csv_path, found)
    if not posts:
        which = EXPECTED if kind == "auto" else f"for dataset={kind}"
        raise DataError(f"no labelled posts found in the CSV files under {path} ({which})")
    return dedupe(posts)


def dedupe(posts: list[Post]) -> list[Post]:
    first: dict[str, Post] = {}
    labels: dict[str, set[str]] = {}
    for p in posts:
        key = _key(p.text)
        first.setdefault(key, p)
        labels.setdefault(key, set()).add(p.label)
    return [p for key, p in first.items() if len(labels[key]) == 1]


def _key(text: str) -> str:
    return " ".join(re.sub(r"https?://\S+", " ", text.lower()).split())


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def fetch(url: str) -> Path:
    """Download `url` once into QUBENCH_HOME/downloads (atomically: never a half-written file)."""
    from qubench.stages.data import Download

    return Download(url, _download).get()


def _download(url: str, out_path: Path) -> None:
    try:
        with open(out_path, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"could not download {url} ({type(exc).__name__}: {reason}); "
                        f"without network access, {HOW_TO_PASS}") from None


def fingerprint(source: str) -> str | None:
    """A hash of a local source's CSV bytes (a changed file rebuilds the task); None for URLs,
    whose download is cached under the URL itself."""
    if is_url(source):
        return None
    path = Path(source).expanduser()
    files = [path] if path.is_file() else sorted(path.rglob("*.csv")) if path.is_dir() else []
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16] if files else None
