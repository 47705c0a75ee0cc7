"""`hf`: evaluate an in-memory transformers model in this process.

Generation goes through lm-eval's HFLM (batched, left-padded greedy
`generate_until`); PrivLeak log-probs come from plain batched forward passes.
The model runs wherever its loader put it (the run's device; `device_map` over
several GPUs): inputs follow `model.device`. Batch size `auto` is fitted per
model to the free memory of its GPU (`qubench.engines.batch_fit`).
"""

from __future__ import annotations

import weakref
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
        # Longest first so each batch pads little; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out: list[list[float]] = [[] for _ in texts]
        bs = self.batch_size(model, tokenizer)
        for start in range(0, len(order), bs):
            batch = [i for i in order[start:start + bs] if len(encoded[i]) > 1]
            if not batch:
                continue
            width = len(encoded[batch[0]])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                # Right padding: real tokens keep positions 0..n-1 and never attend to padding.
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            for row, i in enumerate(batch):
                n = len(encoded[i])
                logprobs = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)
                targets = ids[row, 1:n].to(logprobs.device).unsqueeze(-1)
                out[i] = logprobs.gather(-1, targets).squeeze(-1).tolist()
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
