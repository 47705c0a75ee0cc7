"""lm-eval glue for the qubench_muse tasks: data loading, prompts, scoring.

Data comes from a folder in the MUSE layout (see qubench.tasks.base), named by
the task metadata key `data_root` or, failing that, the environment variable
QUBENCH_DATA_ROOT; nothing is fetched from the hub. lm-eval calls the
`load_*` functions as custom_dataset(**metadata), so every metadata key
arrives as a keyword argument (hence the **_ catch-alls).

The metric definitions themselves live in qubench.evaluation.metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets

from qubench.errors import DataError
from qubench.evaluation.metrics import (
    VERBMEM_MAX_NEW_TOKENS,
    cut_at_stop_words,
    knowmem_prompt,
    muse_short_gt,
    rouge_l_f1,
)
from qubench.tasks.muse_layout import DATA_ROOT_ENV, data_file  # noqa: F401 (DATA_ROOT_ENV: part of this module's interface)

def _rows(rel: str, data_root, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    path = data_file(rel, data_root, "qubench_muse")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in keys) for r in rows):
        raise DataError(f"{path}: expected a list of objects with keys {', '.join(keys)}")
    return [{k: str(r[k]) for k in keys} for r in rows]


def _as_dataset(rows: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _load_tokenizer(tokenizer, pretrained):
    ref = tokenizer or pretrained
    if ref is None:
        raise DataError(
            "VerbMem cuts each reference to the model's first 128 tokens, as MUSE does, so it needs the "
            "tokenizer: pass metadata tokenizer=<path or hub id> (lm-eval's CLI passes pretrained=... "
            "from --model_args automatically)"
        )
    if not isinstance(ref, (str, os.PathLike)):
        return ref  # an already-loaded tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ref))


def _load_verbmem(rel: str, data_root, tokenizer, pretrained) -> datasets.DatasetDict:
    rows = _rows(rel, data_root, ("prompt", "gt"))
    tok = _load_tokenizer(tokenizer, pretrained)
    for row in rows:
        row["gt_short"] = muse_short_gt(tok, row["gt"], VERBMEM_MAX_NEW_TOKENS)
    return _as_dataset(rows)


def _load_knowmem(split: str, data_root) -> datasets.DatasetDict:
    rows = _rows(f"knowmem/{split}_qa.json", data_root, ("question", "answer"))
    icl = _rows(f"knowmem/{split}_qa_icl.json", data_root, ("question", "answer"))
    # Each doc carries its ICL pairs so doc_to_text alone can rebuild MUSE's prompt.
    for row in rows:
        row["icl_questions"] = [r["question"] for r in icl]
        row["icl_answers"] = [r["answer"] for r in icl]
    return _as_dataset(rows)


def load_verbmem_forget(data_root=None, tokenizer=None, pretrained=None, **_) -> datasets.DatasetDict:
    return _load_verbmem("verbmem/forget.json", data_root, tokenizer, pretrained)


def load_verbmem_retain(data_root=None, tokenizer=None, pretrained=None, **_) -> datasets.DatasetDict:
    return _load_verbmem("verbmem/retain.json", data_root, tokenizer, pretrained)


def load_verbmem_holdout(data_root=None, tokenizer=None, pretrained=None, **_) -> datasets.DatasetDict:
    return _load_verbmem("verbmem/holdout.json", data_root, tokenizer, pretrained)


def load_knowmem_forget(data_root=None, **_) -> datasets.DatasetDict:
    return _load_knowmem("forget", data_root)


def load_knowmem_retain(data_root=None, **_) -> datasets.DatasetDict:
    return _load_knowmem("retain", data_root)


def verbmem_doc_to_text(doc: dict) -> str:
    return doc["prompt"]


def knowmem_doc_to_text(doc: dict) -> str:
    return knowmem_prompt(doc["question"], list(zip(doc["icl_questions"], doc["icl_answers"], strict=True)))


def verbmem_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"rougeL_f1": rouge_l_f1(doc["gt_short"], results[0])}


def knowmem_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    # lm-eval already stopped at these words; cutting again keeps the score MUSE's
    # definition even if a backend ignores `until`.
    return {"rougeL_f1": rouge_l_f1(doc["answer"], cut_at_stop_words(results[0]))}
