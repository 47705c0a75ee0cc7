"""Per-device memory of the stages without gradients: quantization (each of the two checkpoints, one
after the other) and evaluation (each model in turn). Conventions as in `estimate`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from qubench.memplan.estimate import CUDA_CONTEXT, Item, Phase, StagePlan
from qubench.memplan.shape import ModelShape

#: bitsandbytes 4-bit: one float32 absmax per block of 64 weights (quantizers.bnb.BLOCKSIZE_4BIT).
BNB_BLOCK = 64


class QuantSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    family: Literal["rtn", "gptq", "awq", "gptqmodel", "bnb", "none", "other"]
    bits: int = 4
    group_size: int = 128
    calibration_tokens: int = 0  # tokens GPTQ/AWQ calibrate on: from the data, else samples x max length
    eval_float32: bool = True               # load_quantized returns a float32 (dequantized) model


class EvalSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: str = "hf"
    dtype_bytes: int = 4                     # --dtype of the full-precision models
    batch_size: int = Field(16, ge=1)
    prompt_tokens: int = Field(ge=1)         # longest generation prompt (VerbMem / KnowMem)
    new_tokens: int = Field(ge=1)            # longest generation (VerbMem's 128)
    document_tokens: int = Field(ge=1)       # longest PrivLeak document, cut at the model's context


def _block_forward(shape: ModelShape, tokens: int, nbytes: int) -> int:
    """Transient tensors of one block's inference forward: q/k/v/o and gate/up/product/down widths."""
    return tokens * (3 * shape.hidden + 2 * shape.kv_dim + 3 * shape.intermediate) * nbytes


def _context(accelerator: bool) -> list[Item]:
    context = Item(what="CUDA context", device=CUDA_CONTEXT, kind="overhead", source="1 GiB assumed")
    return [context] if accelerator else []


def quantized_eval_bytes(shape: ModelShape, q: QuantSettings) -> int:
    """The quantized checkpoint as `load_quantized` returns it for evaluation."""
    if q.family == "bnb":
        lin = sum(x.params for x in shape.quantizable)
        per = q.bits / 8 + (4 / BNB_BLOCK if q.bits == 4 else 0)
        return int(lin * per) + 4 * (shape.params - lin)
    return 4 * shape.params if q.eval_float32 else shape.saved_bytes * shape.params


def quantization(shape: ModelShape, q: QuantSettings, accelerator: bool) -> StagePlan:
    saved, p = shape.saved_bytes, shape.params
    quantizable = sum(x.params for x in shape.quantizable)
    largest = max((x.params for x in shape.quantizable), default=0)
    overhead = _context(accelerator)
    if q.family == "bnb":
        weights = quantized_eval_bytes(shape, q)
        return StagePlan(stage="quantize", label=q.name, phases=[Phase(name="load + quantize", items=[
            Item(what=f"{q.bits}-bit Linear weights + float32 rest", device=weights,
                 source=f"Linear x ({q.bits}/8{' + 4/64 absmax' if q.bits == 4 else ''}) + other params x 4"),
            Item(what="one float32 weight before quantization", device=4 * largest, source="4 x largest Linear"),
            *overhead])])
    if q.family == "none":
        nbytes = 4 if q.bits == 32 else 2
        return StagePlan(stage="quantize", label=q.name, phases=[Phase(name="load + save", items=[
            Item(what=f"model in {q.bits}-bit floats", host=nbytes * p, source=f"P x {nbytes}")])])
    model = Item(what=f"model in its saved dtype ({saved} bytes)", host=saved * p, source=(
        "P x saved bytes (from_pretrained dtype=auto); llm-compressor onloads one module/block at a time"))
    onload = (lambda n: n) if accelerator else (lambda n: 0)  # on a CPU run the block is already in RAM
    packed = int(quantizable * q.bits / 8 + quantizable / q.group_size * saved * 2)
    save = Phase(name="save (compress)", items=[model, Item(
        what="compressed state dict", host=packed, source="Linear x bits/8 packed + scales and zero points per group")])
    notes = []
    if q.family == "rtn" or q.family == "other":
        fit = Phase(name="round (data-free)", items=[model, *overhead, Item(
            what="one module onloaded + observer temporaries", device=onload(saved * largest) + 2 * 4 * largest,
            source="largest Linear in saved dtype (accelerator) + 2 float32 copies")])
        if q.family == "other":
            notes.append(f"{q.name}: unknown quantizer family, planned like RTN")
        return StagePlan(stage="quantize", label=q.name, phases=[fit, save], notes=notes)
    tokens = q.calibration_tokens
    cache = Item(what="calibration activations between blocks", host=2 * tokens * shape.hidden * saved,
                 source=f"2 x {tokens:,} tokens x h x saved bytes (llm-compressor IntermediatesCache, offloaded to CPU)")
    block = Item(what="one decoder block onloaded", device=onload(shape.layer_params * saved),
                 source="block params x saved bytes (sequential pipeline)")
    widest_in = max((x.inputs for x in shape.layer_linears), default=shape.hidden)
    widest_w = max((x.params for x in shape.layer_linears), default=0)
    if q.family == "awq":
        work = Item(what="AWQ cached inputs and outputs of the block's mappings",
                    device=tokens * (3 * shape.hidden + shape.intermediate) * saved,
                    source="tokens x (3h + i) x saved: parent inputs and reference outputs of every sample (rough)")
    else:
        hessians = sum(4 * x.inputs * x.inputs for x in shape.layer_linears)
        work = Item(what="GPTQ Hessians of the block + inversion",
                    device=hessians + 3 * 4 * widest_in**2 + 3 * 4 * widest_w,
                    source="4 x in^2 per Linear of a block; + 3 float32 in^2 (H, Cholesky inverse, copy) and 3 "
                           "float32 copies of the widest weight while it is quantized")
        if q.family == "gptqmodel":
            notes.append("GPT-QModel: planned like llm-compressor's GPTQ (its own loop, similar working set)")
    sample = Item(what="one calibration sample through the block", device=_block_forward(
        shape, tokens if q.family == "awq" else min(tokens, shape.context), saved), kind="activations",
        source="block forward transients")
    calib = Phase(name="calibrate", items=[model, cache, block, work, sample, *overhead])
    return StagePlan(stage="quantize", label=q.name, phases=[calib, save], notes=notes)


