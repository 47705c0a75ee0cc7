"""The two reference "methods": the untouched target and the retrain model.

They bracket every result: `target` is what unlearning starts from, `retrain`
(trained without the forget set) is what perfect unlearning would reach.
Both just copy an existing save_pretrained folder, so they go through the
same quantize-and-evaluate pipeline as real methods.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qubench.errors import ConfigError
from qubench.methods.base import UnlearnContext, UnlearnMethod, UnlearnOutcome


def _copy_model_folder(src: Path, dst: Path, what: str) -> None:
    if not Path(src).is_dir():
        raise ConfigError(f"the {what} model folder {src} does not exist")
    shutil.copytree(src, dst, dirs_exist_ok=True)


class Target(UnlearnMethod):
    name = "target"
    description = "No unlearning: the target model itself (the upper reference)."

    def unlearn(self, ctx: UnlearnContext) -> UnlearnOutcome:
        _copy_model_folder(ctx.target_dir, ctx.out_dir, "target")
        return UnlearnOutcome()


class Retrain(UnlearnMethod):
    name = "retrain"
    description = "The model trained without the forget set (the gold standard of unlearning)."
    uses_retrain_model = True

    def unlearn(self, ctx: UnlearnContext) -> UnlearnOutcome:
        if ctx.retrain_dir is None:
            raise ConfigError(
                "method 'retrain' needs a retrain model, but this task has none; "
                "provide one or drop 'retrain' from the methods"
            )
        _copy_model_folder(ctx.retrain_dir, ctx.out_dir, "retrain")
        return UnlearnOutcome()
