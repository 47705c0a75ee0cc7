"""The `qubench` command line: a thin layer that parses flags into specs and prints results."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from qubench import registry
from qubench.cli_options import parse_params as _params
from qubench.cli_options import set_only, shared
from qubench.errors import QubenchError
from qubench.grid.cache import KINDS as CACHE_KINDS
from qubench.report import print_result, print_plugins
from qubench.specs import DEFAULT_BATCH_SIZE, PluginRef, RunSpec

console = Console(stderr=True)
out = Console()


def _fail(exc: QubenchError) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", markup=True, highlight=False)
    sys.exit(2)


def _stderr_log(quiet: bool):
    """Where a command's progress lines go: stderr, one line each however long (a log stays greppable),
    printed as written (they carry model paths and URLs, never markup); nowhere with --json."""
    if quiet:
        return lambda msg: None
    return lambda msg: console.print(escape(msg), highlight=False, soft_wrap=True)


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
@shared("task_params", "method_params", "quant_params", "engine_params", "vllm_python")
@shared("model", "retrain_model", "seed", "batch_size", "dtype", "limit", "device")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Recompute everything: the result and every cached stage the run uses "
                                            "(shared ones such as the task's target models included).")
@shared("num_processes", "strategy", "cpu_offload", "max_memory")
@click.option("--dry-run", is_flag=True, help="Print the memory plan of every stage (per device, from configs; no "
                                              "weights loaded) and whether it fits, then stop.")
@shared("no_rebuild", "as_json")
def run(task, method, quant, engine, task_params, method_params, quant_params, engine_params, vllm_python, model,
        retrain_model, seed, batch_size, dtype, limit, device, results_dir, force, num_processes, strategy,
        cpu_offload, max_memory, dry_run, as_json) -> None:
    """Unlearn, quantize, evaluate before and after, and report the forgetting gap.

    Before any work, the memory plan of every stage is held against the devices: a run that cannot fit
    stops and names the options that would (see --dry-run, --max-memory).
    """
    from pydantic import ValidationError

    from qubench import pipeline
    from qubench.memplan.build import for_run
    from qubench.memplan.report import as_dict, print_plan
    from qubench.methods import launch
    from qubench.methods.runtime import Parallelism

    if max_memory and "x" in max_memory.lower() and not dry_run:
        raise click.BadParameter("COUNTxSIZE plans for simulated accelerators: use it with --dry-run; a run "
                                 "takes SIZE, the budget per device", param_hint="--max-memory")

    try:
        parallelism = Parallelism(processes=num_processes, strategy=strategy, cpu_offload=cpu_offload)
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"].removeprefix("Value error, "), param_hint="--cpu-offload")
    world = launch.join_launched_world()  # started by `accelerate launch` / torchrun: rank 0 runs the pipeline
    if world is not None and world[0] != 0:
        sys.exit(launch.serve_peers())

    _use_vllm_python(engine, vllm_python)
    spec = RunSpec(
        task=PluginRef(name=task, params=_params(task_params)),
        method=PluginRef(name=method, params=_params(method_params)),
        quant=PluginRef(name=quant, params=_params(quant_params)),
        engine=PluginRef(name=engine, params=_params(engine_params)), model=model, retrain_model=retrain_model, seed=seed,
        **set_only(batch_size=batch_size, dtype=dtype, eval_limit=limit),
    )
    log = _stderr_log(quiet=as_json)
    try:
        if dry_run:
            plan = for_run(spec, parallelism, max_memory, device=device)
            if as_json:
                out.print_json(data=as_dict(plan))
            else:
                print_plan(out, plan)
            plan.check()
            return
        result = pipeline.run(spec, results_dir, force=force, log=log, progress=not as_json, device=device,
                              parallelism=parallelism, plan_memory=True, max_memory=max_memory)
    except QubenchError as exc:
        _fail(exc)
    finally:
        launch.release_peers()
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        print_result(out, result, pipeline.result_path(results_dir, spec))


def _use_vllm_python(engine: str, vllm_python: str | None) -> None:
    if vllm_python is None:
        return
    if engine != "vllm":
        raise click.BadParameter("only applies to --engine vllm", param_hint="--vllm-python")
    # Through the environment rather than the spec: where vLLM is installed does not change
    # what is measured, so it stays out of the run ID (the engine still records it in results).
    from qubench.engines.vllm_server import PYTHON_ENV

    os.environ[PYTHON_ENV] = vllm_python


@main.command()
@click.option("--task", default="synth-news", show_default=True, help="Task plugin: the data the target was "
              "trained on, whose forget set was unlearned.")
@click.option("--target", required=True, help="The model the checkpoint was unlearned from: folder or hub ID.")
@click.option("--unlearned", required=True,
              help="The checkpoint to audit: a save_pretrained folder, a hub ID (owner/name[@revision]) or a peft "
                   "LoRA adapter folder (merged onto the target first).")
@click.option("--retrain", default=None,
              help="The target's retrain reference (never trained on the forget set): folder or hub ID. Without "
                   "it, separation is checked against the target's own holdout score and PrivLeak uses the "
                   "task's published AUC_retrain, where it has one.")
@click.option("--quant", "quants", multiple=True, required=True,
              help="Quantizer (repeatable: one result per quantizer).")
@click.option("--name", default=None,
              help="The checkpoint's label: results name its method external:NAME (default: the folder's name, "
                   "or the hub ID).")
@click.option("--allow-identical", is_flag=True,
              help="Audit even a checkpoint whose weights equal the target's (the result says nothing was unlearned).")
@click.option("--allow-no-separation", is_flag=True,
              help="Audit even when the target does not remember the forget set measurably more than its "
                   "reference (the result says its recovery figures carry no information).")
@click.option("--engine", default="hf", show_default=True, help="Evaluation engine plugin.")
@shared("task_params", "quant_params", "engine_params", "vllm_python", "batch_size", "dtype", "limit", "device")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Recompute everything: the results and every cached stage they use.")
@shared("no_rebuild", "as_json")
def audit(task, target, unlearned, retrain, quants, name, allow_identical, allow_no_separation, engine, task_params,
          quant_params, engine_params, vllm_python, batch_size, dtype, limit, device, results_dir, force,
          as_json) -> None:
    """Audit a model unlearned elsewhere: quantize it and its target, evaluate both before and after,
    and report how much of the forgetting each quantizer undoes. Bad input (another network or
    tokenizer, nothing unlearned, a target that never saw the task's forget set) stops before any
    quantization. With --json, prints a JSON list of results, one per quantizer."""
    from qubench import pipeline
    from qubench.specs import EXTERNAL_PREFIX, AuditInput, external_name

    _use_vllm_python(engine, vllm_python)
    if name is not None and not name.strip():
        raise click.BadParameter("must not be empty", param_hint="--name")
    local = Path(unlearned).expanduser()
    # A local folder is recorded by its absolute path: the same relative path elsewhere is another model.
    ref = str(local.resolve()) if local.exists() else unlearned
    check = AuditInput(unlearned=ref, allow_identical=allow_identical, allow_no_separation=allow_no_separation)
    specs = [RunSpec(task=PluginRef(name=task, params=_params(task_params)),
                     method=PluginRef(name=EXTERNAL_PREFIX + (name or external_name(unlearned))),
                     quant=PluginRef(name=quant, params=_params(quant_params)),
                     engine=PluginRef(name=engine, params=_params(engine_params)), model=target,
                     retrain_model=retrain, audit=check,
                     **set_only(batch_size=batch_size, dtype=dtype, eval_limit=limit)) for quant in quants]
    log = _stderr_log(quiet=as_json)
    done = []
    for spec in specs:
        try:
            done.append(pipeline.run(spec, results_dir, force=force, log=log, progress=not as_json, device=device))
        except QubenchError as exc:
            _fail(exc)
        if not as_json:
            print_result(out, done[-1], pipeline.result_path(results_dir, spec))
    if as_json:
        out.print_json(json.dumps([json.loads(r.model_dump_json()) for r in done]))


@main.command()
@click.option("--task", default="synth-news", show_default=True)
@shared("task_params", "model", "retrain_model", "seed", "device", "no_rebuild", "as_json")
def prepare(task, task_params, model, retrain_model, seed, device, as_json) -> None:
    """Prepare a task's data and its target and retrain models (cached)."""
    from qubench import preflight, store
    from qubench.device import resolve
    from qubench.progress import reporting
    from qubench.stages import TaskData
    from qubench.stages.models import ExistingModels, models_stage
    from qubench.tasks import muse_layout

    log = _stderr_log(quiet=as_json)
    try:
        device = resolve(device)
        plugin = registry.create("tasks", task, _params(task_params))
        planned = models_stage(plugin, None, model, retrain_model, seed)  # bad model options fail before any work
        if isinstance(planned, ExistingModels):
            planned.check()
        preflight.writable_folder(store.home_path(), "QUBENCH_HOME", preflight.MIN_FREE_HOME)
        with reporting(log):
            data_dir = TaskData(plugin).get()
            models = models_stage(plugin, muse_layout.load(data_dir), model, retrain_model, seed,
                                  progress=not as_json, device=device).get_models()
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
    except (ValidationError, ValueError, OSError, RecursionError) as exc:
        _fail(QubenchError(f"{result_file} is not a valid qubench result: {exc}"))
    _, problem = results.read_stored(result_file)
    if problem is not None:  # shown anyway (it is yours to inspect), but never silently
        console.print(f"[yellow]warning:[/yellow] {escape(problem)} (the leaderboard would reject this file)",
                      highlight=False)
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        print_result(out, result, result_file)


@main.command()
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Grid spec YAML: tasks, methods, quantizers (names or {name, params, label}), seeds, engine.")
@click.option("--preset", type=click.Choice(["default", "paper"]),
              help="default: every built-in method x quantizer on synth-news, 3 seeds; paper: MUSE NEWS/BOOKS (GPU).")
@click.option("--task", "tasks", multiple=True, help="Task (repeatable; replaces the spec's tasks).")
@click.option("--method", "methods", multiple=True, help="Method (repeatable; replaces the spec's methods).")
@click.option("--quant", "quants", multiple=True, help="Quantizer (repeatable; replaces the spec's quantizers).")
@click.option("--engine", default=None, help="Evaluation engine (default hf).")
@shared("task_params", "method_params", "quant_params", "engine_params")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Run seeds 0..N-1 (default: the spec's, else 0).")
@shared("model", "retrain_model", "batch_size", "dtype", "limit", "device")
@click.option("--results", "results_dir", default="results/grid", show_default=True,
              type=click.Path(path_type=Path), help="Cell results go to DIR/cells, the aggregate to DIR/aggregate.json.")
@shared("workers")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--keep", type=click.Choice(["checkpoints", "results"]), default="checkpoints", show_default=True,
              help="results: delete the unlearned and quantized checkpoints this grid built once no cell needs them.")
@click.option("--dry-run", is_flag=True, help="Print how many cells and stages would run and how many are cached.")
@shared("no_rebuild", "as_json")
def grid(spec_file, preset, tasks, methods, quants, engine, task_params, method_params, quant_params, engine_params,
         seeds, model, retrain_model, batch_size, dtype, limit, device, results_dir, workers, executor, ray_address,
         keep, dry_run, as_json) -> None:
    """Run a benchmark grid: tasks x methods x quantizers x seeds, resumable, with seed aggregates.

    Exit status: 0 all cells ok, 1 some cell failed, 2 bad input, 130 interrupted (rerun to continue).
    """
    from qubench.grid import aggregate, report, runner
    from qubench.grid.spec import build_spec

    try:
        spec = build_spec(spec_file, preset, tasks, methods, quants, engine, _params(task_params),
                          _params(method_params), _params(quant_params), _params(engine_params), seeds,
                          model=model, retrain_model=retrain_model, batch_size=batch_size, dtype=dtype,
                          eval_limit=limit)
        if dry_run:
            _, counts = runner.plan(spec, results_dir, device)
            if as_json:
                out.print_json(json.dumps({**counts.as_dict(), "notes": spec.notes}))
            else:
                report.print_plan(console, counts, spec.notes, results_dir)
            return
        options = runner.GridOptions(results_dir, executor, workers, ray_address, keep, verbose=not as_json,
                                     device=device)
        log = _stderr_log(quiet=as_json)
        summary = runner.run_grid(spec, options, log)
    except QubenchError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
    else:
        report.print_summary(console, summary, aggregate.load(Path(summary.aggregate_file)))
    sys.exit(130 if summary.interrupted else 1 if summary.failed else 0)


@main.group()
def cache() -> None:
    """List and clean the stage cache (QUBENCH_HOME)."""


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True)
def cache_ls(as_json) -> None:
    """What the cache holds per stage kind: entries, size, leftovers of interrupted builds."""
    from rich.table import Table

    from qubench.grid.cache import usage

    found = usage()
    if as_json:
        out.print_json(json.dumps(found.as_dict()))
        return
    table = Table(title=f"QUBENCH_HOME {escape(found.home)}", title_justify="left")
    for col in ("kind", "entries", "MiB", "stale temporaries", "stale MiB", "what"):
        table.add_column(col, justify="left" if col in ("kind", "what") else "right")
    for k in found.kinds:
        table.add_row(k.kind, str(k.entries), f"{k.bytes / 2**20:.1f}", str(k.stale_temporaries),
                      f"{k.stale_bytes / 2**20:.1f}", k.description)
    out.print(table)
    out.print(f"total {found.total_bytes / 2**20:.1f} MiB", highlight=False)


