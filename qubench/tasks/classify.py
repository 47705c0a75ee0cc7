"""The optional classification view of a task: labelled texts and the prompt that asks for a label.

A task that has one writes, next to its MUSE layout,

    classify/format.json                        {"prompt": "Post: {text}\\nLabel:", "choices": ["real", "fake"]}
    classify/{forget,holdout,retain,test}.json  [{"text": ..., "label": ...}]

The same prompt serves training and evaluation: the target is trained on
`training_doc` (prompt + " " + label) for the forget and retain texts, and
the lm-eval `multiple_choice` tasks (tasks/qubench_classify) score each
choice as the continuation " " + choice after the prompt. Keeping the
format in the data folder, not in code, lets a task choose its own wording
while the evaluator stays generic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qubench.errors import DataError

SPLITS = ("forget", "holdout", "retain", "test")
DEFAULT_PROMPT = "Post: {text}\nLabel:"
DEFAULT_CHOICES = ("real", "fake")
#: lm-eval's default target_delimiter; the YAMLs rely on it, so it is not configurable.
DELIMITER = " "


@dataclass(frozen=True)
class ClassifyItem:
    text: str
    label: str


@dataclass(frozen=True)
class ClassifyFormat:
    prompt: str = DEFAULT_PROMPT
    choices: tuple[str, ...] = DEFAULT_CHOICES

    def render(self, text: str) -> str:
        # str.replace, not str.format: posts contain braces.
        return self.prompt.replace("{text}", text)

    def training_doc(self, item: ClassifyItem) -> str:
        """The labelled document the target model is trained on."""
        return self.render(item.text) + DELIMITER + item.label


def write(out_dir: Path, splits: dict[str, list[ClassifyItem]], fmt: ClassifyFormat = ClassifyFormat()) -> None:
    root = Path(out_dir) / "classify"
    root.mkdir(parents=True, exist_ok=True)
    _dump(root / "format.json", {"prompt": fmt.prompt, "choices": list(fmt.choices)})
    for split in SPLITS:
        _dump(root / f"{split}.json", [{"text": i.text, "label": i.label} for i in splits.get(split, [])])


def load(root: Path) -> tuple[ClassifyFormat | None, dict[str, list[ClassifyItem]]]:
    """The format and the labelled sets, or (None, empty sets) for tasks without this view."""
    folder = Path(root) / "classify"
    if not (folder / "format.json").is_file():
        return None, {split: [] for split in SPLITS}
    raw = _read(folder / "format.json")
    try:
        fmt = ClassifyFormat(prompt=str(raw["prompt"]), choices=tuple(str(c) for c in raw["choices"]))
    except (KeyError, TypeError):
        raise DataError(f"{folder / 'format.json'}: needs 'prompt' (with {{text}}) and 'choices'") from None
    if "{text}" not in fmt.prompt or len(fmt.choices) < 2:
        raise DataError(f"{folder / 'format.json'}: the prompt needs {{text}} and at least two choices")
    sets = {}
    for split in SPLITS:
        path = folder / f"{split}.json"
        rows = _read(path) if path.is_file() else []
        try:
            items = [ClassifyItem(str(r["text"]), str(r["label"])) for r in rows]
        except (KeyError, TypeError):
            raise DataError(f"{path}: every entry needs 'text' and 'label'") from None
        bad = sorted({i.label for i in items} - set(fmt.choices))
        if bad:
            raise DataError(f"{path}: labels {bad} are not among the choices {list(fmt.choices)}")
        sets[split] = items
    return fmt, sets


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
