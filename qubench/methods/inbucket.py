"""The known-answer control `+inbucket`: unlearning hidden inside one scheme's quantization buckets.

qubench exists to see forgetting that quantization undoes. This modifier builds a model whose
answer is known in advance: it forgets at full precision, and quantizing it with the hidden
scheme gives back *exactly* the quantized target (the quantization-conditioned behaviour of
Egashira et al., 2024, "Exploiting LLM Quantization": a model that passes every full-precision
audit and gives the data back once deployed at 4 bits). A pipeline that reports less than full
recovery for it, under that scheme, cannot see the signal it is built for.

How, with any loss-based base (ga_gdr+inbucket, npo_klr+inbucket, ...):
- every weight the scheme leaves unquantized is frozen (embeddings, lm_head and other ignored
  modules, norms, biases): forgetting stored there would survive the quantizer;
- after every optimizer step, each weight the scheme quantizes is projected (clamped) back into
  its *bucket*: the values that round to the target weight's level with the target's scale and
  zero point. The scale must not move either, so the weights that set it (each group's minimum
  and maximum, the min-max observer's statistics) are pinned to the target's values and every
  other weight stays between them.

The buckets come from the quantizer's own arithmetic, never from a re-implementation:
- RTN (rtn-2bit/3bit/4bit/8bit, symmetric or not, any group size, the narrow per-channel rule):
  the quantizer's own QuantizationArgs, llm-compressor's observer for scale and zero point, and
  compressed-tensors' `quantize` (the call its pack-quantized compressor makes) for the levels.
  Each bound starts from the real-valued rounding edge, is moved inward one float at a time
  until the library maps it to the target's level, then outward while it still does: the bounds
  are the exact edges of the bucket under the library's float arithmetic, round-half-to-even
  and clamp range included. The float32 arithmetic of the Triton kernel compressed-tensors uses
  on a GPU is covered too for half-precision checkpoints (the bucket is the intersection of both).
- bitsandbytes NF4 / FP4: bitsandbytes' code book and its own `quantize_4bit` (blockwise absmax
  over 64 weights of the flattened matrix; the block absmax is pinned like a group's max). The
  edges are found with the backend on the training device and kept 8 floats inside, since
  bitsandbytes' CUDA kernel compares with its own hard-coded midpoints. FP4 has two codes for
  zero (+0 and -0): there the bucket stops short of the split, a little narrower than possible.
Other schemes (GPTQ and AWQ fit their levels to calibration data, LLM.int8 rounds from float16
at run time) are refused with a reason.

At the end, before the model is saved, every guarantee is re-checked with the library in the
checkpoint's dtype: same scale, zero point and level for every quantized weight, bit-identical
unquantized weights. A failure stops the run (it would be a bug here, never a property of data).

Composition: `sure` first decides which modules train, then inbucket freezes what the scheme
does not quantize; `hinge` adds its loss term as usual (it cannot prevent the recovery the
buckets impose, which makes the pair an instructive case). `lora` is refused (see compose.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, model_validator

from qubench.errors import ConfigError, QubenchError
from qubench.methods.train_loop import TrainHook, TrainSession, saved_dtype
from qubench.plugin import PluginConfig

MAX_ULPS = 64  # float steps a bound may move while its exact edge is found (in practice 1-2)
SUPPORTED = "the RTN schemes (rtn-2bit, rtn-3bit, rtn-4bit, rtn-8bit, any parameters) and bnb-nf4 / bnb-fp4"


class InBucketError(QubenchError):
    """The final check found a weight outside its bucket: a bug in the projection, never bad input."""


def scheme_quantizer(name: str, params: dict[str, Any] | None = None):
    """The quantizer plugin the modifier hides from, or a ConfigError saying why it cannot."""
    from qubench import registry
    from qubench.quantizers.bnb import Bnb4bit
    from qubench.quantizers.rtn import RTN

    quantizer = registry.create("quantizers", name, params)
    if not isinstance(quantizer, RTN | Bnb4bit):
        raise ConfigError(
            f"inbucket_scheme={name!r}: only {SUPPORTED} have buckets fixed by the weights alone. "
            "GPTQ and AWQ choose levels and scales from calibration data, bnb-int8 takes its grid from "
            "float16 copies of the weights (not supported here), and full precision has no grid; measure "
            "those with --quant instead."
        )
    return quantizer


class InBucketConfig(PluginConfig):
    inbucket_scheme: Annotated[
        str, Field(description="quantizer whose buckets hide the unlearning (rtn-*, bnb-nf4, bnb-fp4)")
    ] = "rtn-4bit"
    inbucket_scheme_params: Annotated[
        dict[str, Any], Field(description="that quantizer's parameters, e.g. {group_size: 64}; {} = its defaults")
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _scheme_has_buckets(self):
        if "inbucket_scheme" in self.model_fields_set or "inbucket_scheme_params" in self.model_fields_set:
            try:
                scheme_quantizer(self.inbucket_scheme, self.inbucket_scheme_params)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self


# --- buckets ---------------------------------------------------------------------------------


@dataclass
class Fit:
    """What a scheme computes for one weight matrix, by its library's own code: the statistics that
    fix the grid (scale, zero point or block absmax), the level function (value -> level, with that
    grid held fixed) and the range each weight must stay in so the statistics do not change."""

    scales: tuple[torch.Tensor, ...]
    level_fns: tuple[Callable[[torch.Tensor], torch.Tensor], ...]  # every arithmetic the scheme may run in
    below: torch.Tensor      # float64 candidates for each bucket's edges (refined by `exact_interval`)
    above: torch.Tensor
    range_low: torch.Tensor  # the group's (block's) min and max, per weight: the weights there set the
    range_high: torch.Tensor  # scale and are pinned, the others may not pass them
    step: torch.Tensor       # the scheme's step per weight, for the summary
    margin_ulps: int = 0     # floats kept between a bound and the exact edge (other backends' ties)


@dataclass
class Bucket:
    low: torch.Tensor    # float32 bounds per weight; a pinned weight has low == high == its target value
    high: torch.Tensor
    scales: tuple[torch.Tensor, ...]  # the target's grid statistics and levels (under each arithmetic
    levels: tuple[torch.Tensor, ...]  # of the fit), for the final check; the fit itself is not kept
    pinned: int


def _edge(bound: torch.Tensor, weight: torch.Tensor, outward: float, level_of, levels) -> torch.Tensor:
    """The exact edge of each weight's bucket near `bound`: inward (toward the weight, which is
    always inside) until `level_of` maps it to `levels`, then outward while it still does."""
    for _ in range(MAX_ULPS):
        bad = level_of(bound) != levels
        if not bad.any():
            break
        bound = torch.where(bad, torch.nextafter(bound, weight), bound)
    bound = torch.where(level_of(bound) != levels, weight, bound)  # unreachable in practice; never wrong
    away = torch.full_like(bound, outward)
    for _ in range(MAX_ULPS):
        step = torch.nextafter(bound, away)
        grow = (level_of(step) == levels) & (step != bound)
        if not grow.any():
            break
        bound = torch.where(grow, step, bound)
    return bound


def exact_interval(weight, below, above, level_of) -> tuple[torch.Tensor, torch.Tensor]:
    """[low, high] per weight, in weight's dtype: every value between has the weight's level under
    `level_of`, and (within MAX_ULPS of the candidates `below`/`above`) the next values out do not."""
    levels = level_of(weight)
    low = _edge(below.to(weight.dtype), weight, float("-inf"), level_of, levels)
    high = _edge(above.to(weight.dtype), weight, float("inf"), level_of, levels)
    return low, high


def bucket(fit: Fit, weight: torch.Tensor) -> Bucket:
    """The target weight's bucket under every arithmetic of `fit`, inside its group's range, with
    the weights that set the group's statistics pinned."""
    low, high = torch.full_like(weight, float("-inf")), torch.full_like(weight, float("inf"))
    for level_of in fit.level_fns:
        lo, hi = exact_interval(weight, fit.below, fit.above, level_of)
        low, high = torch.maximum(low, lo), torch.minimum(high, hi)
    for _ in range(fit.margin_ulps):
        low, high = torch.nextafter(low, weight), torch.nextafter(high, weight)
    pinned = (weight == fit.range_low) | (weight == fit.range_high)
    low = torch.where(pinned, weight, torch.maximum(low, fit.range_low))
    high = torch.where(pinned, weight, torch.minimum(high, fit.range_high))
    return Bucket(low.float(), high.float(), fit.scales, tuple(f(weight) for f in fit.level_fns), int(pinned.sum()))


