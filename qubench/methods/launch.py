"""Run the unlearn stage on N processes: in this process for one, through `torch.distributed.run` for more.

`unlearn(method, ctx, parallelism)`:
- one process, no sharding engine: `method.unlearn(ctx)` right here.
- otherwise: the job (the method's name and parameters, the context) is written to a folder, and
  `python -m torch.distributed.run --standalone --nproc-per-node N -m qubench.methods.launch FOLDER 1` starts
  the ranks with the environment Accelerate reads for the strategy, the same variables `accelerate launch`
  sets for the configs in `configs/accelerate/`. It waits and returns rank 0's outcome. A failing rank's
  error comes back as one error (the same class when it is a qubench error, e.g. TrainingError), naming the
  rank; every rank's output stays in the folder's `launch.log`.

Only loss-based methods (the shared loop) are spread over processes; the others (target, retrain copy a
folder) run here.

Inside a world another launcher started (`accelerate launch -m qubench run ...`, or torchrun): rank 0 runs
the pipeline, the other ranks wait in `serve_peers` and train with rank 0 when it reaches the unlearn
stage (rank 0 sends them the job through the launcher's key-value store, with a long timeout, since
preparing data and models may take a while), then exit when rank 0 releases them (`release_peers`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from qubench.errors import ConfigError, QubenchError
from qubench.methods.base import UnlearnContext, UnlearnMethod, UnlearnOutcome
from qubench.methods.runtime import Parallelism, default_device_type

LOG_FILE = "launch.log"
#: Rank 0 may prepare data and train target models for a long time before it sends the job.
PEER_WAIT = timedelta(days=2)

#: The DeepSpeed ZeRO-3 configuration (also shipped as configs/accelerate/deepspeed_zero3.json for
#: `accelerate launch`; a test keeps the two equal). "auto" values are filled in by Accelerate from the
#: model and the run (bf16 from the method's precision; the batch and clipping settings by the runtime).
DEEPSPEED_ZERO3: dict[str, Any] = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
        "offload_param": {"device": "none"},
        "offload_optimizer": {"device": "none"},
    },
    "bf16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "zero_force_ds_cpu_optimizer": False,
}


class LaunchError(QubenchError):
    """A launched training process failed with an error that is not one of qubench's own."""


def accelerate_env(plan: Parallelism, job_dir: Path) -> dict[str, str]:
    """The variables Accelerate configures itself from, for `plan`'s strategy: what `accelerate launch` sets
    for configs/accelerate/fsdp*.yaml and deepspeed*.yaml (tests/test_distributed.py compares them)."""
    env = {"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "false"}
    if plan.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    if plan.strategy == "fsdp":
        env.update({
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",  # one FSDP unit per decoder layer
            "FSDP_RESHARD_AFTER_FORWARD": "true",               # full shard (ZeRO-3-like)
            "FSDP_OFFLOAD_PARAMS": str(plan.cpu_offload).lower(),
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
            "FSDP_ACTIVATION_CHECKPOINTING": "false",           # the method's gradient_checkpointing decides
        })
    elif plan.strategy == "deepspeed":
        config = json.loads(json.dumps(DEEPSPEED_ZERO3))
        if plan.cpu_offload:
            for part in ("offload_param", "offload_optimizer"):
                config["zero_optimization"][part] = {"device": "cpu", "pin_memory": True}
        path = job_dir / "deepspeed_zero3.json"
        path.write_text(json.dumps(config, indent=2))
        env.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})
    return env


def unlearn(method: UnlearnMethod, ctx: UnlearnContext, parallelism: Parallelism | None = None,
            log: Callable[[str], None] = lambda msg: None) -> UnlearnOutcome:
    """Unlearn with `method` on the processes `parallelism` asks for; see the module docstring."""
    from qubench.methods.train_loop import LossBasedMethod

    plan = parallelism or Parallelism()
    ctx = dataclasses.replace(ctx, parallelism=plan)
    world = launched_world()
    if world is not None:
        if plan.launches():
            raise ConfigError(f"this process is rank {world[0]} of {world[1]} started by a launcher; drop "
                              "--num-processes/--strategy (the launcher's configuration decides)")
        if not isinstance(method, LossBasedMethod):
            return method.unlearn(ctx)
        _send_to_peers({"method": method.name, "params": _params(method), "ctx": ctx})
        return _train_with_peers(method, ctx)
    if not plan.launches() or not isinstance(method, LossBasedMethod):
        return method.unlearn(ctx)
    return run_jobs([(method, ctx)], plan, log)[0]


