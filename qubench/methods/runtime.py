"""Where the shared training loop runs: the CPU, one GPU, or N processes with data parallelism (DDP) or
sharding (FSDP2, DeepSpeed ZeRO-3), all through one Hugging Face `Accelerator`.

Accelerate configures itself from the environment its launcher writes: `accelerate launch` with one of
the configs in `configs/accelerate/`, or `qubench.methods.launch`, which writes the same variables. The
loop never asks which strategy runs; it asks this module for the device, the prepared model and
optimizer, its rank's rows of each micro-batch, log values averaged over ranks, and, on the main
process, the whole trained model to save.

Precision is a method parameter (`TrainConfig.precision`, part of the unlearned model's identity):
- `fp32`: float32 throughout. On one CPU process this is exactly the loop as it was before Accelerate.
- `bf16`: bfloat16 compute (autocast; FSDP: bf16 parameters gathered for compute and bf16 gradient
  reduction) with float32 master weights and float32 AdamW state.
- `auto`: bf16 on CUDA, fp32 elsewhere (`resolve_precision`).

The frozen reference (NPO, KLR) never trains, so it needs no float32 master copy: it is stored in the
compute dtype on the device (bf16 halves it). Under FSDP it is sharded like the model (1/N per rank,
gathered a layer at a time); under DDP each rank holds it whole; under DeepSpeed too (sharding it needs a
ZeRO-3 inference engine, which could not be tested here, so it is not done).

FSDP on CPU: Accelerate turns FSDP on only for accelerator devices, but torch's `fully_shard` also runs
on CPU with the gloo backend. The runtime takes Accelerate's FSDP path there too, so the CPU tests run
the same wrapping, gradient reduction and state-dict gathering that GPUs run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from qubench.errors import ConfigError
from qubench.methods.data import TokenBatch, rank_share

Precision = Literal["auto", "fp32", "bf16"]
Strategy = Literal["ddp", "fsdp", "deepspeed"]


def default_device_type(device: str = "auto") -> str:
    """The device type training runs on: CUDA when visible (and not `device="cpu"`), else CPU."""
    if device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: Precision, device_type: str) -> Literal["fp32", "bf16"]:
    """`auto` -> bf16 on CUDA (the papers' setting), fp32 elsewhere (CPU bf16 is slow and loses the small
    updates unlearning makes). Stage keys and results use the resolved value."""
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" else "fp32"


class Parallelism(BaseModel):
    """How the unlearn stage is spread over processes. Not part of what is computed: the global batch,
    seed and data order are the same for every process count, so results agree within float tolerance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    processes: int = Field(1, ge=1, description="training processes on this machine (one per GPU)")
    strategy: Strategy = Field("ddp", description="ddp: a full replica per process; fsdp: FSDP2 full "
                                                  "shard; deepspeed: ZeRO-3")
    cpu_offload: bool = Field(False, description="fsdp/deepspeed: keep parameters, gradients and optimizer "
                                                 "state in CPU memory")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible, else CPU")

    @model_validator(mode="after")
    def _offload_needs_sharding(self):
        if self.cpu_offload and self.strategy == "ddp":
            raise ValueError("cpu_offload needs a sharded strategy: --strategy fsdp or --strategy deepspeed")
        return self

    def launches(self) -> bool:
        """True when the stage needs launched processes: more than one, or a sharding engine (which runs
        under torch.distributed even on one process, e.g. FSDP with CPU offload on one GPU)."""
        return self.processes > 1 or self.strategy != "ddp"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


