"""How target and retrain models are obtained: trained here for offline tasks (a tokenizer and tiny
Llama models, cached by the `TrainedModels` stage), or existing save_pretrained folders and hub IDs.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from qubench.device import CPU, Device
from qubench.errors import ConfigError
from qubench.models.pretrain import build_model, encode_docs, fit
from qubench.models.tokenizer import train_tokenizer
from qubench.tasks.base import Task, TrainRecipe
from qubench.tasks.muse_layout import TaskData


#: The log a trained target/retrain pair carries beside the two model folders.
TRAINING_LOG = "training_log.json"


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


def train_pair(task: Task, data: TaskData, recipe: TrainRecipe, out: Path, progress: bool,
               device: Device = CPU) -> None:
    """Train the target (forget + retain) and retrain (retain only) models from one pre-trained base,
    on `device` (its first GPU for `cuda`: these models are small; see qubench.models.pretrain.fit)."""
    import torch

    torch.manual_seed(recipe.seed)
    generic = task.generic_corpus()
    tokenizer = train_tokenizer(generic + data.forget + data.retain, recipe.vocab_size)
    log: dict = {"recipe": recipe.model_dump()}
    t0 = time.perf_counter()
    base = build_model(recipe, tokenizer)
    if device.is_cuda:  # initialised on the CPU (the same seeded weights everywhere), trained on the GPU
        base.to(device.torch_device)
        log["device"] = {"torch_device": device.torch_device, "precision": "bf16 autocast, float32 weights"}
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
        if device.is_cuda:
            saved = copy.deepcopy(base).to("cpu", getattr(torch, recipe.save_dtype))
        else:
            saved = base if recipe.save_dtype == "float32" else copy.deepcopy(base).to(getattr(torch, recipe.save_dtype))
        saved.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    log["seconds"] = time.perf_counter() - t0
    # CPU float sums may be split per thread, so another thread count can train other weights (1 and 2
    # threads gave identical default-task models here): recorded so a difference can be traced.
    log["torch_threads"] = torch.get_num_threads()
    (out / TRAINING_LOG).write_text(json.dumps(log, indent=2))
