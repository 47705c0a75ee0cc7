"""What every stage of the pipeline is: an artifact that knows its key, its path and how to build itself.

A stage's key is a hash of everything that determines its artifact (`identity()`): its plugin's name
and parameters, the content fingerprints of its inputs, the versions of the code that shapes it. The
artifact lives under QUBENCH_HOME/<kind>/ and is built once (`get()`), atomically and under a lock
shared by every process on the machine (`qubench.store`), so a half-built artifact is never seen and
parallel grid workers that need the same artifact build it once. Everything that asks about
artifacts — the pipeline, the grid planner and pruner, `qubench cache`, the executors — asks these
objects; nothing else spells a cache path.

Every subclass registers its kind in `STAGE_KINDS` (class attribute `kind`), which is how
`qubench cache ls/clean` knows every kind a run can create.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from qubench import store

#: kind -> stage class, filled as the stage modules are imported (see qubench.stages.__init__).
STAGE_KINDS: dict[str, type["Stage"]] = {}


class Stage(ABC):
    #: The folder under QUBENCH_HOME that holds this kind's artifacts; also its name in `qubench cache`.
    kind: ClassVar[str]
    #: One line for `qubench cache ls`.
    description: ClassVar[str]
    #: The pipeline step whose failure a failed build is reported as (a result's `error.stage`).
    step: ClassVar[str]
    #: True when every cell of a grid group (same task, seed and method) needs the same artifact: a
    #: failure to build it fails the whole group, so executors do not repeat it cell by cell.
    group_shared: ClassVar[bool]
    #: The artifact is one file (its name ends in `suffix`) rather than a folder.
    is_file: ClassVar[bool] = False
    suffix: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            STAGE_KINDS[cls.kind] = cls

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything that determines the artifact, JSON-able. Its hash is the key."""

    @abstractmethod
    def build(self, tmp: Path) -> None:
        """Write the artifact to `tmp` (a fresh folder, or a file path for file stages)."""

    def key(self) -> str:
        return store.stable_hash(self.identity())

    def label(self) -> str:
        """A readable prefix of the artifact's name (e.g. the plugin name); empty for none."""
        return ""

    def activity(self) -> str:
        """What building the artifact is, in the words of the lines a run logs (`qubench.progress`)."""
        label = self.label()
        return f"building {self.kind}{' ' + label if label else ''}"

    def name(self) -> str:
        label = self.label()
        return f"{label}-{self.key()}{self.suffix}" if label else f"{self.key()}{self.suffix}"

    def path(self) -> Path:
        return store.home() / self.kind / self.name()

    def exists(self) -> bool:
        return self.path().is_file() if self.is_file else self.path().is_dir()

    def space_needed(self) -> int:
        """About how many bytes building the artifact writes (checked against free space first)."""
        return 0

    def get(self) -> Path:
        """The artifact's path, built first if it is not there yet (or rebuilt if it is damaged: the build
        records a manifest of what it wrote, checked on every reuse, see `qubench.store`). Either way the
        current run hears of it (`qubench.progress`): a line when the build starts and one when it ends,
        with its elapsed time, or one saying it was cached. Every stage of every command logs here."""
        from qubench import progress

        if store.reusable(self.path(), self.is_file):  # there, intact as recorded, and not to be rebuilt
            progress.cached(self.activity())
            return self.path()
        if not self.exists():
            from qubench.preflight import free_space

            free_space(self.path().parent, self.space_needed(), f"{self.kind} artifact {self.name()}")
        with progress.stage(self.activity()):
            if self.is_file:
                return store.cached_file(self.path(), self.build)
            return store.cached_dir(self.path(), self.build)


def kind_folder(kind: str) -> Path:
    return store.home() / kind
