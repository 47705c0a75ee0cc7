"""Task plugins: where the forget/retain/holdout corpora and the probes come from.

Every task materialises (or points at) a folder in the MUSE GitHub layout, so
that one loader (`qubench.tasks.muse_layout`) and one evaluator serve both
the synthetic default and the real MUSE data:

    raw/forget.txt, raw/retain.txt, raw/holdout.txt   training corpora (documents separated by a blank line)
    verbmem/forget.json                                [{prompt, gt}]
    verbmem/holdout.json   (optional, qubench's own)   [{prompt, gt}] on never-trained documents
    verbmem/retain.json    (optional, qubench's own)   [{prompt, gt}] on retain documents (utility)
    knowmem/forget_qa.json, knowmem/retain_qa.json     [{question, answer}]  (optional: absent = no KnowMem)
    knowmem/forget_qa_icl.json, knowmem/retain_qa_icl.json
    privleak/forget.json, privleak/retain.json, privleak/holdout.json   [str]
    classify/format.json   (optional, qubench's own)   {prompt with {text}, choices}
    classify/{forget,holdout,retain,test}.json          [{text, label}]  (see qubench.tasks.classify)
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from qubench.plugin import Plugin


class TrainRecipe(BaseModel):
    """How to train a task's tiny target and retrain models from scratch (offline tasks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384   # a multiple of 128, so group-128 quantization applies to every layer
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 256
    # Defaults from benchmarks/calibration_sweep.py (README, "Calibration"): pre-train on the
    # generic corpus, then fine-tune like MUSE's targets; this gave the clearest target/retrain
    # separation of the recipes tried (VerbMem_f 76.6 vs 24.8).
    pretrain_epochs: int = 10     # epochs on the generic corpus before the target fine-tune
    pretrain_lr: float = 3e-3
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    seed: int = 0
    #: dtype the target/retrain are saved in (the papers' models are stored in bf16)
    save_dtype: Literal["float32", "bfloat16"] = "float32"


def _check_recipe(overrides: dict[str, Any]) -> dict[str, Any]:
    TrainRecipe.model_validate(overrides)  # unknown keys and bad values fail here, before any work
    return overrides


#: A task parameter holding overrides of its model-training recipe (keys of TrainRecipe).
RecipeOverrides = Annotated[dict[str, Any], AfterValidator(_check_recipe), Field(default_factory=dict)]


def with_overrides(preset: TrainRecipe, overrides: dict[str, Any]) -> TrainRecipe:
    """`preset` with the keys the user set in `overrides` replaced."""
    return preset.model_copy(update=TrainRecipe.model_validate(overrides).model_dump(exclude_unset=True))


class Task(Plugin):
    """A task writes its data in the MUSE layout and says how its models are obtained."""

    #: Hub IDs (or None) of the task's standard target and retrain models.
    default_target: str | None = None
    default_retrain: str | None = None
    #: Shown with every result of the task (e.g. "scaled-down replica, not the paper's numbers").
    note: str | None = None
    #: A published AUC of the task's retrain model (PrivLeak's reference) for runs without one.
    published_auc_retrain: float | None = None
    #: The generative metric that stands for "what the model must keep" (the leaderboard's ranking
    #: gate). MUSE's utility is KnowMem on retain; tasks whose models are too small to answer
    #: questions (KnowMem ~ 0 for every model, target included) use VerbMem on retain instead.
    utility_metric: str = "knowmem_r"

    def source_fingerprint(self) -> str | None:
        """A hash of external data the task reads (a local folder, say), so that changed files
        rebuild the task folder; None when the parameters alone determine the data."""
        return None

    @abstractmethod
    def materialize(self, out_dir: Path) -> None:
        """Write the task's data into `out_dir` in the MUSE layout. Must be deterministic."""

    def train_recipe(self) -> TrainRecipe | None:
        """The recipe for training target/retrain locally, or None when the task uses existing models."""
        return None

    def generic_corpus(self) -> list[str]:
        """Documents used to pre-train a from-scratch model before the target fine-tune (may be empty)."""
        return []
