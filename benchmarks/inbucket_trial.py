"""The known-answer control `ga_gdr+inbucket` on the default task (issue #14).

Its unlearning is hidden inside rtn-4bit's buckets, so quantizing it with rtn-4bit must give
exactly the quantized target (recovery 100% by construction) while at full precision it has
forgotten. Under other quantizers the outcome is measured, not known: rtn-8bit rounds on a
grid 16x finer, so the forgetting should stay; gptq-4bit and bnb-nf4 round differently.

Prints, per quantizer: VerbMem_f of the target (full precision -> quantized), of the control at
full precision and quantized (with the papers' recovery), utility (VerbMem_r) and the holdout
floor (VerbMem_holdout) the same way, the share of quantized weights that differ from the
quantized target's, and whether every metric of the quantized control equals the quantized
target's.

    python benchmarks/inbucket_trial.py --out benchmarks/results/inbucket.md
    python benchmarks/inbucket_trial.py --scheme bnb-nf4 --quants bnb-nf4 rtn-4bit   # hidden in NF4 instead
    python benchmarks/inbucket_trial.py --sweep     # full-precision figures of candidate settings

`--sweep` runs the settings the modifier's defaults were chosen from (all under rtn-4bit) and
prints, for each, forgetting and utility at full precision: nothing else is tuned.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml
from tables import emit, markdown, num, pct, spec

from qubench import pipeline
from qubench.errors import QubenchError
from qubench.quiet import quiet_libraries
from qubench.results import RunResult
from qubench.specs import PluginRef, RunSpec

METHOD = "ga_gdr+inbucket"
#: quantizers to measure, as "name" or "name:key=value,..." (YAML values)
QUANTS = ("rtn-4bit", "rtn-8bit", "rtn-4bit:group_size=64", "rtn-3bit", "gptq-4bit", "awq-4bit", "bnb-nf4",
          "bnb-fp4")
#: candidate settings for the defaults: (label, method parameters)
SWEEP = (
    ("base defaults (lr 1e-5, 10 epochs, 4x8 windows)", {"lr": 1e-5}),
    ("lr 2e-5, 10 epochs, 4x8", {"lr": 2e-5}),
    ("lr 3e-5, 10 epochs, 4x8", {"lr": 3e-5}),
    ("lr 5e-5, 10 epochs, 4x8", {"lr": 5e-5}),
    ("lr 5e-5, 10 epochs, 4x8, alpha 3", {"lr": 5e-5, "alpha": 3.0}),
    ("lr 5e-5, 10 epochs, 4x8, alpha 2", {"lr": 5e-5, "alpha": 2.0}),
    ("lr 1e-4, 10 epochs, 4x8", {"lr": 1e-4}),
    ("lr 1e-4, 10 epochs, 4x8, alpha 3", {"lr": 1e-4, "alpha": 3.0}),
    ("lr 1e-4, 10 epochs, 4x8, alpha 5", {"lr": 1e-4, "alpha": 5.0}),
    ("lr 2e-4, 10 epochs, 4x8, alpha 5", {"lr": 2e-4, "alpha": 5.0}),
    ("lr 3e-4, 10 epochs, 4x8", {"lr": 3e-4}),
    ("lr 1e-4, 80 steps of 4 (the issue's trial)", {"lr": 1e-4, "grad_accum": 1, "max_steps": 80}),
)
COLUMNS = ["quantizer", "VerbMem_f target → tgt q", "VerbMem_f fp → q (rec.)", "VerbMem_r target → tgt q",
           "VerbMem_r fp → q", "VerbMem_holdout target → tgt q", "VerbMem_holdout fp → q",
           "quantized weights ≠ q(target)", "q(control) = q(target) on every metric"]


def arrow(a, b) -> str:
    return f"{num(a)} → {num(b)}"


def quant_ref(text: str) -> PluginRef:
    name, _, params = text.partition(":")
    pairs = (p.split("=", 1) for p in params.split(",") if p)
    return PluginRef(name=name, params={k: yaml.safe_load(v) for k, v in pairs})


def run_control(quants, results_dir: Path, scheme: str) -> dict[str, RunResult | str]:
    """One run per quantizer (a failure becomes its error text, the others go on)."""
    quiet_libraries()
    out: dict[str, RunResult | str] = {}
    t0 = time.time()
    method = PluginRef(name=METHOD, params={} if scheme == "rtn-4bit" else {"inbucket_scheme": scheme})
    for q in quants:
        s = RunSpec(task=PluginRef(name="synth-news"), method=method, quant=quant_ref(q))
        try:
            out[q] = pipeline.run(s, results_dir, log=lambda m: None, progress=False)
        except QubenchError as exc:
            out[q] = f"failed: {str(exc).splitlines()[0][:120]}"
        print(f"[{time.time() - t0:6.0f}s] {METHOD} x {q}: {out[q] if isinstance(out[q], str) else 'ok'}", flush=True)
    return out


def control_rows(results, quants) -> list[list[str]]:
    rows = []
    for q in quants:
        r = results[q]
        if isinstance(r, str):
            rows.append([q, r] + ["—"] * (len(COLUMNS) - 2))
            continue
        f, u, h = (r.metrics[m] for m in ("verbmem_f", "verbmem_r", "verbmem_holdout"))
        same = all(row.post == row.target_post for row in r.metrics.values())
        rows.append([q, arrow(f.target_pre, f.target_post), f"{arrow(f.pre, f.post)} ({pct(f.recovery)})",
                     arrow(u.target_pre, u.target_post), arrow(u.pre, u.post), arrow(h.target_pre, h.target_post),
                     arrow(h.pre, h.post), pct(r.diagnostics.quantized_disagreement), "yes" if same else "no"])
    return rows


def sweep(results_dir: Path) -> None:
    specs = [spec(METHOD, "rtn-4bit", **params) for _, params in SWEEP]
    rows = []
    t0 = time.time()
    quiet_libraries()
    for (label, _), s in zip(SWEEP, specs):
        r = pipeline.run(s, results_dir, log=lambda m: None, progress=False)
        f, u, h = (r.metrics[m] for m in ("verbmem_f", "verbmem_r", "verbmem_holdout"))
        extra = r.unlearning["extra"]
        print(f"[{time.time() - t0:6.0f}s] {label}", flush=True)
        rows.append([label, str(r.unlearning["steps"]), arrow(f.target_pre, f.pre), arrow(u.target_pre, u.pre),
                     arrow(h.target_pre, h.pre), num(f.retrain), num(u.retrain),
                     f"{extra['inbucket']['share_at_bucket_wall']:.1%}", f"{extra['seconds']:.0f}"])
    cols = ["setting", "steps", "VerbMem_f target → fp", "VerbMem_r target → fp", "VerbMem_holdout target → fp",
            "VerbMem_f retrain", "VerbMem_r retrain", "weights at a bucket wall", "unlearn s"]
    emit(markdown(cols, rows, "<!-- generated by benchmarks/inbucket_trial.py --sweep -->"), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--results", type=Path, default=Path("results/inbucket_trial"))
    ap.add_argument("--quants", nargs="*", default=list(QUANTS))
    ap.add_argument("--scheme", default="rtn-4bit", help="inbucket_scheme: the quantizer the control hides from")
    ap.add_argument("--sweep", action="store_true", help="full-precision figures of the candidate settings")
    args = ap.parse_args()
    if args.sweep:
        sweep(args.results)
        return
    results = run_control(args.quants, args.results, args.scheme)
    header = (f"<!-- generated by benchmarks/inbucket_trial.py; the control hides in {args.scheme}'s buckets; "
              "rec. = (post - pre)/(target - pre) -->")
    emit(markdown(COLUMNS, control_rows(results, args.quants), header), args.out)


if __name__ == "__main__":
    main()
