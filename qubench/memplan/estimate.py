"""Per-device memory of each stage, from a model's shape (`shape.ModelShape`) and the run's settings.

A stage is a sequence of phases that never overlap (e.g. the backward pass and the optimizer step);
its peak is the largest phase. A phase is a list of items that are alive at the same time. Every
item is bytes on each device (`device`: the accelerator, or the process's RAM on a CPU run) and in
host RAM for the whole machine (`host`: offloaded state, caches, weights a sequential quantizer keeps
off the device), and says where its number comes from.

Notation in the sources: P parameters, T trainable parameters, N processes, L decoder blocks,
h hidden size, i MLP width, kv key/value width, V vocabulary, B rows per device, S tokens per row,
cb bytes of the compute dtype (2 for bf16, 4 for fp32).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qubench.memplan.shape import ModelShape

GiB = 2**30
#: CUDA context, cuBLAS workspace and kernel images per device: 0.3-1 GiB depending on the GPU and the
#: libraries loaded; the upper end is assumed.
CUDA_CONTEXT = GiB
#: Rows per forward pass while QUAIL fills its target-logit cache (methods.hinge.BATCH).
HINGE_BATCH = 8


class Item(BaseModel):
    model_config = ConfigDict(frozen=True)

    what: str
    device: int = 0
    host: int = 0
    source: str = ""
    #: "state" = weights + gradients + optimizer state (the 16-bytes-per-parameter rule); the rest is
    #: what a run needs besides.
    kind: Literal["state", "reference", "working", "activations", "overhead", "cache"] = "working"
    unknown: bool = False  # the size needs data that is not here (e.g. the forget set's token count)


class Phase(BaseModel):
    name: str
    items: list[Item]

    @property
    def device(self) -> int:
        return sum(i.device for i in self.items)

    @property
    def host(self) -> int:
        return sum(i.host for i in self.items)


class StagePlan(BaseModel):
    stage: str                 # unlearn / quantize / evaluate
    label: str                 # what runs, e.g. "npo_klr, fsdp x 8, bf16"
    processes: int = 1         # processes that each hold `device` (on their own device, or all in RAM on a CPU)
    phases: list[Phase]
    notes: list[str] = Field(default_factory=list)

    @property
    def device_peak(self) -> int:
        return max((p.device for p in self.phases), default=0)

    @property
    def host_peak(self) -> int:
        return max((p.host for p in self.phases), default=0)

    @property
    def unknown(self) -> list[str]:
        return [i.what for p in self.phases for i in p.items if i.unknown]


class TrainSettings(BaseModel):
    """How the unlearn stage trains: the method's config plus where it runs. Plain inputs, so a plan
    can be made for any strategy without the distributed code path being importable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    processes: int = Field(1, ge=1)
    cpu_offload: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"  # resolved: bf16 = bf16 compute, float32 master weights
    gradient_checkpointing: bool = False
    batch_size: int = Field(ge=1)                # forget windows per micro-batch, split over the processes
    seq_len: int = Field(ge=2)                   # tokens per window (the longest window, or max_len)
    retain_term: Literal["gdr", "klr"] | None = None
    reference: bool = False                      # frozen copy of the target (NPO, KLR)
    hinge: bool = False                          # QUAIL's logit hinge
    hinge_top_k: int | None = None
    forget_tokens: int | None = None             # tokens of all forget windows (QUAIL's cache); None = unknown
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ()
    sure_percentile: float | None = None         # SURE: module-level mask at this percentile
    sure_rows: bool = False                      # SURE row granularity

    @model_validator(mode="after")
    def _offload_needs_sharding(self):
        if self.cpu_offload and self.strategy == "ddp":
            raise ValueError("cpu_offload needs a sharded strategy (fsdp or deepspeed)")
        return self

    @property
    def sharded(self) -> bool:
        return self.strategy != "ddp"

    @property
    def rows(self) -> int:
        """Rows of each micro-batch one process runs: the global micro-batch is split over the ranks."""
        return math.ceil(self.batch_size / self.processes)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def _trainable(shape: ModelShape, s: TrainSettings) -> tuple[int, str]:
    if s.lora_rank:
        return shape.lora_params(s.lora_rank, s.lora_targets), f"LoRA adapters r={s.lora_rank}: r x (in + out) per target"
    if s.sure_percentile is not None:
        if s.sure_rows:
            return sum(lin.params for lin in shape.linears), "SURE rows: bounded by every Linear weight"
        # numpy's percentile leaves at most floor(n x (1 - p/100)) + 1 modules at or above it; the
        # largest such modules bound what trains (the paper notes large matrices rank high).
        k = math.floor(len(shape.linears) * (1 - s.sure_percentile / 100)) + 1
        largest = sorted((lin.params for lin in shape.linears), reverse=True)[:k]
        return sum(largest), f"SURE: the {k} largest Linear modules bound the salient ones"
    return shape.params, "every parameter"