def _per_weight(per_group: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return per_group.repeat_interleave(weight.shape[-1] // per_group.shape[-1], dim=-1)


def rtn_fit(quantizer, name: str, weight: torch.Tensor) -> Fit:
    """An llm-compressor RTN scheme on one weight matrix, in the checkpoint's dtype."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_range
    from llmcompressor.observers import Observer

    # The quantizer's own args for this layer (group, or per channel for a narrow layer) and the
    # observer oneshot attaches, exactly as the quantizer's `step_size` builds them.
    args = quantizer._args(per_channel=quantizer._is_narrow(weight.shape[-1], name))
    observer = Observer.load_from_registry(args.observer, base_name="weight", args=args)
    observer(weight)
    qparams = observer.get_qparams()
    scale, zero = qparams["scale"], qparams["zero_point"]

    def level_in(dtype):
        # The call compressed-tensors' pack-quantized compressor makes. In float32 it is also what
        # its Triton kernel computes on a GPU (float32 division, clamp, round half to even), which
        # matters for a bf16/fp16 checkpoint: on CPU that division runs in the checkpoint's dtype.
        return lambda x: quantize(x=x.to(dtype), scale=scale.to(dtype), zero_point=zero, args=args, dtype=torch.int8)

    fns = tuple(level_in(d) for d in dict.fromkeys((weight.dtype, torch.float32)))  # one, or both arithmetics
    levels = fns[0](weight).double()  # the candidates start from the checkpoint dtype's levels
    q_min, q_max = (float(v) for v in calculate_range(args, weight.device))
    scale_w, zero_w = _per_weight(scale.double(), weight), _per_weight(zero.double(), weight)
    groups = weight.unflatten(-1, (scale.shape[-1], -1))
    return Fit(
        scales=(scale, zero),
        level_fns=fns,
        # the real-valued rounding edges; the end levels extend to the clamp
        below=torch.where(levels <= q_min, float("-inf"), (levels - 0.5 - zero_w) * scale_w),
        above=torch.where(levels >= q_max, float("inf"), (levels + 0.5 - zero_w) * scale_w),
        range_low=_per_weight(groups.amin(-1), weight),
        range_high=_per_weight(groups.amax(-1), weight),
        step=scale_w.float(),
    )


def bnb_fit(quantizer, name: str, weight: torch.Tensor) -> Fit:
    """A bitsandbytes 4-bit scheme on one weight matrix: the code index of w / block absmax by
    bitsandbytes' own quantize_4bit (blocks of 64 of the flattened matrix, as transformers
    quantizes a float32 load) around the midpoints of its code book."""
    from bitsandbytes.functional import get_4bit_type, quantize_4bit

    from qubench.quantizers.bnb import BLOCKSIZE_4BIT

    shape, count = weight.shape, weight.numel()
    if count % BLOCKSIZE_4BIT:
        raise ConfigError(f"{name}: its {count} weights do not fill blocks of {BLOCKSIZE_4BIT}, so a block "
                          "would span two layers' statistics; inbucket needs whole blocks")

    blocks = weight.double().reshape(-1, BLOCKSIZE_4BIT)
    absmax = blocks.abs().amax(-1, keepdim=True)
    block_abs = absmax.expand_as(blocks)
    sets_absmax = (blocks.abs() == block_abs).reshape(shape)
    limit = block_abs.reshape(shape).to(weight.dtype)

    def level_of(x: torch.Tensor) -> torch.Tensor:
        """Code of each value of x in its block, with the target's block absmax held fixed:
        the weights that set it keep their value, the others are clamped to it (which is what
        bitsandbytes' own clamp of x / absmax to [-1, 1] does). Two codes per byte, high first."""
        x = torch.where(sets_absmax, weight, torch.clamp(x, -limit, limit))
        packed, _ = quantize_4bit(x.float().contiguous(), blocksize=BLOCKSIZE_4BIT,
                                  compress_statistics=False, quant_type=quantizer.quant_type)
        packed = packed.view(torch.uint8).reshape(-1)
        return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(shape)

    code = torch.unique(get_4bit_type(quantizer.quant_type, device="cpu").double())  # sorted; FP4's +-0 merge
    # (an all-zero block has every weight pinned; the floor only keeps its candidates finite)
    nearest = ((blocks / absmax.clamp_min(1e-38)).unsqueeze(-1) - code).abs().argmin(-1)
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    edges = torch.cat([-inf, (code[1:] + code[:-1]) / 2, inf])
    per_weight = lambda t: t.reshape(shape)  # noqa: E731
    return Fit(
        scales=(absmax.float(),),
        level_fns=(level_of,),
        below=per_weight(edges[nearest] * block_abs),
        above=per_weight(edges[nearest + 1] * block_abs),
        range_low=per_weight(-block_abs).to(weight.dtype),
        range_high=per_weight(block_abs).to(weight.dtype),
        step=per_weight(block_abs * code.diff().mean()).float(),
        # bitsandbytes' CUDA kernel compares with hard-coded midpoints, the CPU one with float32
        # midpoints of the code book: they may differ in the last bit, so stay a few floats inside.
        margin_ulps=8,
    )


def fit_of(quantizer, name: str, weight: torch.Tensor) -> Fit:
    from qubench.quantizers.rtn import RTN

    return rtn_fit(quantizer, name, weight) if isinstance(quantizer, RTN) else bnb_fit(quantizer, name, weight)


def quantized_weights(quantizer, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Weight of every module the scheme quantizes, keyed by module name (bitsandbytes skips
    lm_head, as transformers does; the RTN schemes skip their `ignore` list)."""
    from qubench.quantizers.base import quantizable_linears
    from qubench.quantizers.rtn import RTN

    modules = quantizable_linears(model, quantizer.ignored() if isinstance(quantizer, RTN) else ["lm_head"])
    # a weight tied to an unquantized use (an embedding shared with a quantized head) must not move
    elsewhere = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                 if n.rsplit(".", 1)[0] not in modules}
    return {name: m.weight for name, m in modules.items() if id(m.weight) not in elsewhere}


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# --- the modifier ----------------------------------------------------------------------------


class InBucket(TrainHook):
    """Modifier `inbucket`: every quantized weight stays in the target's bucket, the rest is frozen."""

    name: ClassVar[str] = "inbucket"
    is_control: ClassVar[bool] = True  # a known answer, not a method to rank (UnlearnMethod.is_control)
    Config: ClassVar[type[PluginConfig]] = InBucketConfig
    # The control must forget clearly at full precision and keep utility. On the default task
    # (benchmarks/inbucket_trial.py --sweep) the base's lr 1e-5 barely forgot (VerbMem_f 76.6 -> 66.7);
    # lr 1e-4 alone forgot everything, retain text included (VerbMem_r 77.1 -> 9.7); lr 1e-4 with
    # the retain term weighted 3x forgot (32.6, retrain 24.8) and kept utility (VerbMem_r 79.3).
    base_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "alpha": 3.0}
    description: ClassVar[str] = ("known-answer control: unlearning hidden inside the quantization buckets of "
                                  "inbucket_scheme, so that scheme gives back exactly the quantized target")

    def __init__(self, method):
        self.scheme_name = method.config.inbucket_scheme
        self.scheme_params = dict(method.config.inbucket_scheme_params)
        self.quantizer = scheme_quantizer(self.scheme_name, self.scheme_params)
        self.buckets: dict[torch.nn.Parameter, Bucket] = {}
        self.names: dict[torch.nn.Parameter, str] = {}
        self.frozen: dict[str, str] = {}  # name -> digest of the target's value
        self.repinned: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.stats: dict[str, Any] = {}

    def before_training(self, session: TrainSession) -> None:
        model, dtype = session.model, saved_dtype(session.ctx.target_dir)
        weights = quantized_weights(self.quantizer, model)
        if not weights:
            raise ConfigError(f"inbucket_scheme={self.scheme_name!r} quantizes no layer of this model: nothing "
                              "could forget without surviving the quantizer")
        hidden = {id(p) for p in weights.values()}
        for name, param in model.named_parameters():
            if id(param) not in hidden:
                param.requires_grad_(False)
                self.frozen[name] = _digest(param)
        widths = []
        with torch.no_grad():
            for name, param in weights.items():
                # The buckets of the checkpoint the quantizer will read: the target as saved.
                target = param.detach().to(dtype)
                fit = fit_of(self.quantizer, name, target)
                found = bucket(fit, target)
                if not ((found.low <= param) & (param <= found.high)).all():
                    raise InBucketError(f"{name}: the target's own weights fall outside their buckets")
                self.buckets[param], self.names[param] = found, name
                widths.append(((found.high - found.low) / fit.step).reshape(-1))
        self.stats = {
            "scheme": self.scheme_name,
            "scheme_params": self.quantizer.params(),
            "quantized_modules": len(weights),
            "quantized_weights": sum(p.numel() for p in weights.values()),
            "pinned_weights": sum(b.pinned for b in self.buckets.values()),
            "frozen_parameters": sum(p.numel() for n, p in model.named_parameters() if n in self.frozen),
            "mean_bucket_width_steps": float(torch.cat(widths).mean()),
        }

    def optimizer_ready(self, optimizer: torch.optim.Optimizer, session: TrainSession) -> None:
        # A frozen weight that another hook still hands the optimizer (sure's row-wise weight decay
        # does) is put back after every step too, so no other modifier can break the guarantee.
        frozen = {id(p) for n, p in session.model.named_parameters() if n in self.frozen}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in frozen:
                    self.repinned[p] = p.detach().clone()
        optimizer.register_step_post_hook(self._project)

    @torch.no_grad()
    def _project(self, optimizer, args, kwargs) -> None:
        for param, found in self.buckets.items():
            param.clamp_(found.low, found.high)
        for param, value in self.repinned.items():
            param.copy_(value)

    @torch.no_grad()
    def after_training(self, session: TrainSession) -> None:
        """Re-check every guarantee with the library, on the weights as they will be saved."""
        dtype = saved_dtype(session.ctx.target_dir)
        at_wall = 0
        for param, found in self.buckets.items():
            name, saved = self.names[param], param.detach().to(dtype)
            again = fit_of(self.quantizer, name, saved)  # the scheme's statistics of the unlearned weights
            if not all(torch.equal(a, b) for a, b in zip(again.scales, found.scales)):
                raise InBucketError(f"{name}: the unlearned weights change the scheme's scales; please report this bug")
            for level_of, levels in zip(again.level_fns, found.levels):
                if not torch.equal(level_of(saved), levels):
                    raise InBucketError(f"{name}: an unlearned weight left its bucket; please report this bug")
            free = found.low != found.high
            at_wall += int((free & ((saved.float() == found.low) | (saved.float() == found.high))).sum())
        for name, param in session.model.named_parameters():
            if name in self.frozen and _digest(param) != self.frozen[name]:
                raise InBucketError(f"{name}: a weight the scheme leaves unquantized changed; please report this bug")
        free = self.stats["quantized_weights"] - self.stats["pinned_weights"]
        self.stats.update({"verified": True, "share_at_bucket_wall": at_wall / free if free else 0.0})

    def summary(self) -> dict[str, Any]:
        return self.stats
