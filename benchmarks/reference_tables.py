"""The README's tables from a grid's aggregate (the shipped reference by default): the known-answer control
under every quantizer, the base methods under every quantizer, the robust methods next to their bases.

    python benchmarks/reference_tables.py                                  # leaderboard/reference
    python benchmarks/reference_tables.py --aggregate R/aggregate.json --metric verbmem_f

Every figure is the mean over seeds with its 95% interval as `aggregate.json` states it (damage-controlled
recovery: the hierarchical paired bootstrap over seeds and probes); nothing is recomputed here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qubench.grid.aggregate import Estimate, GridAggregate, RowAggregate, load

REFERENCE = Path(__file__).resolve().parents[1] / "leaderboard" / "reference" / "aggregate.json"
CONTROL = "ga_gdr+inbucket"
BASES = ("ga_gdr", "npo_klr")
ROBUST = {"quail": "ga_gdr", "sure": "ga_gdr", "lora": "ga_gdr", "npo_klr+hinge": "npo_klr",
          "npo_klr+sure": "npo_klr", "npo_klr+lora": "npo_klr"}


def value(e: Estimate | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if e is None else f"{e.mean * scale:.{digits}f}"


def interval(e: Estimate | None, pct: bool = True) -> str:
    """`mean [low, high]`, as percentages for recoveries."""
    if e is None:
        return "undefined"
    s, unit = (100, "%") if pct else (1, "")
    text = f"{e.mean * s:.0f}{unit}"
    if e.ci_low is not None and e.ci_high is not None:
        text += f" [{e.ci_low * s:.0f}, {e.ci_high * s:.0f}]"
    return text


class Reference:
    def __init__(self, agg: GridAggregate, metric: str, utility: str):
        self.rows = {(r.method, r.quant): r for r in agg.rows}
        self.metric, self.utility = metric, utility
        self.quants = sorted({q for _, q in self.rows})

    def get(self, method: str, quant: str, field: str, metric: str | None = None) -> Estimate | None:
        row: RowAggregate | None = self.rows.get((method, quant))
        m = row.metrics.get(metric or self.metric) if row else None
        return m.values.get(field) if m else None

    def verdict(self, method: str, quant: str) -> str:
        row = self.rows.get((method, quant))
        return row.metrics[self.metric].recovery_verdict if row and self.metric in row.metrics else "—"

    def seeds(self, method: str, quant: str) -> int:
        row = self.rows.get((method, quant))
        return len(row.seeds) if row else 0

    def recovery_cells(self, method: str, quant: str) -> list[str]:
        g = lambda f: self.get(method, quant, f)  # noqa: E731
        return [f"{value(g('pre'))} → {value(g('post'))}",
                f"{value(g('position_pre'), 100, 0)}% → {value(g('position_post'), 100, 0)}%",
                f"**{interval(g('controlled_recovery'))}**", self.verdict(method, quant), interval(g("recovery"))]

    def control_table(self) -> list[str]:
        m = self.metric
        out = [f"| quantizer | {m} target → tgt q | retrain → retrain q | {m} pre → post | position pre → post "
               "| damage-controlled recovery [95% CI] | verdict | papers' recovery [95% CI] |",
               "|---" * 8 + "|"]
        for q in self.quants:
            if (CONTROL, q) not in self.rows:
                continue
            g = lambda f: self.get(CONTROL, q, f)  # noqa: E731
            out.append(f"| {q} | {value(g('target_pre'))} → {value(g('target_post'))} | {value(g('retrain'))} → "
                       f"{value(g('retrain_post'))} | " + " | ".join(self.recovery_cells(CONTROL, q)) + " |")
        return out

    def base_table(self) -> list[str]:
        out = ["| quantizer | method | " + f"{self.metric} pre → post | position pre → post | damage-controlled "
               f"recovery [95% CI] | verdict | papers' recovery [95% CI] | {self.utility} change |",
               "|---" * 8 + "|"]
        for q in self.quants:
            for method in BASES:
                if (method, q) in self.rows:
                    out.append(f"| {q} | {method} | " + " | ".join(self.recovery_cells(method, q))
                               + f" | {value(self.get(method, q, 'gap', self.utility))} |")
        return out

    def robust_table(self, quants: tuple[str, ...] = ("rtn-4bit", "gptq-4bit")) -> list[str]:
        out = [f"| method | base | quantizer | {self.metric} target → unlearned | {self.utility} target → unlearned "
               "| damage-controlled recovery [95% CI] | verdict | base's recovery [95% CI] |",
               "|---" * 8 + "|"]
        for method, base in ROBUST.items():
            for q in quants:
                if (method, q) not in self.rows:
                    continue
                g = lambda f, m=None: self.get(method, q, f, m)  # noqa: E731
                base_rec = interval(self.get(base, q, "controlled_recovery"))
                out.append(f"| {method} | {base} | {q} | {value(g('target_pre'))} → {value(g('pre'))} | "
                           f"{value(g('target_pre', self.utility))} → {value(g('pre', self.utility))} | "
                           f"**{interval(g('controlled_recovery'))}** | {self.verdict(method, q)} | {base_rec} |")
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aggregate", type=Path, default=REFERENCE)
    ap.add_argument("--metric", default="verbmem_f")
    ap.add_argument("--utility", default="verbmem_r")
    opts = ap.parse_args()
    ref = Reference(load(opts.aggregate), opts.metric, opts.utility)
    seeds = sorted({len(r.seeds) for r in ref.rows.values()})
    print(f"<!-- generated by benchmarks/reference_tables.py from {opts.aggregate.name}; seeds per row: {seeds} -->")
    for title, lines in (("control", ref.control_table()), ("base methods", ref.base_table()),
                         ("robust methods", ref.robust_table())):
        print(f"\n### {title}\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
