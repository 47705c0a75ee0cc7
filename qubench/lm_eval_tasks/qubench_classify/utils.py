"""lm-eval glue for the qubench_classify tasks: labelled texts in, one prompt per text.

Data comes from the `classify/` folder of a task's data folder (see
qubench.tasks.classify), named by the task metadata key `data_root` or, failing
that, the environment variable QUBENCH_DATA_ROOT, exactly as for qubench_muse;
nothing is fetched from the hub. Each doc carries its rendered prompt and the
choices from classify/format.json, so the YAMLs need no task-specific wording.
"""

from __future__ import annotations

import datasets

from qubench.tasks import classify
from qubench.tasks.muse_layout import data_file


def _load(split: str, data_root) -> datasets.DatasetDict:
    fmt_file = data_file("classify/format.json", data_root, "qubench_classify",
                         missing="the task in that folder has no classification view")
    fmt, sets = classify.load(fmt_file.parents[1])
    rows = [{"text": i.text, "label": i.label, "prompt": fmt.render(i.text), "choices": list(fmt.choices)}
            for i in sets[split]]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_forget(data_root=None, **_) -> datasets.DatasetDict:
    return _load("forget", data_root)


def load_holdout(data_root=None, **_) -> datasets.DatasetDict:
    return _load("holdout", data_root)


def load_retain(data_root=None, **_) -> datasets.DatasetDict:
    return _load("retain", data_root)


def load_test(data_root=None, **_) -> datasets.DatasetDict:
    return _load("test", data_root)


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])
