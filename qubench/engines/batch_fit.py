"""`--batch-size auto` for the in-process engine: the largest batch that fits the GPU a model is on.

Two steps, both per model (a bitsandbytes checkpoint leaves more room than a float32 one):
1. an estimate from the model's config and the GPU's free memory (`estimate_batch`): what one
   sequence of the longest evaluated length adds at the peak of a forward pass (its logits, its
   KV cache, one layer's widest activations), divided into the free memory with some headroom, as a
   power of two, at most AUTO_CAP;
2. a probe that runs one forward pass of that batch at that length, halving the batch on an
   out-of-memory error (accelerate's `find_executable_batch_size`), so a wrong estimate costs a
   retry, not the run.
A forward pass over full-length sequences bounds both of the evaluation's workloads: PrivLeak scores
documents of up to the context length in one forward pass, and greedy generation keeps only the
last position's logits while its KV cache grows to prompt + new tokens, within the same length.

On the CPU there is no device memory to fit and no out-of-memory error to catch (the process
swaps instead): `auto` means CPU_BATCH there, the spec's default batch size.
"""

from __future__ import annotations

from typing import Any

import torch

from qubench.specs import DEFAULT_BATCH_SIZE

AUTO_CAP = 256       # probe sets are at most a few hundred items: a larger batch buys nothing
CPU_BATCH = DEFAULT_BATCH_SIZE  # RunSpec's default batch size
HEADROOM = 0.8       # share of the free memory the estimate plans to fill


def sequence_bytes(config, length: int, dtype_bytes: int) -> int:
    """Peak memory one sequence of `length` tokens adds to a forward pass of a decoder-only model."""
    cfg = getattr(config, "text_config", None) or config
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    logits = length * cfg.vocab_size * (dtype_bytes + 4)      # the model's logits, and one float32 copy
    kv_cache = 2 * layers * kv_heads * head_dim * length * dtype_bytes
    # One layer at a time: residual, normed and attention states, the MLP's gate/up products, and
    # the attention scores where the kernel materialises them (eager attention; SDPA needs less).
    activations = length * (4 * hidden + 3 * inter) * dtype_bytes + heads * length * length * dtype_bytes
    return logits + kv_cache + activations


def estimate_batch(config, length: int, free_bytes: int, dtype_bytes: int, cap: int = AUTO_CAP) -> int:
    """The largest power of two <= `cap` whose sequences fit HEADROOM of `free_bytes` (at least 1)."""
    fits = int(free_bytes * HEADROOM) // max(1, sequence_bytes(config, length, dtype_bytes))
    batch = 1
    while batch * 2 <= min(fits, cap):
        batch *= 2
    return batch


def _free_bytes(model: torch.nn.Module) -> int:
    """The least free memory among the GPUs holding the model (the batch passes through each)."""
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    return min(torch.cuda.mem_get_info(d)[0] for d in devices)


def probe_largest(start: int, run) -> int:
    """The largest of start, start/2, start/4, ... for which `run(batch)` raises no out-of-memory
    error (accelerate's find_executable_batch_size, halving); 1 if none does (the evaluation then
    fails with the real error). Other errors propagate."""
    from accelerate.utils import find_executable_batch_size

    batch = start

    def halve() -> int:
        nonlocal batch
        batch //= 2
        return batch

    try:
        return find_executable_batch_size(run, starting_batch_size=start, reduce_batch_size_fn=halve)()
    except RuntimeError as exc:
        if "No executable batch size found" not in str(exc):
            raise
        return 1


def fit_batch_size(model: torch.nn.Module, length: int, cap: int = AUTO_CAP) -> tuple[int, dict[str, Any]]:
    """The batch size for `auto` on the device `model` is on, and how it was found (for the record)."""
    if model.device.type != "cuda":
        return CPU_BATCH, {"how": f"cpu: no device memory to fit, the default {CPU_BATCH}"}
    dtype_bytes = next(model.parameters()).element_size()
    free = _free_bytes(model)
    start = estimate_batch(model.config, length, free, dtype_bytes, cap)
    tried: list[int] = []

    def forward(size: int) -> int:
        tried.append(size)
        with torch.inference_mode():
            ids = torch.ones((size, length), dtype=torch.long, device=model.device)
            logits = model(input_ids=ids).logits
            torch.log_softmax(logits[0].float(), dim=-1)
            del logits
        return size

    try:
        found = probe_largest(start, forward)
    finally:
        torch.cuda.empty_cache()
    return found, {"how": "fitted to free GPU memory", "estimate": start, "tried": tried,
                   "free_gib": round(free / 2**30, 2), "length": length}
