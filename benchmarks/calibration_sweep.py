"""Calibration sweep for the default task: which training recipe and unlearning strength
reproduce the seed paper's setting (a target that memorised its forget set, unlearning that
forgets at full precision through small weight changes) and what 4-bit / 8-bit RTN does then.

Prints a Markdown table (and writes it to --out). Whatever it shows is the finding.

    python benchmarks/calibration_sweep.py --out benchmarks/results/calibration.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qubench import pipeline
from qubench.errors import QubenchError
from qubench.quiet import quiet_libraries
from qubench.specs import PluginRef, RunSpec

RECIPES = {
    "scratch-lr3e-3": {"pretrain_epochs": 0, "epochs": 30, "lr": 3e-3},
    "pretrain+ft-lr1e-3": {"pretrain_epochs": 10, "epochs": 20, "lr": 1e-3},
    "pretrain+ft-lr3e-4": {"pretrain_epochs": 10, "epochs": 40, "lr": 3e-4},
    "pretrain+ft-lr1e-3-bf16": {"pretrain_epochs": 10, "epochs": 20, "lr": 1e-3, "save_dtype": "bfloat16"},
}
METHODS = ("ga_gdr", "npo_klr")
UNLEARN_LRS = (1e-5, 1e-4, 1e-3)
QUANTS = ("rtn-4bit", "rtn-8bit")
COLUMNS = ("recipe", "method", "lr", "VerbMem_f target/retrain", "KnowMem_f target/retrain",
           "VerbMem_f target 4b", "VerbMem_f pre", "VerbMem_f post 4b (rec)", "VerbMem_f post 8b (rec)",
           "KnowMem_f pre/post 4b", "VerbMem_r target/pre/post 4b", "VerbMem_holdout pre", "|dw|/step 4b",
           "q-weights differing 4b")


def fmt(v, pct=False):
    return "—" if v is None else (f"{v * 100:.0f}%" if pct else f"{v:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=Path("results/calibration"))
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--lrs", nargs="*", type=float, default=list(UNLEARN_LRS))
    args = ap.parse_args()
    quiet_libraries()
    rows = []
    t0 = time.time()
    for recipe in args.recipes:
        for method in METHODS:
            for lr in args.lrs:
                res = {}
                for quant in QUANTS:
                    spec = RunSpec(task=PluginRef(name="synth-news", params={"recipe": RECIPES[recipe]}),
                                   method=PluginRef(name=method, params={"lr": lr}), quant=PluginRef(name=quant))
                    try:
                        res[quant] = pipeline.run(spec, args.results, log=lambda m: None, progress=False)
                    except QubenchError as exc:
                        print(f"FAILED {recipe} {method} {lr} {quant}: {exc}", flush=True)
                if len(res) < len(QUANTS):
                    continue
                m4, m8 = res["rtn-4bit"].metrics, res["rtn-8bit"].metrics
                v, v8, k = m4["verbmem_f"], m8["verbmem_f"], m4["knowmem_f"]
                r = m4.get("verbmem_r")
                d4 = res["rtn-4bit"].diagnostics
                row = (recipe, method, f"{lr:g}", f"{fmt(v.target_pre)}/{fmt(v.retrain)}",
                       f"{fmt(k.target_pre)}/{fmt(k.retrain)}", fmt(v.target_post), fmt(v.pre),
                       f"{fmt(v.post)} ({fmt(v.recovery, True)})", f"{fmt(v8.post)} ({fmt(v8.recovery, True)})",
                       f"{fmt(k.pre)}/{fmt(k.post)}",
                       "—" if r is None else f"{fmt(r.target_pre)}/{fmt(r.pre)}/{fmt(r.post)}",
                       fmt(m4["verbmem_holdout"].pre), f"{d4.delta_over_step:.3f}",
                       fmt(d4.quantized_disagreement, True))
                rows.append(row)
                print(" | ".join(row), f"[{time.time() - t0:.0f}s]", flush=True)
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(table)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
