"""The QUAIL logit hinge (arXiv 2601.15538): keep the unlearned model's forget logits at
least half a quantization step away from the target's, so rounding cannot map them back.

    L_hinge = mean over forget positions t and considered logits k of
              max(0, delta_q / 2 - |z'_{t,k} - z_{t,k}|)

z are the target's logits on the forget windows, computed once before
training (in float32, from the untrained master weights, by the main process
while the other ranks wait) and cached on disk (the `HingeLogits` stage:
QUBENCH_HOME/hinge_logits, keyed by the target's fingerprint, a hash of the forget
windows' token ids and K): they are plain
tensors without a graph, so the gradient reaches only the unlearned model z'.
Every real (non-padding) position counts, the last one of a window too, as in
the KL retain term: its logits are the model's behaviour on forget text.

K: every vocabulary logit (`hinge_top_k=None`, as the paper) or the target's
top-k logits per position (the cache then also holds their vocabulary ids).
The full-vocabulary cache holds tokens x vocab float32 values (about 90 MB for
synth-news default, far too much for a 7B model on MUSE: use top_k there).

Cost: the hinge runs the model on the forget batch a second time (the base
loss's forward is not shared), about +50% per forget micro-batch.

Note on the start of training: there z' == z, and d|x|/dx at 0 is 0 in
PyTorch, so the hinge has no gradient until the base loss has moved the
logits; from then on it pushes every logit still inside the margin outwards.

delta_q is either a number (the paper uses 1.0) or the name of a quantizer
plugin (e.g. "rtn-4bit", with its default parameters) to derive it from; see
`derive_delta_q` for the rule, which is empirical and stated honestly there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, field_validator
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from qubench.methods.data import TokenBatch, collate
from qubench.methods.losses import logits_of
from qubench.methods.train_loop import TrainHook, TrainSession
from qubench.plugin import PluginConfig

BATCH = 8                  # windows per forward pass while filling the cache
DELTA_WINDOWS = 64         # forget windows the delta_q derivation measures on (bounded cost)


class HingeConfig(PluginConfig):
    hinge_gamma: Annotated[float, Field(ge=0, description="gamma: weight of the hinge term (paper's best: 8)")] = 8.0
    hinge_delta_q: Annotated[
        float | str,
        Field(description="delta_q: logit-space quantization step (paper: 1.0), or a quantizer name to derive it from"),
    ] = 1.0
    hinge_top_k: Annotated[
        int | None, Field(ge=1, description="K: the target's top-k logits per position; None = all vocabulary logits")
    ] = None

    @field_validator("hinge_delta_q")
    @classmethod
    def _positive_or_known_quantizer(cls, value):
        if isinstance(value, str):
            from qubench import registry

            known = registry.names("quantizers")
            if value not in known:
                raise ValueError(f"{value!r} is neither a number nor a quantizer; quantizers: {', '.join(known)}")
        elif value <= 0:
            raise ValueError("must be > 0")
        return value


def hinge_loss(
    model_logits: torch.Tensor,       # [batch, time, vocab] from the model being unlearned
    target_logits: torch.Tensor,      # [batch, time, K] cached, no graph
    target_ids: torch.Tensor | None,  # [batch, time, K] vocabulary ids of the K logits; None = all (K = vocab)
    mask: torch.Tensor,               # [batch, time] 1 on positions that count
    delta_q: float,
    count: float | None = None,       # what the sums are divided by; None = the masked (position, logit) pairs
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean hinge, share of margins met) over the masked positions and their K logits.

    On one rank's share of a micro-batch, `count` is the whole micro-batch's share per rank of the
    (position, logit) pairs (see `qubench.methods.data.ShareOf`), so the ranks' average is the mean."""
    considered = model_logits if target_ids is None else model_logits.gather(-1, target_ids)
    gap = (considered - target_logits).abs()
    weight = mask.float().unsqueeze(-1).expand_as(gap)
    count = weight.sum() if count is None else count
    loss = (torch.relu(delta_q / 2 - gap) * weight).sum() / count
    met = ((gap >= delta_q / 2).float() * weight).sum() / count
    return loss, met.detach()