def _block_activation_bytes(shape: ModelShape, tokens: int, seq: int, cb: int, lora: TrainSettings | None) -> int:
    """Tensors one decoder block saves for backward, per token (counted with saved-tensor hooks on
    Llama blocks, benchmarks/memory_plan_check.py): RMSNorm internals in float32 (HF casts to float32),
    4h + 2; the rest in the compute dtype: 4h + 2kv + 4i (projections, rotary q/k, v, SiLU and product),
    one logsumexp per head, and the padding mask of SDPA (S per token: the batch is right-padded)."""
    per_token = (4 * shape.hidden + 2) * 4 + (4 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate
                                              + shape.heads + seq) * cb
    if lora is not None and lora.lora_rank:
        # peft's lora_dropout keeps each adapter's dropped input (cb) and its mask (1 byte)
        per_token += sum(lin.inputs for lin in shape.layer_linears if lin.leaf in lora.lora_targets) * (cb + 1)
    return tokens * per_token


def _activations(shape: ModelShape, s: TrainSettings, graphs: int) -> tuple[int, str]:
    cb, tokens = s.compute_bytes, s.rows * s.seq_len
    block = _block_activation_bytes(shape, tokens, s.seq_len, cb, s)
    if s.gradient_checkpointing:
        body, how = shape.layers * tokens * shape.hidden * cb + block, "L block inputs + 1 block recomputed"
    else:
        body, how = shape.layers * block, "L blocks"
    vocab = tokens * shape.vocab * 4  # losses.logits_of casts logits to float32; log_softmax keeps its output
    graph = body + tokens * (3 * shape.hidden + 1) * 4 + vocab
    extra = vocab if s.retain_term == "klr" else 0  # KL keeps exp(log p_ref) for backward
    if s.hinge:
        k = s.hinge_top_k or shape.vocab
        # |z' - z| keeps its input, relu its output, the batch's cached logits (and int64 ids for top-k)
        extra += tokens * k * (3 * 4 + (8 if s.hinge_top_k else 0))
    transient = 2 * vocab  # float32 logits copy and the log-softmax gradient at the start of backward
    total = graphs * graph + extra + transient
    return total, (f"{graphs} forward graph(s) alive at backward ({how}; B={s.rows} rows x S={s.seq_len}), "
                   "each + B x S x V x 4 log-softmax; + 2 x B x S x V x 4 transient at the loss")


