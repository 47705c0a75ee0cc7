"""Re-run cells of the shipped reference grid with the current code and compare every number.

A refactor must re-score the reference to identical values: this runs each chosen cell's exact spec
(`pipeline.run`, into a scratch results folder, with the stage cache of QUBENCH_HOME) and prints, per
cell, every metric field and diagnostic that differs from the shipped result (exact comparison).

    OMP_NUM_THREADS=1 python benchmarks/rescore_reference.py --cell ga_gdr/rtn-4bit [--cell npo_klr/gptq-4bit]
    OMP_NUM_THREADS=1 python benchmarks/rescore_reference.py --cell ga_gdr/rtn-4bit --device cpu --fresh

--device is passed to the run (default cpu, where the reference was computed). --fresh recomputes
unlearning, quantization and every evaluation in a scratch cache that shares only the task data and
the target/retrain models of QUBENCH_HOME (as `qubench verify` does); without it, cached stages are
reused and only the scoring runs again.

The reference was computed with one torch thread per worker: use OMP_NUM_THREADS=1 for bit-identity.
Exit status 0 when every compared number is identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1] / "leaderboard" / "reference"
METRIC_FIELDS = ("pre", "post", "gap", "recovery", "target_pre", "target_post", "retrain", "retrain_post", "position_pre",
                 "position_post", "controlled_recovery", "target_change")
DIAGNOSTIC_FIELDS = ("mean_abs_delta", "max_abs_delta", "mean_quant_step", "delta_over_step",
                     "quantized_disagreement")


def differences(shipped: dict, rerun: dict) -> list[str]:
    out = []
    for name, row in shipped["metrics"].items():
        new = rerun["metrics"].get(name)
        if new is None:
            out.append(f"{name}: missing from the re-run")
            continue
        out += [f"{name}.{f}: shipped {row.get(f)!r}, re-run {new.get(f)!r}" for f in METRIC_FIELDS
                if row.get(f) != new.get(f)]
    out += [f"diagnostics.{f}: shipped {shipped['diagnostics'].get(f)!r}, re-run {rerun['diagnostics'].get(f)!r}"
            for f in DIAGNOSTIC_FIELDS if shipped["diagnostics"].get(f) != rerun["diagnostics"].get(f)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", action="append", required=True, help="METHOD/QUANT of a seed-0 reference cell")
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--fresh", action="store_true", help="recompute every stage after the target/retrain models")
    args = ap.parse_args()

    import torch

    import contextlib

    from qubench import pipeline, results
    from qubench.quiet import quiet_libraries
    from qubench.specs import RunSpec
    from qubench.submissions.verify import scratch_home

    quiet_libraries()
    print(f"torch threads: {torch.get_num_threads()}")
    failed = 0
    for cell in args.cell:
        method, quant = cell.split("/")
        [path] = sorted((args.reference / "cells").glob(f"*__{method}__{quant}__s0__*.json"))
        # Through the schema, so a file of an older schema is compared as it loads today (qubench.results).
        shipped = json.loads(results.load(path).model_dump_json())
        spec = RunSpec.model_validate(shipped["spec"])
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch, (scratch_home() if args.fresh else contextlib.nullcontext()):
            rerun = json.loads(pipeline.run(spec, Path(scratch), log=lambda m: None, progress=False,
                                            device=args.device).model_dump_json())
        diff = differences(shipped, rerun)
        failed += bool(diff)
        verdict = "identical" if not diff else f"{len(diff)} difference(s)"
        print(f"{cell}: {verdict} ({time.perf_counter() - t0:.0f} s, device {rerun['resolved']['device']['kind']}"
              f"{', every stage after the models recomputed' if args.fresh else ''})")
        for line in diff:
            print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