def evaluation(shape: ModelShape, e: EvalSettings, q: QuantSettings, accelerator: bool) -> StagePlan:
    full = e.dtype_bytes * shape.params
    quant = quantized_eval_bytes(shape, q)
    weights = Item(what="model weights (largest evaluated)", device=max(full, quant), source=(
        f"max(P x {e.dtype_bytes} (--dtype), {q.name} as loaded: {quant / 2**30:.2f} GiB)"))
    overhead = _context(accelerator)
    if e.engine != "hf":
        return StagePlan(stage="evaluate", label=e.engine, phases=[Phase(name="serve", items=[weights, *overhead])],
                         notes=[f"engine {e.engine!r} manages its own KV cache (e.g. vLLM's gpu_memory_utilization); "
                                "only the weights are planned"])
    nbytes = max(e.dtype_bytes, 4 if q.eval_float32 else e.dtype_bytes)  # dequantized checkpoints run in float32
    b, s = e.batch_size, e.prompt_tokens + e.new_tokens
    kv = b * s * shape.layers * 2 * shape.kv_dim * nbytes
    gen = Phase(name="generation (VerbMem, KnowMem)", items=[weights, *overhead, Item(
        what="KV cache", device=kv, kind="activations",
        source=f"B={b} x (prompt {e.prompt_tokens} + new {e.new_tokens}) x L x 2 x kv x {nbytes}"), Item(
        what="prefill transients", device=b * s * s * nbytes + _block_forward(shape, b * s, nbytes), kind="activations",
        source="B x S^2 attention mask + one block's forward (lm-eval HFLM, greedy generate)")])
    d = e.document_tokens
    logits = b * d * shape.vocab * nbytes + 2 * d * shape.vocab * 4
    priv = Phase(name="PrivLeak log-probs", items=[weights, *overhead, Item(
        what="logits of a batch + one row's float32 log-softmax", device=logits, kind="activations",
        source=f"B={b} x S={d} x V x {nbytes} + 2 x S x V x 4 (engines.hf.token_logprobs)"), Item(
        what="forward transients", device=b * d * d * nbytes + _block_forward(shape, b * d, nbytes),
        kind="activations", source="B x S^2 attention mask + one block's forward")])
    return StagePlan(stage="evaluate", label=f"{e.engine}, batch {b}", phases=[gen, priv])
