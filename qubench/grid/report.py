"""Rich rendering of a grid's plan, summary and aggregate (on stderr; `--json` goes to stdout)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qubench.grid.aggregate import GridAggregate
from qubench.grid.plan import PlanCounts
from qubench.grid.runner import GridReport


def print_plan(console: Console, counts: PlanCounts, notes: list[str], results_dir) -> None:
    table = Table(title=f"grid plan · results in {escape(str(results_dir))}", title_justify="left")
    for col in ("stage", "needed", "cached", "to run"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    table.add_row("cells", str(counts.cells), str(counts.cells_done), str(counts.cells - counts.cells_done))
    for s in counts.stages.values():
        table.add_row(s.stage, str(s.needed), str(s.cached), str(s.to_run))
    console.print(table)
    if counts.cells_failed_before:
        console.print(f"{counts.cells_failed_before} cell(s) failed before and will be retried")
    if not counts.exact:
        console.print("stage counts are upper bounds: some stages depend on artifacts not built yet "
                      "(e.g. the `target` method's model is the target itself)", highlight=False)
    for note in notes:
        console.print(f"note: {escape(note)}", highlight=False)


def print_summary(console: Console, report: GridReport, aggregate: GridAggregate | None = None) -> None:
    d = report.as_dict()
    status = "[yellow]INTERRUPTED[/yellow] " if report.interrupted else ""
    console.print(f"{status}grid: {d['cells']} cells · {d['ok']} ok ({d['reused']} reused) · "
                  f"{d['failed']} failed · {d['not_run']} not run · {d['seconds']:.0f} s", highlight=False)
    built = ", ".join(f"{k} {v}" for k, v in report.built.items() if v) or "nothing"
    console.print(f"built: {built}" + (f" · pruned {report.pruned} checkpoints" if report.pruned else ""),
                  highlight=False)
    if report.stage_seconds:
        stages = sorted(report.stage_seconds.items(), key=lambda kv: -kv[1])
        console.print("stage time summed over computed cells: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages),
                      highlight=False)
    if aggregate is not None and aggregate.rows:
        _print_verdicts(console, aggregate)
    if report.failed:
        table = Table(title="failed cells", title_justify="left", title_style="bold red")
        for col in ("cell", "stage", "error"):
            table.add_column(col, overflow="fold")
        for o in report.failed:
            err = o.error or {}
            table.add_row(escape(o.cell_id), escape(err.get("stage", "?")),
                          escape(f"{err.get('type', '?')}: {err.get('message', '')}"[:300]))
        console.print(table)
        console.print("tracebacks are in each failed cell's result file; rerun the same command to retry them")
    console.print(f"results: {escape(report.results_dir)}/cells · aggregate: {escape(report.aggregate_file)}",
                  highlight=False)
    if report.interrupted:
        console.print("rerun the same command to continue: finished cells are kept")


def _print_verdicts(console: Console, aggregate: GridAggregate, metric: str = "verbmem_f") -> None:
    tasks = {row.task for row in aggregate.rows}
    table = Table(title=f"{metric}: mean over seeds [95% CI]; controlled = damage-controlled recovery (against "
                        "retrain and target at the same precision), paper = (post-pre)/(target-pre); verdict "
                        "from controlled; all metrics in the aggregate file", title_justify="left")
    columns = (["task"] if len(tasks) > 1 else []) + ["method", "quant", "n", "gap", "controlled", "paper",
                                                      "verdict"]
    numeric = ("n", "gap", "controlled", "paper")
    for col in columns:
        table.add_column(col, justify="right" if col in numeric else "left", overflow="fold")
    for row in aggregate.rows:
        m = row.metrics.get(metric)
        if m is None:
            continue
        cells = ([escape(row.task)] if len(tasks) > 1 else []) + [
            escape(row.method), escape(row.quant), str(len(row.seeds)), _est(m.values.get("gap")),
            _est(m.values.get("controlled_recovery"), pct=True), _est(m.values.get("recovery"), pct=True),
            m.recovery_verdict]
        table.add_row(*cells)
    console.print(table)


def _est(e, pct: bool = False) -> str:
    if e is None:
        return "—"
    f = (lambda v: f"{v * 100:.0f}%") if pct else (lambda v: f"{v:.1f}")
    return f(e.mean) if e.ci_low is None else f"{f(e.mean)} [{f(e.ci_low)}, {f(e.ci_high)}]"
