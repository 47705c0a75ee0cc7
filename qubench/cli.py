"""The `qubench` command line: a thin layer that parses flags into specs and prints results."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
import yaml
from rich.console import Console
from rich.markup import escape

from qubench import registry
from qubench.errors import QubenchError
from qubench.report import print_result, print_plugins
from qubench.specs import PluginRef, RunSpec

console = Console(stderr=True)
out = Console()


def _params(pairs: tuple[str, ...]) -> dict:
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


def _fail(exc: QubenchError) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, highlight=False)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qubench")
def main() -> None:
    """qubench: does LLM unlearning survive quantization?"""
    warnings.filterwarnings("default", category=registry.PluginImportWarning)
    from qubench.quiet import quiet_libraries

    quiet_libraries()


@main.command()
@click.option("--task", default="synth-news", show_default=True, help="Task plugin (see `qubench list tasks`).")
@click.option("--method", default="ga_gdr", show_default=True, help="Unlearning method plugin.")
@click.option("--quant", default="rtn-4bit", show_default=True, help="Quantizer plugin.")
@click.option("--engine", default="hf", show_default=True, help="Evaluation engine plugin.")
@click.option("--task-param", "task_params", multiple=True, metavar="KEY=VALUE", help="Task parameter (repeatable).")
@click.option("--method-param", "method_params", multiple=True, metavar="KEY=VALUE", help="Method parameter.")
@click.option("--quant-param", "quant_params", multiple=True, metavar="KEY=VALUE", help="Quantizer parameter.")
@click.option("--model", default=None, help="Existing target model: local folder or hub ID.")
@click.option("--retrain-model", default=None, help="Existing retrain reference model: folder or hub ID.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--limit", default=None, type=int, help="Evaluate only the first N probes of each set (smoke tests).")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Recompute even if an identical spec has a stored result.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON instead of tables.")
def run(task, method, quant, engine, task_params, method_params, quant_params, model, retrain_model, seed,
        batch_size, dtype, limit, results_dir, force, as_json) -> None:
    """Unlearn, quantize, evaluate before and after, and report the forgetting gap."""
    from qubench import pipeline

    spec = RunSpec(
        task=PluginRef(name=task, params=_params(task_params)),
        method=PluginRef(name=method, params=_params(method_params)),
        quant=PluginRef(name=quant, params=_params(quant_params)),
        engine=PluginRef(name=engine), model=model, retrain_model=retrain_model, seed=seed,
        batch_size=batch_size, dtype=dtype, eval_limit=limit,
    )
    log = (lambda msg: console.print(msg)) if not as_json else (lambda msg: None)
    try:
        result = pipeline.run(spec, results_dir, force=force, log=log, progress=not as_json)
    except QubenchError as exc:
        _fail(exc)
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        print_result(out, result, pipeline.result_path(results_dir, spec))


@main.command()
@click.option("--task", default="synth-news", show_default=True)
@click.option("--task-param", "task_params", multiple=True, metavar="KEY=VALUE")
@click.option("--model", default=None, help="Use an existing target model instead of training one.")
@click.option("--retrain-model", default=None)
@click.option("--json", "as_json", is_flag=True)
def prepare(task, task_params, model, retrain_model, as_json) -> None:
    """Prepare a task's data and its target and retrain models (cached)."""
    from qubench.models.prepare import prepare_models, prepare_task
    from qubench.tasks import muse_layout

    try:
        plugin = registry.create("tasks", task, _params(task_params))
        data_dir = prepare_task(plugin)
        models = prepare_models(plugin, muse_layout.load(data_dir), model, retrain_model, progress=not as_json)
    except QubenchError as exc:
        _fail(exc)
    info = {"task": task, "data_dir": str(data_dir), "target": str(models.target_dir),
            "retrain": str(models.retrain_dir) if models.retrain_dir else None}
    if as_json:
        out.print_json(json.dumps(info))
    else:
        for key, value in info.items():
            out.print(f"[bold]{key}[/bold]: {value}")


@main.command("list")
@click.argument("family", type=click.Choice(sorted(registry.FAMILIES)))
@click.option("--json", "as_json", is_flag=True)
def list_(family, as_json) -> None:
    """List registered plugins with package, version and description."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", registry.PluginImportWarning)
        infos = registry.describe(family)
    for w in caught:
        console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False)
    if as_json:
        out.print_json(json.dumps([i.__dict__ for i in infos]))
    else:
        print_plugins(out, family, infos)
        if family == "methods":
            from qubench.methods.compose import MODIFIERS

            mods = ", ".join(f"{name} ({cls.description})" if getattr(cls, "description", "") else name
                             for name, cls in MODIFIERS.items())
            out.print(f"Compose any loss-based method with modifiers as BASE+MOD[+MOD]: {mods}. "
                      "E.g. npo_klr+hinge, ga_gdr+lora.", highlight=False)


@main.command()
@click.argument("result_file", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def show(result_file, as_json) -> None:
    """Show a stored result file."""
    from pydantic import ValidationError

    from qubench import results

    try:
        result = results.load(result_file)
    except (ValidationError, ValueError) as exc:
        _fail(QubenchError(f"{result_file} is not a valid qubench result: {exc}"))
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        print_result(out, result, result_file)
