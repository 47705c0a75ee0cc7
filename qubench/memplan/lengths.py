"""Token counts the memory plan takes from the task data when it is here: the longest training window,
the forget set's size (QUAIL's cache), the longest generation prompt and PrivLeak document, the
calibration set. Without the data the plan uses the bounds the configs give (max_len, the model's
context) and says so. Counted with the model's own tokenizer when its folder has one, else estimated
from characters (English BPE averages ~4 characters per token; 3 leaves a margin)."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel

CHARS_PER_TOKEN = 3


class Lengths(BaseModel):
    source: str                                  # how they were obtained, for the report
    train_windows: list[int] | None = None       # tokens of each forget window at the method's max_len
    retain_longest: int | None = None            # longest retain document (tokens)
    prompt_tokens: int | None = None             # longest VerbMem / KnowMem prompt
    document_tokens: int | None = None           # longest PrivLeak document
    calibration_docs: list[int] | None = None    # tokens of the first calibration documents (non-empty)

    def train_seq(self, max_len: int) -> int | None:
        if self.train_windows is None:
            return None
        return min(max_len, max([*self.train_windows, self.retain_longest or 0]))

    def forget_tokens(self) -> int | None:
        return sum(self.train_windows) if self.train_windows is not None else None

    def calibration_tokens(self, samples: int, max_seq: int) -> int | None:
        """Tokens of llm-compressor's calibration rows (quantizers.llmc.calibration_rows: the first
        `samples` non-empty documents, each cut at `max_seq`)."""
        if self.calibration_docs is None:
            return None
        rows = [n for n in self.calibration_docs if n > 1][:samples]
        return sum(min(n, max_seq) for n in rows)


def _counter(tokenizer):
    if tokenizer is None:
        return lambda texts: [math.ceil(len(t) / CHARS_PER_TOKEN) + 1 for t in texts]

    def count(texts):
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]

    return count


def _load_tokenizer(model_dir: Path | None):
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # a config-only folder: estimate from characters
        return None


def measure(data, model_dir: Path | None, max_len: int, calibration_samples: int = 0) -> Lengths:
    """Lengths of `data` (muse_layout.TaskData) in tokens of the model in `model_dir`."""
    from qubench.evaluation.metrics import knowmem_prompt
    from qubench.methods.data import chunk_documents
    from qubench.stages.quantized import calibration_texts

    tokenizer = _load_tokenizer(model_dir)
    count = _counter(tokenizer)
    if tokenizer is not None:
        windows = [len(w) for w in chunk_documents(data.forget, tokenizer, max_len)]
        source = "task data, counted with the model's tokenizer"
    else:
        windows = [min(n, max_len) for n in count(data.forget) for _ in range(math.ceil(n / max_len))]
        source = f"task data, estimated at {CHARS_PER_TOKEN} characters per token (no tokenizer in the model folder)"
    prompts = [p.prompt for p in (*data.verbmem_forget, *data.verbmem_holdout, *data.verbmem_retain)]
    for questions, icl in ((data.knowmem_forget, data.knowmem_forget_icl),
                           (data.knowmem_retain, data.knowmem_retain_icl)):
        shots = [(qa.question, qa.answer) for qa in icl]
        prompts += [knowmem_prompt(qa.question, shots) for qa in questions]
    calibration = [t for t in calibration_texts(data) if t.strip()][: max(calibration_samples, 0)]
    return Lengths(
        source=source, train_windows=windows, retain_longest=max(count(data.retain), default=0),
        prompt_tokens=max(count(prompts), default=None),
        document_tokens=max(count([*data.privleak_forget, *data.privleak_holdout]), default=None),
        calibration_docs=count(calibration),
    )
