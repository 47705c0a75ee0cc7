"""`synth-news`: the offline default task, a seeded fictional news world in the MUSE layout."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from qubench.plugin import PluginConfig
from qubench.tasks.base import RecipeOverrides, Task, TrainRecipe, with_overrides
from qubench.tasks.muse_layout import write_docs
from qubench.tasks.synth_templates import MAX_FACTS_PER_DOC
from qubench.tasks.synth_world import Article, PhraseIndex, SynthWorld, build_world, choose_questions

PROBE_CAP = 100           # MUSE evaluates at most 100 KnowMem questions / VerbMem probes per set
VERBMEM_PROMPT_WORDS = 16  # enough to name the article's event before the continuation starts


@dataclass(frozen=True)
class Sizes:
    n_forget: int
    n_retain: int
    n_holdout: int
    facts_per_doc: int
    n_generic: int
    icl_examples: int


PRESETS = {
    "default": Sizes(n_forget=100, n_retain=100, n_holdout=100, facts_per_doc=5, n_generic=400, icl_examples=3),
    "micro": Sizes(n_forget=12, n_retain=12, n_holdout=12, facts_per_doc=3, n_generic=20, icl_examples=3),
    "gpu": Sizes(n_forget=100, n_retain=100, n_holdout=100, facts_per_doc=5, n_generic=2000, icl_examples=3),
}

MICRO_RECIPE = TrainRecipe(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    pretrain_epochs=1, epochs=3, batch_size=8,
)

# A ~160M-parameter Llama for one GPU (benchmarks/gpu_check.py), sized so that training it takes well
# under a minute on an H100/H200. Parameters: embeddings and lm_head 2 x 4096 x 1024 = 8.4M; each of
# 12 layers 4 x 1024^2 (attention) + 3 x 1024 x 2816 (MLP) = 12.85M; 162.6M in all. Tokens (measured
# with the trained 4096-token vocabulary): 4,000 generic documents (2,000 articles and their QA
# sheets, 154 tokens on average, 615k in all) x 3 pre-training epochs = 1.85M, then 20 epochs over
# forget + retain (22.5k tokens: 0.45M) for the target and over retain (0.22M) for the retrain
# model: 2.5M trained tokens. At 6 FLOPs per parameter per trained token that is
# 6 x 162.6M x 2.5M = 2.5e15 FLOPs: 2.5 s at the H100/H200's 989 TFLOP/s dense bf16 peak, ~17 s at
# the ~15% of peak an eager PyTorch Llama this small reaches with 5k-token batches; plus ~600
# optimizer steps (batch 32) of mostly kernel-launch overhead, ~10 s. The widths are multiples of 128
# (group-128 quantization applies to every layer) and the heads 64 wide (vLLM's kernels take them).
GPU_RECIPE = TrainRecipe(
    vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16,
    pretrain_epochs=3, pretrain_lr=1e-3, epochs=20, lr=5e-4, batch_size=32,
)
RECIPES = {"default": TrainRecipe(), "micro": MICRO_RECIPE, "gpu": GPU_RECIPE}


class SynthNews(Task):
    """Short news articles about invented people, towns and organisations.

    Every name is composed from random syllables and every date, sum and count
    is random, so a model can only know a fact by having trained on it.

    Sizes (documents; override any with the explicit fields):

    - ``default``: 100 forget, 100 retain, 100 holdout and 400 generic
      articles of about 60-110 words (a lead sentence plus 5 detail
      sentences; ~115 tokens at vocab 2048), 3 in-context examples. Aimed
      at the standard ~1.3M-parameter recipe on a 2-core CPU.
    - ``micro``: 12 / 12 / 12 articles, 3 details, 20 generic, and a 2-layer
      width-64 recipe for 3 epochs: for tests, it only has to run fast.
    - ``gpu``: the default's 100 / 100 / 100 articles with 2,000 generic ones,
      and a ~160M-parameter 12-layer width-1024 recipe (GPU_RECIPE) that trains
      in under a minute on one H100/H200 (run it with --device cuda).

    Probes: one KnowMem question per forget (retain) article, one VerbMem
    probe per forget (holdout) article, each capped at 100; PrivLeak lists
    every article of its split. Questions are never worded like the article
    text (no shared six-word window), and answers are 1-4 words copied from it.
    """

    name = "synth-news"
    utility_metric = "verbmem_r"  # the tiny models answer almost no question (README, "Calibration")
    description = "Offline synthetic news about invented people, towns and organisations (seeded, MUSE layout)"

    class Config(PluginConfig):
        size: Literal["default", "micro", "gpu"] = "default"
        n_forget: int | None = Field(None, ge=1, le=5000)
        n_retain: int | None = Field(None, ge=1, le=5000)
        n_holdout: int | None = Field(None, ge=1, le=5000)
        facts_per_doc: int | None = Field(None, ge=1, le=MAX_FACTS_PER_DOC)
        n_generic: int | None = Field(None, ge=0, le=20000)
        icl_examples: int | None = Field(None, ge=0, le=20)
        seed: int = 0
        generic_qa: bool = True
        #: Overrides of the preset's model-training recipe (keys of qubench.tasks.base.TrainRecipe).
        recipe: RecipeOverrides

    def sizes(self) -> Sizes:
        """The preset for `size`, with every explicit override applied."""
        preset = PRESETS[self.config.size]
        return Sizes(**{k: v if (v := getattr(self.config, k)) is not None else getattr(preset, k)
                        for k in Sizes.__dataclass_fields__})

    @cached_property
    def world(self) -> SynthWorld:
        s = self.sizes()
        return build_world(self.config.seed, s.n_forget, s.n_retain, s.n_holdout, s.n_generic, s.facts_per_doc)

    def train_recipe(self) -> TrainRecipe:
        return with_overrides(RECIPES[self.config.size], self.config.recipe)

    def generic_corpus(self) -> list[str]:
        """Generic articles, plus (with `generic_qa`) question-answer sheets about their facts in
        the KnowMem format. A pretrained model knows how to answer a question about something it
        read; a from-scratch model learns that skill only from such examples about *other*
        entities (mixed training), without which KnowMem would measure nothing."""
        articles = [a.text for a in self.world.generic]
        if not self.config.generic_qa:
            return articles
        sheets = ["\n\n".join(f"Question: {f.question}\nAnswer: {f.answer}" for f in a.facts)
                  for a in self.world.generic]
        return articles + sheets

    def materialize(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        world, sizes = self.world, self.sizes()
        splits = {"forget": world.forget, "retain": world.retain, "holdout": world.holdout}
        for split, articles in splits.items():
            write_docs(out_dir / "raw" / f"{split}.txt", _texts(articles))
            _write_json(out_dir / "privleak" / f"{split}.json", _texts(articles))
        for split in ("forget", "retain", "holdout"):
            _write_json(out_dir / "verbmem" / f"{split}.json",
                        [verbmem_probe(a.text) for a in splits[split][:PROBE_CAP]])
        # Questions must not copy any wording the models are trained on, generic pre-training included.
        index = PhraseIndex(_texts(world.forget + world.retain + world.holdout + world.generic))
        rng = random.Random(f"qubench/synth-news/{self.config.seed}/questions")
        for split in ("forget", "retain"):
            evaluated, icl = choose_questions(splits[split], PROBE_CAP, sizes.icl_examples, index, rng)
            _write_json(out_dir / "knowmem" / f"{split}_qa.json", _qa_rows(evaluated))
            _write_json(out_dir / "knowmem" / f"{split}_qa_icl.json", _qa_rows(icl))


def verbmem_probe(doc: str, prompt_words: int = VERBMEM_PROMPT_WORDS) -> dict[str, str]:
    """The first words of `doc` as prompt; the rest, leading space kept, as gt (prompt + gt == doc)."""
    ends = [m.end() for m in re.finditer(r"\S+", doc)]
    cut = ends[min(prompt_words, len(ends) - 1) - 1]
    return {"prompt": doc[:cut], "gt": doc[cut:]}


def _texts(articles: list[Article]) -> list[str]:
    return [a.text for a in articles]


def _qa_rows(facts) -> list[dict[str, str]]:
    return [{"question": f.question, "answer": f.answer} for f in facts]


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
