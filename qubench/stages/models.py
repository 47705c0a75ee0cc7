"""Stage 2: the target and retrain models — a pair trained here (offline tasks), or existing models
named by a folder or a hub ID (`--model`, `--retrain-model`, a task's defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qubench import store
from qubench.device import CPU, Device
from qubench.errors import ConfigError
from qubench.stages.base import Stage

# Bump when the training code changes in a way that changes the weights, so old caches are not reused.
TRAINING_CODE_VERSION = 1


@dataclass(frozen=True)
class PreparedModels:
    target_dir: Path
    retrain_dir: Path | None
    target_id: str      # what the user would pass to --model to get this target again
    retrain_id: str | None
    recipe: dict | None  # the training recipe, when trained here


class TrainedModels(Stage):
    """A target (forget + retain) and retrain (retain only) pair trained here from the task's recipe."""

    kind = "models"
    description = "target + retrain models trained here (offline tasks)"
    step = "prepare"
    group_shared = True

    def __init__(self, task, data, recipe, progress: bool = True, device: Device = CPU):
        self.task, self.data, self.recipe, self.progress, self.device = task, data, recipe, progress, device

    def identity(self) -> dict[str, Any]:
        # Only what the models are trained on: new probe files must not invalidate trained models.
        # On a GPU they train with bf16 autocast (qubench.models.pretrain.fit): other weights, other key.
        return {"forget": store.stable_hash(self.data.forget), "retain": store.stable_hash(self.data.retain),
                "generic": store.stable_hash(self.task.generic_corpus()), "recipe": self.recipe.model_dump(),
                "v": TRAINING_CODE_VERSION, **self.device.identity()}

    def label(self) -> str:
        return self.task.name

    def activity(self) -> str:
        return f"preparing target and retrain models (trained here for {self.task.name})"

    def build(self, tmp: Path) -> None:
        from qubench.models.prepare import train_pair

        train_pair(self.task, self.data, self.recipe, tmp, self.progress, self.device)

    def prepared(self) -> PreparedModels:
        root = self.path()
        return PreparedModels(root / "target", root / "retrain", str(root / "target"), str(root / "retrain"),
                              self.recipe.model_dump())

    def get_models(self) -> PreparedModels:
        self.get()
        return self.prepared()


class ExistingModels:
    """Models that already exist (local folders or hub IDs): qubench neither builds nor caches them
    (hub downloads go to the Hugging Face cache)."""

    def __init__(self, target_ref: str, retrain_ref: str | None, target_option: str = "--model",
                 retrain_option: str = "--retrain-model"):
        self.target_ref, self.retrain_ref = target_ref, retrain_ref
        # How the user named each model (an option, or the task's default), for error messages.
        self.options = {"target": target_option, "retrain": retrain_option}

    def check(self) -> None:
        """Before any work: a model named by a path must be a loadable model folder, and a reference that
        is neither a folder nor a hub ID is refused (hub models are checked once downloaded)."""
        from qubench.preflight import check_model_folder

        for which, ref in (("target", self.target_ref), ("retrain", self.retrain_ref)):
            if ref is None:
                continue
            path = Path(ref).expanduser()
            if path.exists():
                check_model_folder(path, self.options[which])
            elif ref.count("/") != 1 or ref.startswith((".", "/", "~")):
                raise ConfigError(f"{self.options[which]} {ref}: no such folder, and not a hub ID of the form "
                                  "owner/name")

    def local(self, ref: str | None) -> Path | None:
        """The folder of an existing model, without downloading anything; None if it is not here yet."""
        if ref is None:
            return None
        path = Path(ref).expanduser()
        if path.exists():
            return path
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(ref, "config.json")
            return Path(found).parent if isinstance(found, str) else None
        except Exception:  # no hub library, a malformed ID: simply not here
            return None

    def exists(self) -> bool:
        return self.local(self.target_ref) is not None and (
            self.retrain_ref is None or self.local(self.retrain_ref) is not None)

    def prepared(self) -> PreparedModels | None:
        """The models as they are here now, or None when one still has to be downloaded."""
        if not self.exists():
            return None
        retrain = self.local(self.retrain_ref)
        return PreparedModels(self.local(self.target_ref), retrain, self.target_ref, self.retrain_ref, None)

    def activity(self, downloading: bool = False) -> str:
        both = f"{self.target_ref} and {self.retrain_ref}" if self.retrain_ref else f"{self.target_ref}, no retrain model"
        return f"preparing target and retrain models ({'downloading ' if downloading else ''}{both})"

    def get_models(self) -> PreparedModels:
        from qubench import progress
        from qubench.models.prepare import resolve_model
        from qubench.preflight import check_model_folder

        def resolve() -> PreparedModels:
            target = resolve_model(self.target_ref)
            retrain = resolve_model(self.retrain_ref) if self.retrain_ref else None
            for which, path in (("target", target), ("retrain", retrain)):
                if path is not None:  # downloads too: a hub snapshot without a tokenizer fails here, named
                    check_model_folder(path, self.options[which])
            return PreparedModels(target, retrain, self.target_ref, self.retrain_ref, None)

        if self.exists():  # local folders or already in the hub cache: nothing to wait for
            progress.say(f"{self.activity()}: found")
            return resolve()
        with progress.stage(self.activity(downloading=True)):
            return resolve()


def models_stage(task, data, model: str | None, retrain_model: str | None, seed: int,
                 progress: bool = True, device: Device = CPU) -> TrainedModels | ExistingModels:
    """How a run gets its models: existing ones when `model` is given or the task trains none, else
    the pair trained here with the task's recipe for this seed. `data` (the task's TaskData) is only
    read for a trained pair."""
    from qubench.models.prepare import seeded_recipe

    recipe = seeded_recipe(task, seed)
    if model is None and recipe is not None:
        if retrain_model is not None:
            # A retrain model must be the target's own counterpart (same base, same retain data): one
            # given for a target trained here would compare two unrelated models.
            raise ConfigError(
                f"--retrain-model was given without --model, but task {task.name!r} trains its own target and "
                "retrain pair; pass --model with it (an existing target and its retrain model), or neither")
        return TrainedModels(task, data, recipe, progress, device)
    target_ref = model or task.default_target
    if target_ref is None:
        raise ConfigError(f"task {task.name!r} trains no model of its own: pass --model PATH_OR_HUB_ID")
    retrain_ref = retrain_model or (task.default_retrain if model is None else None)
    return ExistingModels(target_ref, retrain_ref,
                          "--model" if model else f"task {task.name}'s default target model",
                          "--retrain-model" if retrain_model else f"task {task.name}'s default retrain model")
