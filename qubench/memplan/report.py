"""Print a memory plan: a table per stage (each item once, with the phases it is part of, then each
phase's total), a verdict per stage, and the options that would fit; or the same as JSON."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qubench.memplan.plan import UNCHECKED, GiB, MemoryPlan


def human(n: int, unknown: bool = False) -> str:
    """Bytes for people: MiB below 1 GiB, GiB above; blank for nothing, ? for unknown."""
    if unknown:
        return "?"
    if n == 0:
        return ""
    return f"{n / 2**20:,.1f} MiB" if n < GiB else f"{n / GiB:,.2f} GiB"


def shape_summary(plan: MemoryPlan) -> dict:
    s = plan.shape
    return {"architecture": s.architecture, "params": s.params, "layers": s.layers, "hidden": s.hidden,
            "intermediate": s.intermediate, "heads": s.heads, "kv_dim": s.kv_dim, "vocab": s.vocab,
            "context": s.context, "saved_bytes_per_param": s.saved_bytes}


def as_dict(plan: MemoryPlan) -> dict:
    verdicts = plan.verdicts()
    return {**plan.model_dump(mode="json"), "shape": shape_summary(plan), "lengths": plan.lengths.source,
            "peaks": {st.stage: {"device_bytes": st.device_peak, "host_bytes": st.host_peak, "processes": st.processes,
                                 "unknown": st.unknown} for st in plan.stages},
            "verdicts": [v.model_dump() for v in verdicts], "fits": all(v.fits for v in verdicts),
            "suggestions": plan.suggestions()}


def print_plan(console: Console, plan: MemoryPlan) -> None:
    s = plan.shape
    console.print(f"[bold]memory plan[/bold] for {escape(plan.model)}: {s.architecture}, {s.params:,} parameters, "
                  f"{s.layers} blocks, hidden {s.hidden}, vocab {s.vocab}, context {s.context}, saved in "
                  f"{s.saved_bytes}-byte floats; no weights loaded", highlight=False)
    hw = plan.hardware
    host = f", {hw.host_bytes / GiB:,.1f} GiB host" if hw.accelerator and hw.host_bytes != UNCHECKED else ""
    console.print(f"devices: {escape(hw.source)} ({hw.device_bytes / GiB:,.1f} GiB per device{host})", highlight=False)
    console.print(f"token counts: {escape(plan.lengths.source)}", highlight=False)
    for stage in plan.stages:
        table = Table(title=f"{stage.stage}: {escape(stage.label)}" + (
            f" ({stage.processes} processes, per device)" if stage.processes > 1 else ""), title_justify="left")
        for col, justify in (("phase", "left"), ("item", "left"), ("per device", "right"), ("host", "right"),
                             ("from", "left")):
            table.add_column(col, justify=justify, overflow="fold")
        seen: list = []
        for phase in stage.phases:
            for item in phase.items:
                if item not in seen:
                    seen.append(item)
        for index, item in enumerate(seen):
            phases = ", ".join(p.name for p in stage.phases if item in p.items)
            table.add_row(phases, escape(item.what), human(item.device, item.unknown), human(item.host, item.unknown),
                          escape(item.source), end_section=index == len(seen) - 1)
        for phase in stage.phases:
            table.add_row(*(f"[bold]{cell}[/bold]" for cell in (escape(phase.name), "total", human(phase.device),
                                                                human(phase.host))), "")
        console.print(table)
        for note in stage.notes:
            console.print(f"  note: {escape(note)}", highlight=False)
    summary = Table(title="verdict", title_justify="left")
    for col in ("stage", "peak per device", "peak host", "processes", "fits"):
        summary.add_column(col, justify="left" if col == "stage" else "right")
    for stage, verdict in zip(plan.stages, plan.verdicts()):
        fits = ("[yellow]yes, tight (<10% to spare)[/yellow]" if verdict.tight else "[green]yes[/green]") \
            if verdict.fits else f"[red]no[/red]: {escape(verdict.problem or '')}"
        summary.add_row(stage.stage, human(stage.device_peak) or "0", human(stage.host_peak) or "0",
                        str(stage.processes), fits)
    console.print(summary)
    for stage in plan.stages:
        if stage.unknown:
            console.print(f"  {stage.stage}: not counted (needs the task data): {escape(', '.join(stage.unknown))}",
                          highlight=False)
