"""Command-line options that several `qubench` commands share, each defined once.

A command takes the shared ones by name (`@shared("batch_size", "dtype", ...)`), so `run`, `grid`,
`submit`, `verify` and `audit` spell, check and explain each the same way. Defaults are None: a
command passes on only what the user set, and the spec's own default applies otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import click
import yaml

_KV = dict(multiple=True, metavar="KEY=VALUE")

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
    "model": click.option("--model", default=None, help="Existing target model: local folder or hub ID."),
    "retrain_model": click.option("--retrain-model", default=None,
                                  help="Existing retrain reference model (with --model): folder or hub ID."),
    "batch_size": click.option("--batch-size", type=click.IntRange(min=1), default=None,
                               help="Evaluation batch size [default: 16]."),
    "dtype": click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                          help="Evaluation dtype of full-precision models [default: float32]."),
    "limit": click.option("--limit", type=click.IntRange(min=1), default=None,
                          help="Evaluate only the first N probes of each set (smoke tests)."),
    "workers": click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                            help="Local worker processes (or Ray's local CPUs)."),
    # How the unlearn stage is spread over processes (issue #13); the memory plan takes them as plain inputs.
    "num_processes": click.option("--num-processes", type=click.IntRange(min=1), default=1, show_default=True,
                                  help="Unlearning processes on this machine (one per GPU)."),
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


def parse_params(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs; values parsed as YAML scalars so 1e-5, 3, true and [a, b] work."""
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        parsed = yaml.safe_load(value)
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