class Runtime:
    """One training run's Accelerator and the few operations the loop needs from it."""

    def __init__(self, precision: Precision, parallelism: Parallelism | None = None):
        from accelerate import Accelerator

        plan = parallelism or Parallelism()
        device_type = default_device_type(plan.device)
        self.precision = resolve_precision(precision, device_type)
        # cpu=True also when no GPU is visible: Accelerate forms a multi-process CPU (gloo) world only then.
        self.accelerator = Accelerator(cpu=device_type == "cpu",
                                       mixed_precision="bf16" if self.precision == "bf16" else "no")
        self._take_fsdp_path_on_cpu()
        state = self.accelerator.state
        if self.is_fsdp and state.fsdp_plugin.fsdp_version != 2:
            raise ConfigError("qubench trains with FSDP2 (per-parameter sharding): set fsdp_version: 2 in the "
                              "accelerate config (see configs/accelerate/)")
        self.rank, self.ranks = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.compute_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _take_fsdp_path_on_cpu(self) -> None:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        self._cpu_world_type = None
        if _env_flag("ACCELERATE_USE_FSDP") and state.distributed_type == DistributedType.MULTI_CPU:
            plugin = FullyShardedDataParallelPlugin()  # reads the same environment Accelerate would
            if self.accelerator.mixed_precision != "no":
                plugin.set_mixed_precision(self.accelerator.mixed_precision)
            state.fsdp_plugin = plugin
            # Both singletons: Accelerate re-reads the process-wide one whenever it builds an AcceleratorState.
            self._cpu_world_type = PartialState._shared_state["distributed_type"]
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    # --- what runs ----------------------------------------------------------------------------------

    @property
    def is_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def is_deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def sharded(self) -> bool:
        return self.is_fsdp or self.is_deepspeed

    @property
    def cpu_offload(self) -> bool:
        state = self.accelerator.state
        if self.is_fsdp:
            from torch.distributed.fsdp import CPUOffloadPolicy

            return isinstance(state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
        if self.is_deepspeed:
            zero = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            return zero.get("offload_param", {}).get("device", "none") == "cpu"
        return False

    def strategy(self) -> str:
        if self.is_fsdp:
            return "fsdp"
        if self.is_deepspeed:
            return "deepspeed"
        return "ddp" if self.ranks > 1 else "single"

    def record(self, model: torch.nn.Module, gradient_checkpointing: bool) -> dict[str, Any]:
        """How this run trained, for the unlearning log and the result (not part of its identity).
        `parameters_held`: the elements of the prepared model this (the main) process stores, all of them
        with a replica per process, about 1/N of them when sharded."""
        params = list(model.parameters())
        return {"processes": self.ranks, "strategy": self.strategy(), "device": self.device.type,
                "precision": self.precision, "cpu_offload": self.cpu_offload,
                "gradient_checkpointing": gradient_checkpointing,
                # CPU float sums are split per thread: the same job on another thread count can differ
                # in the last bits, so the count is part of what reproduces a model exactly.
                "torch_threads": torch.get_num_threads(),
                "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in params),
                "parameters_held": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else local(p).numel()
                                       for p in params)}

    # --- models -------------------------------------------------------------------------------------

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The trainable model on the device (float32 master weights), before the hooks' passes over the
        forget set run on it; with CPU offload it stays in CPU memory, where the sharding engine keeps it."""
        return model if self.cpu_offload else model.to(self.device)

    def place_reference(self, reference: torch.nn.Module | None) -> torch.nn.Module | None:
        if reference is None:
            return None
        return reference.to(device="cpu" if self.cpu_offload else self.device, dtype=self.compute_dtype)

    def prepare(self, model, optimizer, batch_size: int, max_grad_norm: float | None):
        if self.is_deepspeed:
            self._configure_deepspeed(batch_size, max_grad_norm)
        return self.accelerator.prepare(model, optimizer)

    def prepare_reference(self, reference: torch.nn.Module | None) -> torch.nn.Module | None:
        """Under FSDP the frozen reference is sharded with the model's settings (no optimizer: Accelerate's
        `prepare` insists on one for FSDP2, so its model-wrapping step is called directly)."""
        if reference is None or not self.is_fsdp:
            return reference
        from accelerate.utils import fsdp2_prepare_model

        return fsdp2_prepare_model(self.accelerator, reference)

    def _configure_deepspeed(self, batch_size: int, max_grad_norm: float | None) -> None:
        # The loop does the accumulation (groups of varying size at epoch ends) and tells DeepSpeed where
        # a step ends (`micro_batch`); DeepSpeed's own batch sizes only size a data loader that is not used.
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config["gradient_accumulation_steps"] = 1
        config["train_micro_batch_size_per_gpu"] = max(1, batch_size // self.ranks)
        config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * self.ranks
        config["gradient_clipping"] = max_grad_norm if max_grad_norm is not None else 0.0

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def trained_model(self, model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]):
        """On the main process, a plain module (unsharded, unwrapped) with the trained weights; None elsewhere.

        Sharded: every rank takes part in gathering the full state dict, which the main process loads into
        `rebuild()` (a fresh copy of the model's structure, in CPU memory)."""
        if not self.sharded:
            return self.unwrap(model) if self.is_main else None
        state = self.accelerator.get_state_dict(model)
        if not self.is_main:
            return None
        plain = rebuild()
        plain.load_state_dict(state)
        return plain

    def nonfinite_parameters(self, model: torch.nn.Module) -> list[str]:
        """Names of trainable parameters holding a non-finite value on any rank (each checks its shard)."""
        bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(local(p)).all()]
        if self.ranks == 1:
            return bad
        from accelerate.utils import gather_object

        return sorted(set(gather_object(bad)))

    # --- batches, steps and values ----------------------------------------------------------------

    def share(self, batch: TokenBatch | None) -> tuple[TokenBatch | None, float]:
        """This rank's rows of a micro-batch (see `data.rank_share`), on the device, and their weight."""
        if batch is None:
            return None, 1.0
        part, weight = rank_share(batch, self.rank, self.ranks)
        return part.to(self.device), weight

    @contextlib.contextmanager
    def micro_batch(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch; `last`: the final one before an optimizer step.

        Accelerate steps the optimizer (DeepSpeed: inside `backward`) only when gradients are in sync,
        so the flag is set for every micro-batch. DDP skips its all-reduce until the last micro-batch;
        FSDP reduces every micro-batch so that only sharded gradients are ever held."""
        self.accelerator.gradient_state._set_sync_gradients(last)
        if last or self.ranks == 1 or self.sharded:
            yield
        else:
            with self.accelerator.no_sync(model):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """The global gradient norm (over all ranks and shards), after clipping to `max_norm`."""
        params = [p for p in model.parameters() if p.requires_grad]
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        return float(norm) if norm is not None else float("nan")

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each logged value averaged over ranks: the whole micro-batch's value (see `data.ShareOf`)."""
        if self.ranks == 1:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        return dict(zip(values, self.accelerator.reduce(stacked, reduction="mean").tolist()))

    # --- coordination ------------------------------------------------------------------------------

    def main_process_first(self):
        """The main process runs the block first (e.g. builds a cache); the others then run it (and read it)."""
        return self.accelerator.main_process_first()

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """`compute()` on the main process only, its result sent to every rank (the same on all of them)."""
        if self.ranks == 1:
            return compute()
        from accelerate.utils import broadcast_object_list

        box = [compute() if self.is_main else None]
        return broadcast_object_list(box, from_process=0)[0]

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Forget this run's Accelerator settings, so a later run in the same process may choose others
        (the process group, if any, stays: it belongs to the launcher)."""
        from accelerate.state import AcceleratorState, GradientState, PartialState

        self.accelerator.free_memory()
        AcceleratorState._reset_state()
        GradientState._reset_state()
        if self._cpu_world_type is not None:
            PartialState._shared_state["distributed_type"] = self._cpu_world_type


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor, the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The entries of a per-row mask of `param` that belong to this rank's rows (all of them unless
    `param` is sharded), on the parameter's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return mask.to(param.device)
    # The mask sharded like the parameter: the same row split, computed locally (src_data_rank=None:
    # every rank holds the whole mask, so nothing is sent).
    rows = distribute_tensor(mask.to(local(param).device), param.device_mesh, param.placements, src_data_rank=None)
    return rows.to_local()