def _params(method: UnlearnMethod) -> dict[str, Any]:
    return method.config.model_dump(mode="json")  # params() adds a composition record create() rejects


# --- our own launch ---------------------------------------------------------------------------------

def run_jobs(jobs: list[tuple[UnlearnMethod, UnlearnContext]], plan: Parallelism,
             log: Callable[[str], None] = lambda msg: None) -> list[UnlearnOutcome]:
    """Run several unlearning jobs one after the other in one launched world (the processes start once);
    their outcomes, as rank 0 reported them. Raises the first failing rank's error."""
    from qubench.methods.train_loop import check_batch_split

    if plan.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("--strategy deepspeed needs DeepSpeed, which is not installed: pip install deepspeed "
                          "(on a CUDA machine), or use --strategy fsdp")
    if plan.cpu_offload and default_device_type(plan.device) == "cpu":
        raise ConfigError("--cpu-offload moves training state from the GPUs into CPU memory, but no GPU is in use "
                          "here (training already runs on the CPU): drop --cpu-offload")
    if default_device_type(plan.device) == "cuda" and plan.processes > torch_cuda_devices():
        raise ConfigError(f"--num-processes {plan.processes} needs as many GPUs, but {torch_cuda_devices()} are "
                          "visible (one process per GPU)")
    for method, _ in jobs:  # the ranks check it too; here it fails before any process starts
        check_batch_split(method.config.batch_size, plan.processes)
    job_dir = write_jobs(jobs, plan)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.processes}",
               "-m", "qubench.methods.launch", str(job_dir), str(len(jobs))]
    package_root = str(Path(__file__).resolve().parents[2])  # the ranks import this very qubench
    env = {**os.environ, **accelerate_env(plan, job_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    log(f"training on {plan.processes} process(es), {plan.strategy}; output in {job_dir / LOG_FILE}")
    with open(job_dir / LOG_FILE, "wb") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    outcomes = [job_dir / f"outcome-{index}.json" for index in range(len(jobs))]
    if status != 0 or not all(path.exists() for path in outcomes):
        raise launch_failure(job_dir, plan, status)
    done = [UnlearnOutcome(**json.loads(path.read_text())) for path in outcomes]
    shutil.rmtree(job_dir, ignore_errors=True)
    return done


def torch_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def write_jobs(jobs: list[tuple[UnlearnMethod, UnlearnContext]], plan: Parallelism) -> Path:
    """A fresh job folder: per job its context (pickled, with the task data) and a readable summary."""
    job_dir = Path(tempfile.mkdtemp(prefix="qubench-launch-"))
    (job_dir / "errors").mkdir()
    for index, (method, ctx) in enumerate(jobs):
        ctx = dataclasses.replace(ctx, parallelism=plan)
        (job_dir / f"ctx-{index}.pickle").write_bytes(pickle.dumps(ctx))
        (job_dir / f"job-{index}.json").write_text(json.dumps({
            "method": method.name, "params": _params(method), "parallelism": plan.model_dump(mode="json"),
            "target_dir": str(ctx.target_dir), "out_dir": str(ctx.out_dir), "seed": ctx.seed}, indent=2))
    return job_dir


def launch_failure(job_dir: Path, plan: Parallelism, status: int) -> Exception:
    """The first error any rank reported (the root cause: ranks that lost their peers fail after it)."""
    reports = [json.loads(p.read_text()) for p in (job_dir / "errors").glob("rank*.json")]
    where = f"every rank's output: {job_dir / LOG_FILE}"
    if not reports:
        tail = (job_dir / LOG_FILE).read_text(errors="replace").splitlines()[-15:]
        return LaunchError(f"the {plan.processes} training process(es) exited with status {status} without an "
                           f"error report (killed, e.g. out of memory?); {where}. Last lines:\n" + "\n".join(tail))
    first = min(reports, key=lambda r: r["time"])
    prefix = f"rank {first['rank']} of {plan.processes}: " if plan.processes > 1 else ""
    message = f"{prefix}{first['message']} ({where})"
    try:
        cls = getattr(importlib.import_module(first["module"]), first["type"])
        if isinstance(cls, type) and issubclass(cls, QubenchError):
            return cls(message)
    except Exception:  # noqa: BLE001 - an unimportable or unusual class: report it by name instead
        pass
    return LaunchError(f"training failed on {prefix}{first['type']}: {first['message']} ({where})")


def run_jobs_as_rank(job_dir: Path, count: int) -> None:
    """One rank of a launched world: run the jobs in order, and (rank 0) write each outcome; on failure,
    a report of this rank's error and exit status 1."""
    from qubench import registry

    rank = int(os.environ.get("RANK", "0"))
    try:
        for index in range(count):
            job = json.loads((job_dir / f"job-{index}.json").read_text())
            ctx = pickle.loads((job_dir / f"ctx-{index}.pickle").read_bytes())
            if rank != 0:
                ctx = dataclasses.replace(ctx, progress=False)
            outcome = registry.create("methods", job["method"], job["params"]).unlearn(ctx)
            if rank == 0:
                tmp = job_dir / f"outcome-{index}.json.tmp"
                tmp.write_text(json.dumps(dataclasses.asdict(outcome)))
                os.replace(tmp, job_dir / f"outcome-{index}.json")
    except Exception as exc:
        report = {"rank": rank, "time": time.time(), "type": type(exc).__name__, "module": type(exc).__module__,
                  "message": str(exc), "traceback": traceback.format_exc()}
        (job_dir / "errors" / f"rank{rank}.json").write_text(json.dumps(report, indent=2))
        print(f"rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr)  # the traceback is in the report
        sys.exit(1)


# --- a world another launcher started -----------------------------------------------------------------

_control: dict[str, Any] = {}


def launched_world() -> tuple[int, int] | None:
    """(rank, world size) when this process is one of several a launcher started, else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), size) if size > 1 else None


def join_launched_world() -> tuple[int, int] | None:
    """Every rank calls this first. Messages go through the launcher's key-value store, not a process
    group: a process group stays open only while the ranks train, because later stages (e.g.
    llm-compressor) take an initialised process group as a request to work distributed."""
    world = launched_world()
    if world is not None and "store" not in _control:
        import torch.distributed as dist

        _control["store"] = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                          is_master=False, timeout=PEER_WAIT)
        _control["sent"] = 0
    return world


def _send_to_peers(job: dict | None) -> None:
    join_launched_world()
    if not _control.get("released"):
        _control["store"].set(f"qubench/job/{_control['sent']}", pickle.dumps(job))
        _control["sent"] += 1
        _control["released"] = job is None


def release_peers() -> None:
    """Rank 0, when its pipeline is done (or failed): the waiting ranks may exit."""
    world = launched_world()
    if world is not None and world[0] == 0 and "store" in _control:
        _send_to_peers(None)


def _leave_process_group() -> None:
    """Close the process group the training opened (the next job, if any, opens a fresh one)."""
    import torch.distributed as dist
    from accelerate.state import PartialState

    if dist.is_initialized():
        dist.destroy_process_group()
    PartialState._reset_state()


def _train_with_peers(method: UnlearnMethod, ctx: UnlearnContext) -> UnlearnOutcome:
    try:
        return method.unlearn(ctx)
    finally:
        _leave_process_group()


def serve_peers() -> int:
    """Ranks other than 0: train whenever rank 0 sends a job, until it releases them. Exit status."""
    from qubench import registry

    join_launched_world()
    index = 0
    while (job := pickle.loads(_control["store"].get(f"qubench/job/{index}"))) is not None:
        index += 1
        try:
            _train_with_peers(registry.create("methods", job["method"], job["params"]),
                              dataclasses.replace(job["ctx"], progress=False))
        except QubenchError:
            continue  # raised on every rank by the same check: rank 0 reports it and carries on
    return 0


if __name__ == "__main__":
    from qubench.quiet import quiet_libraries

    quiet_libraries()
    run_jobs_as_rank(Path(sys.argv[1]), int(sys.argv[2]))
