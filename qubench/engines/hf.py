"""`hf`: evaluate an in-memory transformers model in this process.

Generation goes through lm-eval's HFLM (batched, left-padded greedy
`generate_until`); PrivLeak log-probs come from plain forward passes, batched by length.
The model runs wherever its loader put it (the run's device; `device_map` over
several GPUs): inputs follow `model.device`. Batch size `auto` is fitted per
model to the free memory of its GPU (`qubench.engines.batch_fit`).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from importlib.metadata import PackageNotFoundError, version as dist_version
from typing import Any

import torch

from qubench.engines.base import Engine


class HFEngine(Engine):
    name = "hf"
    description = "In-process Hugging Face transformers model (lm-eval HFLM for generation)."

    def __init__(self, config=None):
        super().__init__(config)
        self._fitted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (batch, record)

    def batch_size(self, model: Any, tokenizer: Any) -> int:
        """The configured batch size, or for `auto` the one fitted to `model`'s GPU (once per model)."""
        if self.config.batch_size != "auto":
            return self.config.batch_size
        if model not in self._fitted:
            from qubench.engines.batch_fit import fit_batch_size

            self._fitted[model] = fit_batch_size(model, self.max_length(model, tokenizer))
        return self._fitted[model][0]

    def lm(self, model: Any, tokenizer: Any):
        from lm_eval.models.huggingface import HFLM

        # add_bos_token stays None on purpose: HFLM then encodes with the tokenizer's
        # default add_special_tokens=True, which is what MUSE does (one BOS for Llama).
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size(model, tokenizer))

    @torch.inference_mode()
    def token_logprobs(self, model: Any, tokenizer: Any, texts: list[str], max_length: int) -> list[list[float]]:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        model.eval()
        encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
        # Only documents of equal length share a batch, so nothing is padded: a document's
        # log-probs are then computed the same way whatever shares its batch, and do not depend on
        # the batch size (with padding, its attention sums ran over the batch's padded width and
        # moved in the last bits). Longest first; results go back in input order.
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(encoded):
            if len(ids) > 1:
                by_length[len(ids)].append(i)
        out: list[list[float]] = [[] for _ in texts]
        bs = self.batch_size(model, tokenizer)
        for n in sorted(by_length, reverse=True):
            same_length = by_length[n]
            for start in range(0, len(same_length), bs):
                batch = same_length[start:start + bs]
                ids = torch.tensor([encoded[i] for i in batch], dtype=torch.long, device=model.device)
                logits = model(input_ids=ids).logits
                for row, i in enumerate(batch):
                    # One row at a time in float32: a batch of long documents' full-vocabulary
                    # logits would not fit a GPU twice over.
                    logprobs = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)
                    out[i] = logprobs.gather(-1, ids[row, 1:].unsqueeze(-1)).squeeze(-1).tolist()
        return out

    def run_record(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        record = {"device": str(model.device), "batch_size": self.batch_size(model, tokenizer)}
        device_map = getattr(model, "hf_device_map", None)
        if device_map and len(set(device_map.values())) > 1:  # spread over several devices
            record["device_map"] = {k: str(v) for k, v in device_map.items()}
        if model in self._fitted:
            record["batch_fit"] = self._fitted[model][1]
        return record

    def version(self) -> str:
        parts = []
        for dist in ("transformers", "torch", "lm_eval"):
            try:
                parts.append(f"{dist} {dist_version(dist)}")
            except PackageNotFoundError:
                parts.append(f"{dist} ?")
        return ", ".join(parts)