@cache.command("clean")
@click.option("--kind", "kinds", multiple=True,
              type=click.Choice([*CACHE_KINDS, "all"]),
              help="Also remove every artifact of this kind (repeatable). Without it: only stale temporaries.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True)
def cache_clean(kinds, dry_run, as_json) -> None:
    """Remove leftovers of interrupted builds, and with --kind whole stage kinds (skipping any in use)."""
    from dataclasses import asdict

    from qubench.grid.cache import KINDS, clean

    chosen = list(KINDS) if "all" in kinds else list(kinds)
    done = clean(chosen, dry_run=dry_run)
    if as_json:
        out.print_json(json.dumps(asdict(done)))
        return
    verb = "would remove" if dry_run else "removed"
    out.print(f"{verb} {len(done.removed)} entries, {done.freed_bytes / 2**20:.1f} MiB", highlight=False)
    if done.skipped_in_use:
        out.print(f"skipped {len(done.skipped_in_use)} in use by a running job", highlight=False)


# --- leaderboard and submissions --------------------------------------------------------------------

@main.command()
@click.option("--results", "results_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A grid's results folder (repeatable). Default: the reference grid in leaderboard/reference.")
@click.option("--submissions", "submissions_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of submissions to show beside the results (default: the repository's submissions/).")
@click.option("--no-submissions", is_flag=True, help="Show the results folders only.")
@click.option("--verifications", "verifications_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The maintainers' verification records (default: the repository's leaderboard/verifications/).")
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
def leaderboard(results_dirs, submissions_dir, no_submissions, verifications_dir, port, address) -> None:
    """Start the leaderboard web page (Streamlit) on the results of a grid and the submissions."""
    from qubench.leaderboard.launch import streamlit_command

    try:
        cmd = streamlit_command(list(results_dirs), submissions_dir, no_submissions, port, address, verifications_dir)
    except QubenchError as exc:
        _fail(exc)
    console.print(f"leaderboard on http://{address}:{port} (Ctrl+C stops it)", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the Streamlit server (no child process): stopping this process stops the server.
    os.execv(cmd[0], cmd)


@main.command()
@click.option("--method", required=True, help="The method's entry-point name (from your package).")
@shared("method_params")
@click.option("--preset", default="default", show_default=True, help="The grid preset whose cells are run.")
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A grid spec file instead of a preset (recorded as a custom grid).")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Run seeds 0..N-1 instead of the preset's.")
@shared("task_params", "quant_params", "limit", "device")
@click.option("--name", default=None, help="Submission folder name (default: the package name).")
@click.option("--out", "out_root", default="submissions", show_default=True, type=click.Path(path_type=Path))
@click.option("--author", "authors", multiple=True, help="Author (repeatable; default: the package metadata).")
@click.option("--license", "license_", default=None, help="Licence (default: the package metadata).")
@click.option("--source", default=None,
              help="What `pip install` is given to install the package: a requirement (default NAME==VERSION) "
                   "or a path relative to the submission folder, e.g. '.'.")
@shared("workers")
def submit(method, method_params, preset, spec_file, seeds, task_params, quant_params, limit, device, name, out_root,
           authors, license_, source, workers) -> None:
    """Run the standard grid for a third-party method and write submissions/<name>/."""
    from qubench.submissions.submit import submit as run_submit

    overrides = {"seeds": seeds, "task_params": _params(task_params), "quant_params": _params(quant_params),
                 "eval_limit": limit}
    try:
        done = run_submit(method, _params(method_params), out_root, name=name, preset=preset, spec_file=spec_file,
                          overrides=overrides, authors=list(authors), license_=license_, source=source,
                          workers=workers, device=device, log=lambda msg: console.print(escape(msg), highlight=False))
    except QubenchError as exc:
        _fail(exc)
    out.print(f"wrote {escape(str(done.folder))} ({done.cells} cells)", highlight=False)
    if done.failed:
        console.print(f"[red]{len(done.failed)} cell(s) failed[/red]: {escape(', '.join(done.failed))}; "
                      "run the same command again to retry them (finished cells are kept)", highlight=False)
        sys.exit(1)
    out.print(f"next: qubench validate {escape(str(done.folder))}", highlight=False)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-install", is_flag=True, help="Check the plugin installed here instead of installing the "
                                                   "declared package into a scratch folder.")
