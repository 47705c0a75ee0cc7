"""Time a grid cold, then warm, and show that a warm re-run trains, quantizes and evaluates nothing.

    python benchmarks/grid_speed.py                       # the `default` preset, 1 seed (hours on 2 cores)
    python benchmarks/grid_speed.py --home /path/to/cache # reuse a cache (then "cold" is only as cold as it)
    python benchmarks/grid_speed.py --results DIR         # keep the grid's results (leaderboard reference)
    python benchmarks/grid_speed.py -- --task-param size=micro --limit 2 --method-param epochs=1 ...

Phases, each printed with its plan (stages to run / cached), wall time, new cache entries per stage
kind and the stage times summed over the cells it computed:

1. cold: an empty QUBENCH_HOME (a temporary one unless --home) and an empty results folder;
2. warm: the same command again: every cell's result is reused;
3. warm cache, new results folder: every cell is scored again from cached stages only.

Phases 2 and 3 must build nothing (no unlearned model, quantized checkpoint or evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def grid(args: list[str], env: dict, results: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "qubench", "grid", *args, "--results", str(results), "--json", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: some cell failed, still a finished grid
        sys.exit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def phase(name: str, args: list[str], env: dict, results: Path) -> dict:
    plan = grid(args, env, results, "--dry-run")
    t0 = time.perf_counter()
    summary = grid(args, env, results)
    wall = time.perf_counter() - t0
    stages = plan["stages"]
    print(f"\n== {name}: {wall:.0f} s wall, {summary['cells']} cells: {summary['ok']} ok "
          f"({summary['reused']} reused), {summary['failed']} failed")
    print("   plan (to run / needed): " + ", ".join(f"{k} {v['to_run']}/{v['needed']}" for k, v in stages.items())
          + f", cells {plan['cells_to_run']}/{plan['cells']}" + ("" if plan["exact"] else " (upper bounds)"))
    print("   built: " + ", ".join(f"{k} {v}" for k, v in summary["built"].items()))
    secs = sorted(summary["stage_seconds"].items(), key=lambda kv: -kv[1])
    if secs:
        total = sum(v for _, v in secs)
        print("   stage time over computed cells: " + ", ".join(f"{k} {v:.0f} s ({v / total:.0%})" for k, v in secs))
    return {"wall": wall, "summary": summary, "plan": plan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", help="grid preset; \"\" for a grid given by flags after --")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--home", help="QUBENCH_HOME to use (default: a fresh temporary one)")
    ap.add_argument("--results", help="keep the cold phase's results here (e.g. to ship them as the "
                    "leaderboard's reference grid); default: a temporary folder")
    ap.add_argument("rest", nargs="*", help="more `qubench grid` options, after --")
    opts = ap.parse_args()
    args = (["--preset", opts.preset] if opts.preset else []) + ["--seeds", opts.seeds, *opts.rest]
    with tempfile.TemporaryDirectory() as tmp:
        home = opts.home or f"{tmp}/home"
        env = {**os.environ, "QUBENCH_HOME": home}
        # The default task's models are tiny: one thread per process beats two on a shared 2-core
        # machine (5 training steps: 7.9 s with 1 thread, 43.7 s with 2, measured under load).
        env.setdefault("OMP_NUM_THREADS", "1")
        print(f"cores: {os.cpu_count()}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, QUBENCH_HOME={home}")
        results = Path(opts.results) if opts.results else Path(tmp) / "r"
        cold = phase("cold", args, env, results)
        warm = phase("warm (same command again)", args, env, results)
        rescore = phase("warm cache, new results folder", args, env, Path(tmp) / "r2")
    idle = all(v == 0 for p in (warm, rescore) for k, v in p["summary"]["built"].items() if k != "tasks")
    print(f"\nwarm re-runs trained, quantized and evaluated nothing: {'yes' if idle else 'NO'}")
    secs = cold["summary"]["stage_seconds"]
    if secs:
        top = max(secs, key=secs.get)
        print(f"cold: {cold['wall']:.0f} s; dominant stage: {top} ({secs[top] / sum(secs.values()):.0%} of stage time)")
    if not idle:
        sys.exit(1)


if __name__ == "__main__":
    main()