def _select(logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if top_k is None:
        return logits, None
    values, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    return values, ids


@torch.no_grad()
def _target_logits(model, windows: list[list[int]], pad_id: int, top_k: int | None):
    """Per window: the K logits (and ids) at each of its positions, concatenated along time."""
    was_training = model.training
    model.eval()  # no dropout: the cache must be the target's deterministic output
    device = next(model.parameters()).device
    values, ids = [], []
    try:
        for start in range(0, len(windows), BATCH):
            chunk = windows[start : start + BATCH]
            logits = logits_of(model, collate(chunk, pad_id).to(device)).cpu()
            for row, window in enumerate(chunk):
                v, i = _select(logits[row, : len(window)], top_k)
                values.append(v.contiguous())
                ids.append(None if i is None else i.to(torch.int32))
    finally:
        model.train(was_training)
    return values, ids


def write_logit_cache(path: Path, model, windows: list[list[int]], pad_id: int, top_k: int | None) -> None:
    """Write the target's logits on `windows` (as `LogitCache` reads them) to the safetensors file `path`."""
    values, ids = _target_logits(model, windows, pad_id, top_k)
    offsets = torch.tensor([0] + [len(w) for w in windows]).cumsum(0)
    tensors = {"values": torch.cat(values).float(), "offsets": offsets}
    if top_k is not None:
        tensors["ids"] = torch.cat(ids)
    save_file(tensors, str(path))


class LogitCache:
    """The target's forget logits on disk, read lazily one window's slice at a time."""

    def __init__(self, path: Path, windows: list[list[int]]):
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        self._offsets = self._file.get_tensor("offsets").tolist()
        self._has_ids = "ids" in self._file.keys()
        if len(self._offsets) != len(windows) + 1:
            raise ValueError(f"logit cache {path} holds {len(self._offsets) - 1} windows, expected {len(windows)}")
        # Batches carry token ids, not window indices: the right-padded real tokens of a row are
        # the window itself, so its content finds its slice (identical windows share logits).
        self._index = {tuple(w): i for i, w in enumerate(windows)}

    def batch(self, forget: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached logits (and ids) for a right-padded forget batch, padded to its shape."""
        lengths = forget.attention_mask.sum(dim=1).tolist()
        rows_v, rows_i = [], []
        for row, n in enumerate(lengths):
            window = self._index.get(tuple(forget.input_ids[row, :n].tolist()))
            if window is None:
                raise KeyError("a forget batch row is not one of the cached forget windows")
            a, b = self._offsets[window], self._offsets[window + 1]
            rows_v.append(self._file.get_slice("values")[a:b])
            rows_i.append(self._file.get_slice("ids")[a:b].long() if self._has_ids else None)
        width, k = forget.input_ids.shape[1], rows_v[0].shape[-1]
        values = torch.zeros(len(lengths), width, k)
        ids = torch.zeros(len(lengths), width, k, dtype=torch.long) if self._has_ids else None
        for row, n in enumerate(lengths):
            values[row, :n] = rows_v[row]
            if ids is not None:
                ids[row, :n] = rows_i[row]
        return values, ids


def fake_quantize_(model: torch.nn.Module, quantizer) -> None:
    """Round every weight the quantizer targets to the nearest multiple of its step, in place."""
    from qubench.quantizers.base import per_weight

    with torch.no_grad():
        for module in quantizer.quantized_modules(model).values():
            weight = module.weight
            step = per_weight(quantizer.step_size(weight).to(weight.dtype), weight.shape)
            safe = torch.where(step > 0, step, torch.ones_like(step))
            weight.copy_(torch.where(step > 0, torch.round(weight / safe) * safe, weight))


def derive_delta_q(quantizer, model_dir: Path, windows: list[list[int]], pad_id: int, top_k: int | None) -> float:
    """delta_q = 2 x mean |z_q - z| over the forget positions and their K logits, where z_q are
    the logits of the target with the quantizer's rounding applied to its weights.

    Why: the margin delta_q / 2 then equals the average logit perturbation the
    quantizer's own rounding causes on this model and data. An unlearned
    model whose logits moved by less than that is, on average, within
    quantization noise of the target. It is an empirical propagation of the
    weight step to logit space (measured on at most DELTA_WINDOWS windows),
    not a bound. The rounding grid is the multiples of the scheme's step
    (`step_size`): exact for symmetric schemes; for asymmetric ones the grid's
    offset differs but the rounding error has the same size.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    sample = windows[:DELTA_WINDOWS]
    z, ids = _target_logits(model, sample, pad_id, top_k)
    fake_quantize_(model, quantizer)
    zq, _ = _target_logits(model, sample, pad_id, None)
    total, count = 0.0, 0
    for values, chosen, quantized in zip(z, ids, zq):
        quantized = quantized if chosen is None else quantized.gather(-1, chosen.long())
        total += float((quantized - values).abs().sum())
        count += values.numel()
    return 2 * total / count


class LogitHinge(TrainHook):
    """Modifier `hinge`: adds gamma * L_hinge to the base loss."""

    name: ClassVar[str] = "hinge"
    Config: ClassVar[type[PluginConfig]] = HingeConfig
    base_defaults: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = "QUAIL logit hinge: forget logits kept delta_q/2 from the target's (arXiv 2601.15538)"

    def __init__(self, method):
        self.gamma = method.config.hinge_gamma
        self.top_k = method.config.hinge_top_k
        self.delta_setting = method.config.hinge_delta_q
        self.delta_q: float | None = None
        self.cache: LogitCache | None = None
        self.cache_reused = False
        self.last: dict[str, float] = {}
        self.met_sum, self.calls = 0.0, 0

    def before_training(self, session: TrainSession) -> None:
        with session.runtime.main_process_first():  # the main process builds the caches, the others read them
            self._load_caches(session)

    def _load_caches(self, session: TrainSession) -> None:
        from qubench.stages.hinge import HingeLogits, HingeMargin

        target = Path(session.ctx.target_dir)
        if isinstance(self.delta_setting, str):
            from qubench import registry

            quantizer = registry.create("quantizers", self.delta_setting)
            self.delta_q = HingeMargin(quantizer, target, session.forget, self.top_k, session.pad_id).delta_q()
        else:
            self.delta_q = float(self.delta_setting)
        # The model has not been trained yet: its (float32 master) logits are the target's.
        stage = HingeLogits(target, session.forget, self.top_k, session.model, session.pad_id)
        self.cache_reused = stage.exists()
        self.cache = LogitCache(stage.get(), session.forget)

    def extra_terms(self, model, forget: TokenBatch) -> dict[str, torch.Tensor]:
        target, ids = self.cache.batch(forget)
        device = forget.input_ids.device
        target, ids = target.to(device), (ids.to(device) if ids is not None else None)
        count = forget.share_of.positions * target.shape[-1] if forget.share_of is not None else None
        loss, met = hinge_loss(logits_of(model, forget), target, ids, forget.attention_mask, self.delta_q, count)
        return {"loss": self.gamma * loss, "hinge": loss, "hinge_margin_met": met}

    def micro_batch_done(self, values: dict[str, float]) -> None:
        self.last = {"hinge": values["hinge"], "hinge_margin_met": values["hinge_margin_met"]}
        self.met_sum, self.calls = self.met_sum + values["hinge_margin_met"], self.calls + 1

    def after_training(self, session: TrainSession) -> None:
        self.cache = None  # closes the lazily read cache file

    def summary(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "top_k": self.top_k,
            "delta_q": self.delta_q,
            "delta_q_source": (f"derived from {self.delta_setting} (2 x mean logit rounding error)"
                               if isinstance(self.delta_setting, str) else "given"),
            "cache_reused": self.cache_reused,
            "final_hinge": self.last.get("hinge"),
            "final_margin_met": self.last.get("hinge_margin_met"),
            "mean_margin_met": self.met_sum / self.calls if self.calls else None,
        }