def unlearning(shape: ModelShape, s: TrainSettings, accelerator: bool) -> StagePlan:
    """The unlearn stage (methods.train_loop): AdamW, float32 master weights, losses in float32."""
    n, cb, p = s.processes, s.compute_bytes, shape.params
    shard = n if s.sharded else 1
    t, t_how = _trainable(shape, s)

    def sharded(what, total, source, kind="state", divide=shard):
        per = -(-total // divide)
        # Offloaded shards of every rank sit in the one host's RAM.
        return Item(what=what, kind=kind, source=source,
                    **({"host": per * n} if s.cpu_offload else {"device": per}))

    div = f" / N={n}" if s.sharded else ""
    state = [sharded("weights, float32", 4 * p, f"4 x P (P={p:,}){div}; the loop loads float32, and bf16 mixed "
                     "precision keeps float32 master weights")]
    if s.lora_rank:
        state.append(sharded("LoRA adapters, float32", 4 * t, f"4 x T ({t_how}, T={t:,}){div}"))
    state += [sharded("gradients, float32", 4 * t, f"4 x T ({t_how}, T={t:,}){div}"),
              sharded("AdamW exp_avg + exp_avg_sq, float32", 8 * t, f"8 x T{div} (torch.optim.AdamW state)")]
    fixed = list(state)
    if s.reference:
        # stored in the compute dtype; FSDP shards it like the model, DDP and ZeRO-3 keep it whole per rank
        fsdp = s.strategy == "fsdp"
        how = " / N (sharded like the model)" if fsdp else ", whole on every rank"
        fixed.append(sharded(f"frozen reference ({s.precision})", cb * p, f"cb x P{how}" + (
            " in host RAM (offload)" if s.cpu_offload else ""), kind="reference", divide=n if fsdp else 1))
    linear_params = sum(lin.params for lin in shape.linears)
    forward = []  # alive from the forward pass through backward only
    if s.sharded:
        gathered = (3 * shape.layer_params + shape.embed_params + shape.head_params
                    + (shape.layer_params if s.reference and s.strategy == "fsdp" else 0)) * cb
        forward.append(Item(what=f"{s.strategy} unsharded working set", device=gathered, source=(
            "cb x (2 blocks gathered (current + prefetch) + 1 block's gradient before reduce-scatter + embeddings "
            "and head (root unit)" + (" + 1 reference block" if s.reference and s.strategy == "fsdp" else "") + ")")))
    elif s.precision == "bf16":
        forward.append(Item(what="autocast bf16 weight copies", device=2 * linear_params,
                          source="2 x every Linear weight: torch.autocast caches its casts for backward"))
    if s.strategy == "ddp" and n > 1:
        fixed.append(Item(what="DDP gradient buckets", device=4 * t,
                          source="4 x T: DDP's default gradient_as_bucket_view=False keeps a second copy"))
    if accelerator:
        fixed.append(Item(what="CUDA context", device=CUDA_CONTEXT, kind="overhead", source="1 GiB assumed"))
    graphs = 1 + (s.retain_term is not None) + s.hinge
    act, act_how = _activations(shape, s, graphs)
    phases = [Phase(name="backward", items=[*fixed, *forward, Item(what="activations", device=act, kind="activations",
                                                         source=act_how)])]
    if accelerator:  # torch's foreach AdamW (CUDA default) makes a float32 sqrt(exp_avg_sq) for every tensor at once
        step = Item(what="AdamW step temporaries", source="4 x T / shard: foreach sqrt(exp_avg_sq)",
                    **({"host": 4 * t} if s.cpu_offload else {"device": -(-4 * t // shard)}))
    else:  # on CPU AdamW loops over tensors: one temporary the size of the largest trainable tensor
        largest = (s.lora_rank * max(max(lin.inputs, lin.outputs) for lin in shape.linears) if s.lora_rank
                   else max([shape.embed_params, *(lin.params for lin in shape.linears)]))
        step = Item(what="AdamW step temporaries", device=4 * largest,
                    source="4 x the largest trainable tensor (single-tensor AdamW on CPU)")
    phases.append(Phase(name="optimizer step", items=[*fixed, step]))
    load = (4 * p + (4 * p if s.reference else 0)) * n
    phases.append(Phase(name="load", items=[Item(what="float32 model (and reference) loaded by every process",
                                                 host=load, source="N x 4 x P (x 2 with a reference): "
                                                 "from_pretrained in float32 before placement or sharding")]))
    if s.sure_percentile is not None:
        lin = 4 * linear_params
        sal_act, _ = _activations(shape, s, 1)
        phases.append(Phase(name="SURE saliency", items=[
            sharded("weights + gradients of every parameter, float32", 8 * p, f"8 x P{div}"),
            Item(what="copies of every Linear gradient", device=lin,
                 source="4 x Linear params: saliency.forget_gradients"),
            Item(what="activations (forget term only)", device=sal_act, kind="activations",
                 source="1 graph, as above")]))
    notes = []
    if s.hinge:
        phases.append(hinge_cache_phase(shape, s))
        notes.append(hinge_disk_note(shape, s))
    label = f"{s.strategy} x {n}, {s.precision}" + (", CPU offload" if s.cpu_offload else "") + (
        ", gradient checkpointing" if s.gradient_checkpointing else "")
    return StagePlan(stage="unlearn", label=label, processes=n, phases=phases, notes=notes)


def _hinge_bytes_per_token(shape: ModelShape, s: TrainSettings) -> int:
    k = s.hinge_top_k or shape.vocab
    return k * (4 + (4 if s.hinge_top_k else 0))  # float32 values (+ int32 ids for top-k), hinge.write_logit_cache


def hinge_cache_phase(shape: ModelShape, s: TrainSettings) -> Phase:
    """QUAIL's cache build (methods.hinge.write_logit_cache): the main process keeps every window's
    logits in a list, then concatenates them (a second copy) before writing the file."""
    per_token = _hinge_bytes_per_token(shape, s)
    model = 4 * shape.params * (2 if s.reference else 1)
    forward = 2 * HINGE_BATCH * s.seq_len * shape.vocab * 4
    items = [Item(what="target model (and reference), float32", device=model, source="4 x P per copy"),
             Item(what=f"forward of {HINGE_BATCH} windows", device=forward, kind="activations",
                  source=f"2 x {HINGE_BATCH} x S x V x 4 logits")]
    if s.forget_tokens is None:
        items.append(Item(what="target-logit cache (list + concatenation)", kind="cache", unknown=True,
                          source=f"2 x forget tokens x {per_token:,} bytes; forget token count unknown"))
    else:
        items.append(Item(what="target-logit cache (list + concatenation)", host=2 * s.forget_tokens * per_token,
                          kind="cache", source=f"2 x {s.forget_tokens:,} forget tokens x {per_token:,} bytes"))
    return Phase(name="QUAIL cache build", items=items)


def hinge_disk_note(shape: ModelShape, s: TrainSettings) -> str:
    per_token = _hinge_bytes_per_token(shape, s)
    size = (f"{s.forget_tokens * per_token / GiB:,.1f} GiB" if s.forget_tokens
            else f"{per_token:,} bytes per forget token")
    return (f"QUAIL's target logits live on disk ({size}, K={s.hinge_top_k or shape.vocab}) and are read one batch "
            "at a time while training; building them holds them in RAM twice (see its phase). hinge_top_k shrinks "
            "both.")
