"""Command-line options that several `qubench` commands share, each defined once.

A command takes the shared ones by name (`@shared("batch_size", "dtype", ...)`), so `run`, `grid`,
`submit`, `verify` and `audit` spell, check and explain each the same way. Defaults are None: a
command passes on only what the user set, and the spec's own default applies otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import click
import yaml

from qubench.specs import DEFAULT_BATCH_SIZE

_KV = dict(multiple=True, metavar="KEY=VALUE")


class BatchSizeType(click.ParamType):
    """A positive number, or `auto`."""

    name = "batch_size"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).strip().lower() == "auto":
            text = value if isinstance(value, int) else "auto"
        else:
            try:
                text = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is neither a positive number nor 'auto'", param, ctx)
        if text != "auto" and text < 1:
            self.fail(f"{value!r} is not a positive number (or 'auto')", param, ctx)
        return text


class DeviceType(click.ParamType):
    """auto, cpu, cuda or cuda:N (checked here; resolved against the visible GPUs when the run starts)."""

    name = "device"

    def convert(self, value, param, ctx):
        from qubench.device import check_choice
        from qubench.errors import ConfigError

        try:
            return check_choice(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)

OPTIONS: dict[str, Callable] = {
    "task_params": click.option("--task-param", "task_params", **_KV,
                                help="Task parameter (repeatable; in a grid, added to every task)."),
    "method_params": click.option("--method-param", "method_params", **_KV,
                                  help="Method parameter (repeatable; in a grid, added to every method)."),
    "quant_params": click.option("--quant-param", "quant_params", **_KV,
                                 help="Quantizer parameter (repeatable; in a grid, added to every quantizer)."),
    "engine_params": click.option("--engine-param", "engine_params", **_KV,
                                  help="Engine parameter, e.g. python=/path/to/vllm-venv/bin/python for the vllm "
                                       "engine (repeatable)."),
    "vllm_python": click.option("--vllm-python", default=None, metavar="PATH",
                                help="Python of the environment with vLLM, for --engine vllm (default "
                                     "$QUBENCH_VLLM_PYTHON, else this python). Not part of the run's identity."),
    "model": click.option("--model", default=None, help="Existing target model: local folder or hub ID."),
    "retrain_model": click.option("--retrain-model", default=None,
                                  help="Existing retrain reference model (with --model): folder or hub ID."),
    "batch_size": click.option("--batch-size", type=BatchSizeType(), default=None, metavar="N|auto",
                               help="Evaluation batch size, or auto: the largest that fits the GPU a model is on "
                                    f"(on the CPU, {DEFAULT_BATCH_SIZE}) [default: {DEFAULT_BATCH_SIZE}]."),
    "device": click.option("--device", type=DeviceType(), default="auto", show_default=True,
                           metavar="auto|cpu|cuda|cuda:N",
                           help="Where stages run: auto = CUDA when a GPU is visible, else the CPU; cuda = every "
                                "visible GPU; cuda:N = GPU N. Not part of the run's identity (the result and the "
                                "stage cache record the device kind)."),
    "dtype": click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                          help="Evaluation dtype of full-precision models [default: float32]."),
    "limit": click.option("--limit", type=click.IntRange(min=1), default=None,
                          help="Evaluate only the first N probes of each set (smoke tests)."),
    "seed": click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Run seed: unlearning, and models trained here use the task's recipe seed + this."),
    "no_rebuild": click.option("--no-rebuild", is_flag=True, callback=lambda ctx, param, value: _no_rebuild(ctx, value),
                               expose_value=False, is_eager=True,
                               help="Stop, naming the file, when a cached artifact differs from what its build "
                                    "wrote, instead of rebuilding it."),
    "workers": click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                            help="Local worker processes (or Ray's local CPUs)."),
    # How the unlearn stage is spread over processes; the memory plan and the training runtime both read them.
    "num_processes": click.option("--num-processes", type=click.IntRange(min=1), default=1, show_default=True,
                                  help="Unlearning processes on this machine (one per GPU). Not part of the run's "
                                       "identity: the global batch is the same (batch_size must divide by it). Or "
                                       "start qubench with `accelerate launch`."),
    "strategy": click.option("--strategy", type=click.Choice(["ddp", "fsdp", "deepspeed"]), default="ddp",
                             show_default=True, help="ddp: a model replica per process; fsdp: FSDP full shard; "
                                                     "deepspeed: ZeRO-3."),
    "cpu_offload": click.option("--cpu-offload", is_flag=True,
                                help="With fsdp/deepspeed: keep weights, gradients and optimizer state in CPU memory."),
    "max_memory": click.option("--max-memory", default=None, metavar="SIZE",
                               help="Memory budget per device for the memory plan, e.g. 24GiB or 80GB (default: the "
                                    "free memory of the visible GPUs, else the available RAM); COUNTxSIZE[+HOST], e.g. "
                                    "8x80GB or 8x80GB+2TB, plans for simulated accelerators (with --dry-run)."),
    "as_json": click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of tables."),
}


def shared(*names: str) -> Callable:
    """Apply the shared options `names`, listed in --help in the order given."""
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise KeyError(f"no shared CLI option {unknown}; defined: {', '.join(OPTIONS)}")

    def decorate(fn):
        for name in reversed(names):
            fn = OPTIONS[name](fn)
        return fn

    return decorate


def _no_rebuild(ctx: click.Context, value: bool) -> None:
    # Through the environment, so grid worker processes see it too (qubench.store reads it); put back
    # as it was when the command ends.
    if value:
        from qubench.store import NO_REBUILD_ENV

        previous = os.environ.get(NO_REBUILD_ENV)
        os.environ[NO_REBUILD_ENV] = "1"
        ctx.call_on_close(lambda: os.environ.pop(NO_REBUILD_ENV, None) if previous is None
                          else os.environ.__setitem__(NO_REBUILD_ENV, previous))


def parse_params(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs; values parsed as YAML scalars so 1e-5, 3, true and [a, b] work."""
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        if not key.strip():
            raise click.BadParameter(f"{pair!r} has no KEY before '='")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            where = f" ({exc.problem})" if getattr(exc, "problem", None) else ""
            raise click.BadParameter(f"{pair!r}: {value!r} is not a valid value{where}; quote it to pass a "
                                     "string, or write a list as [a, b]") from None
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-5" as a string; users mean a number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        params[key.strip()] = parsed
    return params


def set_only(**values) -> dict:
    """The keyword arguments the user actually set (None means: keep the spec's default)."""
    return {k: v for k, v in values.items() if v is not None}
