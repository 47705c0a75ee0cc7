"""Stage 1: the task's data folder in the MUSE layout, and the downloads some tasks read it from."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any, Callable

from qubench.stages.base import Stage

# Bump when what tasks write changes (e.g. a new probe file), so task folders are rebuilt.
TASK_LAYOUT_VERSION = 2


class TaskData(Stage):
    kind = "tasks"
    description = "task data folders (MUSE layout)"
    step = "prepare"
    group_shared = True

    def __init__(self, task):
        self.task = task

    def identity(self) -> dict[str, Any]:
        fingerprint = self.task.source_fingerprint()  # a local source folder's content, when the task reads one
        return {"params": self.task.params(), "v": TASK_LAYOUT_VERSION,
                **({} if fingerprint is None else {"source": fingerprint})}

    def label(self) -> str:
        return self.task.name

    def activity(self) -> str:
        return f"preparing task data ({self.task.name})"

    def build(self, tmp: Path) -> None:
        self.task.materialize(tmp)


class Download(Stage):
    """A file fetched once from a URL (e.g. a public CSV a task reads), kept under its URL's hash."""

    kind = "downloads"
    description = "files downloaded by tasks (keyed by URL)"
    step = "prepare"
    group_shared = True
    is_file = True

    def __init__(self, url: str, fetch: Callable[[str, Path], None]):
        self.url, self.fetch = url, fetch

    def identity(self) -> dict[str, Any]:
        return {"url": self.url}

    def name(self) -> str:
        # The file keeps its own name (and so its suffix) inside a folder named by the key, so readers
        # that look at it can tell what it is.
        return f"{self.key()}/{Path(urllib.parse.urlparse(self.url).path).name or 'data.csv'}"

    def activity(self) -> str:
        return f"downloading {self.url}"

    def build(self, tmp: Path) -> None:
        self.fetch(self.url, tmp)
