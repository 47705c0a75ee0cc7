"""`twitter-misinfo`: unlearning fake COVID-19 posts from a real labelled corpus (the QUAIL setting).

Two views of one target model, both scored before and after quantization:

- generative (MUSE-style): VerbMem on forget posts (first 8 words -> the rest),
  PrivLeak Min-40% forget vs holdout, VerbMem on retain posts as utility;
  no KnowMem, since posts carry no question-answer facts;
- classification: the target is also trained to label posts ("Post: ...\\nLabel: fake");
  lm-eval `multiple_choice` accuracy on forget (cls_f), never-trained fake posts
  (cls_holdout, the level forgetting should reach), retain (cls_r) and a balanced
  test split (cls_test, utility).

Sources and splits: see `misinfo_sources` and `misinfo_layout`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field

from qubench.plugin import PluginConfig
from qubench.tasks import misinfo_sources
from qubench.tasks.base import RecipeOverrides, Task, TrainRecipe, with_overrides
from qubench.tasks.misinfo_layout import Post, Sizes, Splits, labelled_docs, split_posts, write_layout

#: The CONSTRAINT-2021 English training set in the public repository of Das et al. (MIT licence).
#: Used when no `source` is given; machines without network access pass a local copy.
DEFAULT_SOURCE = "https://raw.githubusercontent.com/diptamath/covid_fake_news/main/data/Constraint_Train.csv"
#: Posts of 12-60 words: enough for an 8-word VerbMem prompt plus a continuation, and no
#: multi-page outliers (a few posts run over 1,000 words) dominating training time.
MIN_WORDS, MAX_WORDS = 12, 60

PRESETS = {
    "default": Sizes(n_forget=150, n_holdout=150, n_retain=150, n_test=300, n_generic=1000),
    "micro": Sizes(n_forget=12, n_holdout=12, n_retain=12, n_test=24, n_generic=48),
}
#: The standard ~1.3M-parameter model, trained with fewer epochs but smaller batches than
#: synth-news's recipe. Memorisation follows the number of optimizer steps more than the tokens
#: seen, and short posts padded in small batches waste little compute. Calibrated on CONSTRAINT-2021
#: at the default sizes (one CPU thread, ~6 min of training): batch 16 gave target/retrain
#: VerbMem_f 20/9, batch 8 39/9, batch 4 57/9. With batch 4, label accuracy is 99 on forget
#: posts, 88 on never-trained fake posts and 85 on the test split.
DEFAULT_RECIPE = TrainRecipe(pretrain_epochs=5, epochs=10, batch_size=4)
MICRO_RECIPE = TrainRecipe(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    pretrain_epochs=1, epochs=3, batch_size=8,
)


class MisinfoConfig(PluginConfig):
    #: The size preset; any explicit n_* below overrides its value (see PRESETS).
    size: Literal["default", "micro"] = "default"
    n_forget: int | None = Field(None, ge=1, le=20000)
    n_holdout: int | None = Field(None, ge=1, le=20000)
    n_retain: int | None = Field(None, ge=1, le=20000)
    n_test: int | None = Field(None, ge=2, le=20000)
    n_generic: int | None = Field(None, ge=0, le=100000)
    #: Seeds the splits (and, for synth-misinfo, the generated posts).
    seed: int = 0
    #: Overrides of the preset's model-training recipe (keys of qubench.tasks.base.TrainRecipe).
    recipe: RecipeOverrides


class MisinfoTask(Task):
    """What both misinformation tasks share: sizes, recipe, splits, layout, generic corpus."""

    presets = PRESETS
    utility_metric = "verbmem_r"  # posts carry no QA facts: no KnowMem
    default_recipe = DEFAULT_RECIPE
    micro_recipe = MICRO_RECIPE

    def sizes(self) -> Sizes:
        preset = self.presets[self.config.size]
        return Sizes(**{k: v if (v := getattr(self.config, k)) is not None else getattr(preset, k)
                        for k in Sizes.__dataclass_fields__})

    def posts(self) -> list[Post]:
        raise NotImplementedError

    @cached_property
    def splits(self) -> Splits:
        return split_posts(self.posts(), self.sizes(), f"qubench/{self.name}/{self.config.seed}/splits")

    def train_recipe(self) -> TrainRecipe:
        preset = self.micro_recipe if self.config.size == "micro" else self.default_recipe
        return with_overrides(preset, self.config.recipe)

    def generic_corpus(self) -> list[str]:
        """Other posts as labelled prompts: the base model learns the genre and the labelling skill
        from posts outside every split, as a pretrained model would bring them. (Labelled only, not
        also plain as forget/retain are: the prompt holds the whole post, and pre-training is the
        largest share of training time.)"""
        return labelled_docs(self.splits.generic)

    def materialize(self, out_dir: Path) -> None:
        write_layout(self.splits, Path(out_dir))


class TwitterMisinfo(MisinfoTask):
    """Real COVID-19 posts labelled real/fake: CONSTRAINT-2021 or the COVID-19 rumor tweets.

    Sizes (posts; override any with the explicit fields): ``default`` 150 forget,
    150 holdout, 150 retain, 300 test, 1000 generic with `DEFAULT_RECIPE` (a run takes
    roughly 10-15 min on a 2-core CPU); ``micro`` 12/12/12/24/48 with a 2-layer width-64
    recipe, for tests. Only posts of 12-60 words are used.
    """

    name = "twitter-misinfo"
    description = ("Real COVID-19 posts labelled real/fake (CONSTRAINT-2021 or COVID-19 rumor CSVs, local or URL): "
                   "unlearn fake posts; generative + classification views")

    class Config(MisinfoConfig):
        #: A CSV file, a folder of them, or an http(s) URL of one (downloaded into the qubench cache).
        source: str = DEFAULT_SOURCE
        #: Which corpus format to read; 'auto' recognises each CSV by its header.
        dataset: Literal["auto", "constraint", "rumor"] = "auto"

    def source_fingerprint(self) -> str | None:
        return misinfo_sources.fingerprint(self.config.source)

    @cached_property
    def _posts(self) -> list[Post]:
        posts = misinfo_sources.load_posts(self.config.source, self.config.dataset)
        return [p for p in posts if MIN_WORDS <= len(p.text.split()) <= MAX_WORDS]

    def posts(self) -> list[Post]:
        return self._posts