@click.option("--json", "as_json", is_flag=True)
def validate(folder, no_install, as_json) -> None:
    """Check a submission folder and print every problem at once (exit status 1 if there is any)."""
    from qubench.submissions.validate import validate as run_validate

    problems = run_validate(folder, install=not no_install)
    if as_json:
        out.print_json(json.dumps({"folder": str(folder), "valid": not problems, "problems": problems}))
    elif problems:
        console.print(f"[bold red]{escape(str(folder))}: {len(problems)} problem(s)[/bold red]")
        for problem in problems:
            console.print(f"  - {escape(problem)}", highlight=False)
    else:
        out.print(f"{escape(str(folder))}: valid", highlight=False)
    sys.exit(1 if problems else 0)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cells", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many cells to re-run (drawn at random, see --seed).")
@click.option("--seed", default=None,
              help="Fixes the draw instead of a fresh nonce (recorded either way; the cells follow from it and the "
                   "submission's digest).")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Largest accepted |submitted - re-run| on the 0-100 scales (ROUGE, accuracy, PrivLeak).")
@click.option("--auc-tolerance", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="The same on AUC (0-1).")
@click.option("--verifications", "verifications_dir", type=click.Path(file_okay=False, path_type=Path),
              default="leaderboard/verifications", show_default=True,
              help="The maintainers' folder the record is written to (as <name>.yaml), outside the submission.")
