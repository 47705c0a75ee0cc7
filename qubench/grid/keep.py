"""Disk hygiene of a grid: `--keep checkpoints` (default) keeps every artifact in the cache;
`--keep results` deletes the unlearned models and quantized checkpoints this grid built as soon as
no cell of the grid needs them any more: a group's own ones when the group has finished, the
quantized target and retrain models when every group of their (task, seed) has. Task data, target/retrain models
and evaluations always stay: they are small or shared by every grid. Artifacts that were in the
cache before the grid started are never deleted (another grid or job may be using them).

Cell results survive pruning, so re-running the grid reuses them and trains nothing; only a cell
that has to run again (e.g. it failed) rebuilds what it needs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qubench import store
from qubench.grid.plan import Group, StageWalker
from qubench.stages import Merged, Quantized, Unlearned

KEEP_POLICIES = ("checkpoints", "results")
#: Only these kinds are ever deleted: an audited checkpoint (kind `external`) is the user's own folder.
PRUNED_KINDS = (Unlearned.kind, Merged.kind, Quantized.kind)


def _listing() -> set[Path]:
    found = set()
    for kind in PRUNED_KINDS:
        folder = store.home() / kind
        if folder.is_dir():
            found |= {p for p in folder.iterdir() if not p.name.startswith(".")}
    return found


class Pruner:
    def __init__(self, policy: str, groups: list[Group], device="cpu"):
        if policy not in KEEP_POLICIES:
            raise ValueError(f"keep policy {policy!r} is not one of {KEEP_POLICIES}")
        self.policy = policy
        self.before = _listing() if policy == "results" else set()
        self.open_groups = Counter((g.task, g.seed) for g in groups)
        self.shared: dict[tuple[str, int], set[Path]] = {}
        self.walker = StageWalker(device)
        self.pruned: list[Path] = []

    def group_done(self, group: Group) -> None:
        if self.policy != "results":
            return
        own, shared = set(), self.shared.setdefault((group.task, group.seed), set())
        for cell in group.cells:
            try:
                needs = self.walker.walk(cell.spec)
            except Exception:  # e.g. the task data never got built: nothing of this cell to prune
                continue
            built = {role: n.key for role, n in needs.items()
                     if n.exists and not n.symbolic and n.kind in PRUNED_KINDS}
            own |= {built[role] for role in ("unlearned", "q_unlearned") if role in built}
            shared |= {built[role] for role in ("q_target", "q_retrain") if role in built}
        # the `target` and `retrain` methods' quantized models are the quantized references themselves
        self._delete(own - shared)
        self.open_groups[(group.task, group.seed)] -= 1
        if self.open_groups[(group.task, group.seed)] == 0:
            self._delete(shared)

    def _delete(self, paths: set[Path]) -> None:
        for path in sorted(paths):
            if path in self.before or not path.is_dir():
                continue
            if store.remove_cached(path, blocking=False):
                self.pruned.append(path)
