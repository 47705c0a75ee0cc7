"""Shared helpers for the README tables in benchmarks/: run a list of specs (each failure is
recorded as a row, the rest go on) and format metric rows as Markdown."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from qubench import metric_catalog, pipeline
from qubench.errors import QubenchError
from qubench.quiet import quiet_libraries
from qubench.results import RunResult
from qubench.specs import PluginRef, RunSpec


def spec(method: str, quant: str, task: str = "synth-news", **method_params) -> RunSpec:
    return RunSpec(task=PluginRef(name=task), method=PluginRef(name=method, params=method_params),
                   quant=PluginRef(name=quant))


def run_all(specs: Iterable[RunSpec], results_dir: Path) -> dict[tuple[str, str], RunResult | str]:
    """Run every spec; a failure becomes its error text so one bad cell does not stop the table."""
    quiet_libraries()
    out: dict[tuple[str, str], RunResult | str] = {}
    t0 = time.time()
    for s in specs:
        key = (s.method.name, s.quant.name)
        try:
            out[key] = pipeline.run(s, results_dir, log=lambda m: None, progress=False)
        except QubenchError as exc:
            out[key] = f"failed: {str(exc).splitlines()[0][:120]}"
        status = out[key] if isinstance(out[key], str) else "ok"
        print(f"[{time.time() - t0:6.0f}s] {key[0]} x {key[1]}: {status}", flush=True)
    return out


def num(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.0f}%"


def pre_post(result: RunResult, metric: str, digits: int = 1) -> str:
    """'pre → post (recovery)' for a forget metric, recovery '—' when undefined (see the result's note);
    'pre → post' for any other role (a utility or raw metric has no forgetting to recover)."""
    row = result.metrics.get(metric)
    if row is None:
        return "—"
    moved = f"{num(row.pre, digits)} → {num(row.post, digits)}"
    return f"{moved} ({pct(row.recovery)})" if metric_catalog.get(metric).role == "forget" else moved


def size_mib(result: RunResult) -> str:
    ckpt = result.resolved.get("quant", {}).get("checkpoint", {})
    return "—" if not ckpt.get("size_bytes") else f"{ckpt['size_bytes'] / 2**20:.2f}"


def quant_seconds(result: RunResult) -> str:
    ckpt = result.resolved.get("quant", {}).get("checkpoint", {})
    return num(ckpt.get("seconds"), 2)


def markdown(columns: list[str], rows: list[list[str]], header: str = "") -> str:
    lines = [header] if header else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def emit(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
