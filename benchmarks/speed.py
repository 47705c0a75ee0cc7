"""Time `qubench prepare` and a warm `qubench run` on the default task (issue targets on a
2-core CPU: prepare <= 5 min, one warm run <= 3 min) and print the measured figures.

A "warm" run reuses the prepared target/retrain models and their cached evaluations, as
every run after the first does; it still unlearns, quantizes and evaluates the unlearned
model before and after quantization.

    python benchmarks/speed.py [--method ga_gdr] [--quant rtn-4bit]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="ga_gdr")
    ap.add_argument("--quant", default="rtn-4bit")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "QUBENCH_HOME": home}
        exe = [sys.executable, "-m", "qubench"]
        prepare = timed([*exe, "prepare"], env)
        first = timed([*exe, "run", "--method", args.method, "--quant", args.quant, "--results", f"{home}/r"], env)
        # Another learning rate: a new unlearned model at the same cost, but target/retrain and their
        # evaluations are cached (another seed would also train a new target: seeds vary it).
        warm = timed([*exe, "run", "--method", args.method, "--quant", args.quant, "--method-param", "lr=2e-5",
                      "--results", f"{home}/r"], env)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"cores: {os.cpu_count()}")
    print(f"qubench prepare (default task, cold): {prepare:7.1f} s   target <= 300 s")
    print(f"first run (evaluates target, retrain): {first:7.1f} s")
    print(f"warm run ({args.method}, {args.quant}):     {warm:7.1f} s   target <= 180 s")
    print(f"peak RSS of any stage process:        {peak_mib:7.0f} MiB")


if __name__ == "__main__":
    main()
