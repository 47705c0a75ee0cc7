"""Stage 1-2 of the pipeline: task data -> target and retrain models, cached.

Offline tasks get a tokenizer and tiny Llama models trained here, keyed by a
hash of the data and the recipe; other tasks (or `--model`) point at an
existing save_pretrained folder or a hub ID.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from qubench import store
from qubench.errors import ConfigError
from qubench.models.pretrain import build_model, encode_docs, fit
from qubench.models.tokenizer import train_tokenizer
from qubench.tasks.base import Task, TrainRecipe
from qubench.tasks.muse_layout import TaskData

# Bump when the training code changes in a way that changes the weights, so old caches are not reused.
TRAINING_CODE_VERSION = 1
# Bump when what tasks write changes (e.g. a new probe file), so task folders are rebuilt.
TASK_LAYOUT_VERSION = 2


@dataclass(frozen=True)
class PreparedModels:
    target_dir: Path
    retrain_dir: Path | None
    target_id: str      # what the user would pass to --model to get this target again
    retrain_id: str | None
    recipe: dict | None  # the training recipe, when trained here


def task_dir(task: Task) -> Path:
    """Where the task's data folder is cached (it may not exist yet)."""
    key = f"{task.name}-{store.stable_hash({'params': task.params(), 'v': TASK_LAYOUT_VERSION, **_source(task)})}"
    return store.home() / "tasks" / key


def prepare_task(task: Task) -> Path:
    """Materialise the task's data folder once per (task, parameters)."""
    return store.cached_dir(task_dir(task), task.materialize)


def _source(task: Task) -> dict:
    fingerprint = task.source_fingerprint()
    return {} if fingerprint is None else {"source": fingerprint}  # keeps existing cache keys of other tasks


def resolve_model(ref: str) -> Path:
    """A local save_pretrained folder, or a hub ID downloaded to the HF cache (needs hub access)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a save_pretrained model folder (no config.json)")
        return path.resolve()
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        raise ConfigError(f"model {ref!r} is neither an existing folder nor a hub ID of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref))
    except Exception as exc:
        raise ConfigError(
            f"could not fetch model {ref!r} from the hub ({type(exc).__name__}: {exc}). "
            "On a machine without hub access, pass a local save_pretrained folder instead."
        ) from None


def seeded_recipe(task: Task, seed: int = 0) -> TrainRecipe | None:
    """The task's training recipe for run seed `seed`, or None when the task trains no models.

    A run's seed varies everything the harness itself draws at random: for tasks whose target and
    retrain models are trained here, their initialisation and data order (recipe seed + run seed)
    as well as the unlearning. Seed 0 is the task's own recipe, so existing caches stay valid.
    The task data itself stays fixed by the task's parameters: every seed sees the same benchmark.
    """
    recipe = task.train_recipe()
    if recipe is None or seed == 0:
        return recipe
    return recipe.model_copy(update={"seed": recipe.seed + seed})


def trained_models_dir(task: Task, data: TaskData, recipe: TrainRecipe) -> Path:
    """Where the target/retrain pair trained with `recipe` is cached (it may not exist yet)."""
    key = store.stable_hash(
        # Only what the models are trained on: new probe files must not invalidate trained models.
        {"forget": store.stable_hash(data.forget), "retain": store.stable_hash(data.retain),
         "generic": store.stable_hash(task.generic_corpus()),
         "recipe": recipe.model_dump(), "v": TRAINING_CODE_VERSION}
    )
    return store.home() / "models" / f"{task.name}-{key}"


def prepare_models(
    task: Task, data: TaskData, model: str | None = None, retrain_model: str | None = None, progress: bool = True,
    seed: int = 0,
) -> PreparedModels:
    recipe = seeded_recipe(task, seed)
    if model is not None or recipe is None:
        target_ref = model or task.default_target
        if target_ref is None:
            raise ConfigError(f"task {task.name!r} trains no model of its own: pass --model PATH_OR_HUB_ID")
        retrain_ref = retrain_model or (task.default_retrain if model is None else None)
        return PreparedModels(
            target_dir=resolve_model(target_ref),
            retrain_dir=resolve_model(retrain_ref) if retrain_ref else None,
            target_id=target_ref,
            retrain_id=retrain_ref,
            recipe=None,
        )
    root = store.cached_dir(
        trained_models_dir(task, data, recipe),
        lambda tmp: _train_pair(task, data, recipe, tmp, progress),
    )
    return PreparedModels(root / "target", root / "retrain", str(root / "target"), str(root / "retrain"),
                          recipe.model_dump())


def _train_pair(task: Task, data: TaskData, recipe: TrainRecipe, out: Path, progress: bool) -> None:
    import torch

    torch.manual_seed(recipe.seed)
    generic = task.generic_corpus()
    tokenizer = train_tokenizer(generic + data.forget + data.retain, recipe.vocab_size)
    log: dict = {"recipe": recipe.model_dump()}
    t0 = time.perf_counter()
    base = build_model(recipe, tokenizer)
    fit_args = dict(batch_size=recipe.batch_size, weight_decay=recipe.weight_decay, pad_id=tokenizer.pad_token_id,
                    progress=progress)
    log["pretrain_loss"] = fit(base, encode_docs(tokenizer, generic, recipe.max_seq_len),
                               epochs=recipe.pretrain_epochs, lr=recipe.pretrain_lr, seed=recipe.seed,
                               label="pre-training base model", **fit_args)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, docs in (("target", data.forget + data.retain), ("retrain", data.retain)):
        base.load_state_dict(base_state)
        log[f"{name}_loss"] = fit(base, encode_docs(tokenizer, docs, recipe.max_seq_len), epochs=recipe.epochs,
                                  lr=recipe.lr, seed=recipe.seed + 1, label=f"training {name} model", **fit_args)
        saved = base if recipe.save_dtype == "float32" else copy.deepcopy(base).to(getattr(torch, recipe.save_dtype))
        saved.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    log["seconds"] = time.perf_counter() - t0
    (out / "training_log.json").write_text(json.dumps(log, indent=2))
