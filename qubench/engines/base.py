"""Evaluation-engine plugins: how one model under evaluation is run.

An engine hides where the model lives (in this process for `hf`, behind a
server for a future vLLM engine) behind two capabilities the evaluator needs:
an lm-eval `LM` for the generation tasks, and per-token log-probabilities for
PrivLeak. The evaluator never touches the model object itself.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qubench.plugin import Plugin, PluginConfig
from qubench.specs import DEFAULT_BATCH_SIZE, EvalBatchSize

#: Used when neither the model config nor the tokenizer states a usable context length.
FALLBACK_MAX_LENGTH = 2048


#: The request batch of engines that batch by themselves (vLLM schedules its own memory) when the
#: batch size is "auto".
AUTO_REQUEST_BATCH = 64


class EngineConfig(PluginConfig):
    batch_size: EvalBatchSize = DEFAULT_BATCH_SIZE

    def request_batch(self) -> int:
        """The batch size as a number, for engines that fit nothing themselves."""
        return AUTO_REQUEST_BATCH if self.batch_size == "auto" else self.batch_size


class Engine(Plugin, ABC):
    Config = EngineConfig

    @contextlib.contextmanager
    def session(self, model_dir: Path, loader: Callable[[Path], Any]) -> Iterator[Any]:
        """Make the checkpoint in `model_dir` ready to evaluate; yields the `model` handle that
        `lm` and `token_logprobs` receive, and releases it afterwards (even on errors).

        In-process engines load it with `loader` (which knows how the quantizer stored it);
        server engines start a server on the folder and yield a handle to it.
        """
        yield loader(model_dir)

    @abstractmethod
    def lm(self, model: Any, tokenizer: Any):
        """An `lm_eval.api.model.LM` that runs greedy `generate_until` on `model`.

        Prompts must be encoded as MUSE encodes them (add_special_tokens=True:
        exactly one BOS for Llama-style tokenizers).
        """

    @abstractmethod
    def token_logprobs(self, model: Any, tokenizer: Any, texts: list[str], max_length: int) -> list[list[float]]:
        """Per text: log p(token_i | tokens_<i) for every token after the first.

        Texts are encoded with special tokens and cut to `max_length` tokens
        before scoring, so a text of n tokens yields n - 1 values.
        """

    def max_length(self, model: Any, tokenizer: Any) -> int:
        """The longest sequence the model accepts (PrivLeak truncates documents to it)."""
        config = getattr(model, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        # Tokenizers without a limit report a huge sentinel (int(1e30)); ignore it.
        value = getattr(tokenizer, "model_max_length", None)
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
        return FALLBACK_MAX_LENGTH

    def version(self) -> str:
        """Versions of the software that produces the numbers (recorded with cached evaluations)."""
        return "unknown"

    def run_record(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """How the engine ran one checkpoint (where, what batch size), recorded beside its metrics.
        Not part of the evaluation's identity: what is filled in at run time (a batch size fitted
        to free memory, say) cannot name an artifact before it is built."""
        return {}

    def choice_record(self) -> dict[str, Any]:
        """For an engine picked by `--engine auto`: that it was, and why (see qubench.engines.auto)."""
        return dict(getattr(self, "chosen_by_auto", None) or {})
