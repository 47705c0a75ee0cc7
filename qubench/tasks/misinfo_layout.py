"""Shared by `twitter-misinfo` and `synth-misinfo`: labelled posts -> splits -> MUSE layout
with a classification view.

Splits (all disjoint, drawn by a seeded shuffle):

- forget:  `n_forget` fake posts; the target trains on them, unlearning removes them;
- holdout: `n_holdout` fake posts never trained on (PrivLeak's members-vs-non-members
  reference and the floor of forget-set label accuracy);
- retain:  `n_retain` real posts; the target and the retrain model train on them;
- test:    `n_test` never-trained posts, half fake, half real (classification utility);
- generic: up to `n_generic` of the remaining posts, half of each label, for
  pre-training the base model (as labelled prompts), so that it learns the labelling
  skill on *other* posts and the target's accuracy on held-out posts means something.

Training documents: each forget/retain post appears twice, as plain text and as
a labelled prompt ("Post: ...\\nLabel: fake"), both in raw/forget.txt or
raw/retain.txt, so unlearning the forget corpus unlearns its labels too.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qubench.errors import DataError
from qubench.tasks import classify
from qubench.tasks.classify import ClassifyFormat, ClassifyItem
from qubench.tasks.muse_layout import write_docs
from qubench.tasks.synth_news import verbmem_probe

REAL, FAKE = "real", "fake"
PROBE_CAP = 100          # VerbMem probes per set, as MUSE (classification and PrivLeak use every post)
VERBMEM_PROMPT_WORDS = 8  # posts are short: 8 words name the post, the rest is the continuation
FORMAT = ClassifyFormat()  # "Post: {text}\nLabel:" with choices real/fake


@dataclass(frozen=True)
class Post:
    text: str      # whitespace collapsed to single spaces: one line, no document separator
    label: str     # REAL or FAKE
    origin: str = ""  # where it came from ("file#record"), for tracing a post back to its source


@dataclass(frozen=True)
class Sizes:
    n_forget: int
    n_holdout: int
    n_retain: int
    n_test: int
    n_generic: int


@dataclass(frozen=True)
class Splits:
    forget: list[Post]
    holdout: list[Post]
    retain: list[Post]
    test: list[Post]
    generic: list[Post]


def split_posts(posts: list[Post], sizes: Sizes, seed: str) -> Splits:
    """Disjoint seeded splits; the same posts, sizes and seed give the same splits."""
    rng = random.Random(seed)
    fake = [p for p in posts if p.label == FAKE]
    real = [p for p in posts if p.label == REAL]
    rng.shuffle(fake)
    rng.shuffle(real)
    test_fake, test_real = sizes.n_test // 2, sizes.n_test - sizes.n_test // 2
    need_fake = sizes.n_forget + sizes.n_holdout + test_fake
    need_real = sizes.n_retain + test_real
    if len(fake) < need_fake or len(real) < need_real:
        raise DataError(
            f"not enough posts for the requested sizes: {len(fake)} fake and {len(real)} real are usable, "
            f"need {need_fake} fake (n_forget + n_holdout + n_test/2) and {need_real} real (n_retain + n_test/2); "
            "lower the sizes (--task-param n_forget=...) or use a larger source"
        )
    forget, holdout = fake[:sizes.n_forget], fake[sizes.n_forget:sizes.n_forget + sizes.n_holdout]
    retain = real[:sizes.n_retain]
    test = fake[need_fake - test_fake:need_fake] + real[sizes.n_retain:need_real]
    rng.shuffle(test)
    rest_fake, rest_real = fake[need_fake:], real[need_real:]
    half = sizes.n_generic // 2
    generic = rest_fake[:half] + rest_real[:sizes.n_generic - half]
    rng.shuffle(generic)
    return Splits(forget, holdout, retain, test, generic)


def labelled_docs(posts: list[Post]) -> list[str]:
    """Each post as a labelled prompt: "Post: <text>\nLabel: <label>"."""
    return [FORMAT.training_doc(ClassifyItem(p.text, p.label)) for p in posts]


def training_docs(posts: list[Post]) -> list[str]:
    """Each post as plain text (what VerbMem and PrivLeak probe), then each as a labelled prompt."""
    return [p.text for p in posts] + labelled_docs(posts)


def write_layout(splits: Splits, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    write_docs(out_dir / "raw/forget.txt", training_docs(splits.forget))
    write_docs(out_dir / "raw/retain.txt", training_docs(splits.retain))
    write_docs(out_dir / "raw/holdout.txt", [p.text for p in splits.holdout])  # never trained: plain text only
    for name in ("forget", "retain", "holdout"):
        posts = getattr(splits, name)
        _dump(out_dir / "privleak" / f"{name}.json", [p.text for p in posts])
        _dump(out_dir / "verbmem" / f"{name}.json",
              [verbmem_probe(p.text, VERBMEM_PROMPT_WORDS) for p in posts[:PROBE_CAP]])
    # No knowmem/: posts carry no question-answer facts, so KnowMem does not apply (the loader and
    # evaluator accept its absence and report it as not applicable).
    classify.write(out_dir, {name: [ClassifyItem(p.text, p.label) for p in getattr(splits, name)]
                             for name in classify.SPLITS}, FORMAT)
    _dump(out_dir / "sources.json", {name: [p.origin for p in getattr(splits, name)]
                                     for name in ("forget", "holdout", "retain", "test", "generic")})


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
