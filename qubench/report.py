"""Rich terminal rendering of results and plugin lists."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qubench import metric_catalog
from qubench.results import RunResult


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.0f}%" if pct else f"{value:.1f}"


#: How the report flags a run by its separation status (`qubench.scoring.separation`); a separated run
#: gets a plain line under the tables instead.
_SEPARATION_BANNER = {"not separated": "[bold red]NO SEPARATION[/bold red]",
                      "partly separated": "[yellow]partial separation[/yellow]",
                      "unchecked": "[yellow]separation unchecked[/yellow]"}


def print_result(console: Console, result: RunResult, path: Path | None = None) -> None:
    spec = result.spec
    title = escape(f"{spec.task.name} · {spec.method.name} · {spec.quant.name} · seed {spec.seed} · "
                   f"engine {spec.engine.name}")
    if result.status != "ok":
        err = result.error
        console.print(f"[bold red]FAILED[/bold red] {title}\n  stage {err.stage}: {escape(err.type)}: {escape(err.message)}")
        return
    sep = result.separation
    # First, before any number: whether the numbers below can show forgetting at all.
    if sep is not None and sep.status in _SEPARATION_BANNER:
        console.print(f"{_SEPARATION_BANNER[sep.status]}: {escape(sep.message)}")
    forget = {n: r for n, r in result.metrics.items() if _role(n) == "forget"}
    others = {n: r for n, r in result.metrics.items() if _role(n) != "forget"}
    if forget:
        table = _table(title, ("metric", "target", "tgt q", "retrain", "pre", "post", "gap", "recov"))
        for name, row in forget.items():
            flag = " *" if sep is not None and (m := sep.of(name)) is not None and m.separated is False else ""
            table.add_row(escape(name) + flag, _fmt(row.target_pre), _fmt(row.target_post), _fmt(row.retrain),
                          _fmt(row.pre), _fmt(row.post), _fmt(row.gap), _fmt(row.recovery, pct=True))
        console.print(table)
        _print_controlled(console, result)
    if others:
        # Utility, floor and raw metrics have no forgetting to recover: only their change under quantization.
        table = _table("utility and reference metrics: change under quantization" if forget else title,
                       ("metric", "target", "tgt q", "tgt Δq", "retrain", "pre", "post", "Δq"))
        for name, row in others.items():
            table.add_row(escape(name), _fmt(row.target_pre), _fmt(row.target_post), _fmt(row.target_change),
                          _fmt(row.retrain), _fmt(row.pre), _fmt(row.post), _fmt(row.gap))
        console.print(table)
    if note := result.resolved.get("task", {}).get("note"):
        console.print(f"[yellow]note[/yellow]: {escape(note)}")
    _print_audit(console, result)
    # Tasks without QA probes (e.g. social-media posts) have no KnowMem: say so instead of a silent gap.
    absent = [m.name for m in metric_catalog.METRICS if m.muse and m.name not in result.metrics]
    if absent:
        console.print(f"not applicable to this task (no probes in its data): {', '.join(absent)}")
    d = result.diagnostics
    console.print(
        f"mean |Δw| {_sci(d.mean_abs_delta)} · max |Δw| {_sci(d.max_abs_delta)} · mean quant step "
        f"{_sci(d.mean_quant_step)} · |Δw|/step {_sci(d.delta_over_step)} · quantized weights that differ "
        f"from quantized target {_fmt(d.quantized_disagreement, pct=True)}"
    )
    console.print("target/tgt q = target at full precision/quantized; pre/post = unlearned model at full "
                  "precision/quantized; gap = post-pre; recov = (post-pre)/(target-pre), the papers' figure, for forget metrics only; "
                  "Δq = change under quantization (post-pre; tgt Δq = tgt q - target)."
                  + (" * = not separated: the target does not remember this metric measurably more than a model "
                     "that never saw the forget set."
                     if any(m.separated is False for m in (sep.metrics if sep else [])) else ""))
    if sep is not None and sep.status == "separated":
        console.print(f"separation: {escape(sep.message)}")
    notes = {n: r.recovery_note for n, r in forget.items() if r.recovery_note}
    for name, note in notes.items():
        console.print(f"  {escape(name)}: recovery {escape(note)}")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    console.print(f"timings: {timings}")
    if path is not None:
        console.print(f"result: {path}")


def _print_controlled(console: Console, result: RunResult) -> None:
    """The damage-controlled view of the forget metrics: each model placed between the retrain model (0)
    and the target (1) at the same precision, and the share of the rest that quantization takes back."""
    rows = [(n, r) for n, r in result.metrics.items()
            if metric_catalog.BY_NAME.get(n) and metric_catalog.BY_NAME[n].role == "forget"]
    if not rows or all(r.retrain_post is None for _, r in rows):
        return
    table = Table(title="forgetting between retrain (0) and target (1) at the same precision",
                  title_justify="left")
    for col in ("forget metric", "retrain q", "position pre", "position post", "recovered"):
        table.add_column(col, justify="left" if col == "forget metric" else "right", no_wrap=True)
    for name, row in rows:
        table.add_row(escape(name), _fmt(row.retrain_post), _pos(row.position_pre), _pos(row.position_post),
                      _fmt(row.controlled_recovery, pct=True))
    console.print(table)
    console.print("recovered = (position post - position pre) / (1 - position pre): the share of the "
                  "forgetting that quantization takes back, with the quantizer's damage to the references "
                  "removed (0% = survives, 100% = fully undone).")
    for name, row in rows:
        if row.controlled_recovery_note:
            console.print(f"  {escape(name)}: recovered {escape(row.controlled_recovery_note)}")


def _pos(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _print_audit(console: Console, result: RunResult) -> None:
    """An audit's checkpoint and its notes."""
    external = (result.resolved.get("method") or {}).get("external")
    if isinstance(external, dict):
        where = external.get("hub_id") or external.get("path")
        revision = f" @ {external['revision']}" if external.get("revision") else ""
        kind, fingerprint = escape(str(external.get("kind"))), escape(str(external.get("fingerprint")))
        console.print(f"audited checkpoint: {escape(str(where))}{escape(revision)} ({kind}, fingerprint {fingerprint})",
                      highlight=False)
    for note in (result.resolved.get("audit") or {}).get("notes", []):
        console.print(f"[yellow]note[/yellow]: {escape(str(note))}")


def _role(name: str) -> str:
    metric = metric_catalog.BY_NAME.get(name)
    return metric.role if metric is not None else "raw"


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in columns:
        if col == "metric":
            table.add_column(col, no_wrap=True, min_width=15)  # names must stay readable on 80 columns
        else:
            table.add_column(col, justify="right", no_wrap=True)
    return table


def _sci(value) -> str:
    return "—" if value is None else f"{value:.2e}"


def print_plugins(console: Console, family: str, infos) -> None:
    table = Table(title=f"qubench {family}", title_justify="left")
    for col in ("name", "package", "version", "description"):
        table.add_column(col)
    for info in infos:
        # Plugin text is third-party: escape it so brackets print as written, never as markup.
        desc = escape(info.description) if info.error is None else f"[red]{escape(info.error)}[/red]"
        table.add_row(escape(info.name), escape(info.package), escape(info.version), desc)
    console.print(table)


__all__ = ["print_result", "print_plugins"]