@click.option("--no-install", is_flag=True, help="Use the plugin installed here (same package and version).")
@shared("device")
@click.option("--json", "as_json", is_flag=True)
def verify(folder, cells, seed, tolerance, auc_tolerance, verifications_dir, no_install, device, as_json) -> None:
    """Re-run N random cells of a submission and record whether its numbers hold (leaderboard/verifications/)."""
    from qubench.submissions import verification
    from qubench.submissions.schema import Tolerance, verification_path
    from qubench.submissions.verify import verify as run_verify

    try:
        record = run_verify(folder, cells, seed, Tolerance(points=tolerance, auc=auc_tolerance),
                            install=not no_install, device=device,
                            log=lambda msg: console.print(escape(msg), highlight=False),
                            verifications=verifications_dir)
    except QubenchError as exc:
        _fail(exc)
    if as_json:
        out.print_json(record.model_dump_json())
    else:
        for check in record.cells:
            for mismatch in check.mismatches:
                console.print(f"  {escape(check.cell)}: {escape(mismatch)}", highlight=False)
        k, n = len(record.cells), record.cells_in_grid
        verdict = "[green]verified[/green]" if record.verified else "[bold red]NOT verified[/bold red]"
        out.print(f"{escape(str(folder))}: {verdict} ({k} of {n} cells re-run, tolerance {tolerance:g} points / "
                  f"{auc_tolerance:g} AUC, selection nonce {escape(record.selection.nonce)})", highlight=False)
        advice = "" if k >= n else (f"; re-run {verification.cells_for(0.9, n)} cells for 90%, "
                                    f"{verification.cells_for(0.99, n)} for 99%")
        out.print(f"a single tampered cell would have been caught with probability {k}/{n} = "
                  f"{record.detection_probability:.0%}{advice}", highlight=False)
        out.print(f"record: {escape(str(verification_path(verifications_dir, record.submission)))}", highlight=False)
    sys.exit(0 if record.verified else 1)
