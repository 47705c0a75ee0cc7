"""GPU check: build a synth-news target at GPU size, unlearn, quantize and evaluate it on the device,
and print stage times, peak GPU memory and the results table. Offline, one command:

    timeout 480 python benchmarks/gpu_check.py --device cuda --out gpu_check.json 2>gpu_check.err   # one GPU
    python benchmarks/gpu_check.py --device cpu --size tiny                           # here, on the CPU

What it runs, cold (a fresh QUBENCH_HOME unless --home):
- synth-news `size=gpu` (a ~160M-parameter Llama trained here: see GPU_RECIPE in
  qubench/tasks/synth_news.py for the FLOPs budget) or `size=tiny` (the `micro` preset, for CPUs);
- ga_gdr and npo_klr x rtn-4bit, gptq-4bit, bnb-nf4, evaluated with the `hf` engine
  (`--batch-size auto`), stage by stage, each timed with its peak GPU memory;
- with vLLM importable (or $QUBENCH_VLLM_PYTHON set) on a GPU, one more cell (ga_gdr x rtn-4bit)
  with the `vllm` engine, when the time left allows its five server start-ups.
Every figure goes to --out (JSON, rewritten after every stage, so a run cut short by `timeout`
still leaves what it measured). Exit status: 0 every stage ok within --budget; 1 a stage failed or
the budget was exceeded; 2 the device is not there; 3 a library is missing. The libraries' progress
bars go to stderr (hence `2>gpu_check.err`); stage lines, tables and failures go to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

METHODS = ("ga_gdr", "npo_klr")
QUANTS = ("rtn-4bit", "gptq-4bit", "bnb-nf4")
REQUIRED = ("torch", "transformers", "accelerate", "llmcompressor", "bitsandbytes", "lm_eval")
SIZES = {
    # task size, method parameters, probes per set
    "gpu": ({"size": "gpu"}, {}, None),
    "tiny": ({"size": "micro"}, {"epochs": 2, "lr": 1e-3, "batch_size": 4, "grad_accum": 1}, 4),
}
SHOWN = ("verbmem_f", "knowmem_f", "privleak_auc", "verbmem_r")
VLLM_SECONDS = 5 * 60  # five server start-ups and evaluations, as budgeted for a ~160M model


class Check:
    """Stages run one by one: timed, peak memory taken, failures recorded; the figures written as they come."""

    def __init__(self, out: Path, budget: float, device):
        import torch

        self.out, self.budget, self.device, self.torch = out, budget, device, torch
        self.t0 = time.perf_counter()
        self.figures: dict = {"device": device.record(), "stages": [], "cells": [], "vllm": None, "ok": None}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, name: str, fn):
        cuda = self.device.is_cuda
        if cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        row = {"stage": name, "status": "ok"}
        try:
            value = fn()
        except Exception as exc:  # recorded, and the check goes on with what does not depend on it
            value = None
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        if cuda:
            self.torch.cuda.synchronize()
            row["peak_gpu_gib"] = round(self.torch.cuda.max_memory_allocated() / 2**30, 2)
        row["seconds"] = round(time.perf_counter() - t, 1)
        row["rss_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        self.figures["stages"].append(row)
        mem = f", peak GPU {row['peak_gpu_gib']:.2f} GiB" if cuda else ""
        print(f"  {row['status']:<6} {name:<44} {row['seconds']:7.1f} s{mem}"
              + (f"\n         {row['error']}" if row["status"] != "ok" else ""), flush=True)
        self.save()
        return value if row["status"] == "ok" else None

    def save(self) -> None:
        from qubench import store

        self.figures["total_seconds"] = round(self.elapsed(), 1)
        store.write_json_atomic(self.out, self.figures)


def specs(size: str, engine: str = "hf"):
    from qubench.specs import PluginRef, RunSpec

    task_params, method_params, limit = SIZES[size]
    return {(m, q): RunSpec(task=PluginRef(name="synth-news", params=task_params),
                            method=PluginRef(name=m, params=method_params), quant=PluginRef(name=q),
                            engine=PluginRef(name=engine), batch_size="auto", eval_limit=limit)
            for m in METHODS for q in QUANTS}


def build_stages(check: Check, cells: dict) -> None:
    """Every stage of every cell, in pipeline order, shared ones once (the stage cache makes a second ask free)."""
    from qubench.stages.run import RunStages
    from qubench.tasks import muse_layout

    first = RunStages(next(iter(cells.values())), device=check.device, progress=False)
    data_dir = check.stage("task data", first.task_data().get)
    if data_dir is None:
        return
    data = muse_layout.load(data_dir)
    models = check.stage("train target + retrain", lambda: first.models(data).get_models())
    if models is None:
        return
    unlearned = {}
    for method in METHODS:
        st = RunStages(cells[(method, QUANTS[0])], device=check.device, progress=False)
        unlearned[method] = check.stage(f"unlearn {method}", st.unlearned(models, data).get)
    for quant in QUANTS:
        st = RunStages(cells[(METHODS[0], quant)], device=check.device, progress=False)
        q_target = check.stage(f"quantize target {quant}", st.quantized(models.target_dir, data).get)
        for method in METHODS:
            if unlearned[method] is None:
                continue
            st = RunStages(cells[(method, quant)], device=check.device, progress=False)
            q_unlearned = check.stage(f"quantize {method} {quant}", st.quantized(unlearned[method], data).get)
            evaluations = st.evaluations(st.eval_setup(data, data_dir), models, unlearned[method], q_target,
                                         q_unlearned)
            for label, evaluation in evaluations.items():
                if not evaluation.exists():
                    whose = f" ({method})" if label in ("pre", "post") else ""
                    check.stage(f"evaluate {evaluation.what}{whose}", evaluation.get)


def score(check: Check, cells: dict, results_dir: Path, engine: str) -> None:
    from qubench import pipeline

    for (method, quant), spec in cells.items():
        result = check.stage(f"score {method} x {quant} ({engine})",
                             lambda spec=spec: pipeline.run(spec, results_dir, log=lambda m: None, progress=False,
                                                            device=check.device))
        row = {"method": method, "quant": quant, "engine": engine, "status": "ok" if result else "failed"}
        if result is not None:
            row["metrics"] = {name: result.metrics[name].model_dump() for name in SHOWN if name in result.metrics}
            row["ran"] = {"device": result.resolved.get("device"), "engine": result.resolved["engine"]["name"],
                          "training": (result.unlearning.get("extra") or {}).get("training")}
        check.figures["cells"].append(row)
    check.save()


def print_tables(check: Check) -> None:
    print("\nstage times" + (" and peak GPU memory" if check.device.is_cuda else "") + ":")
    for row in check.figures["stages"]:
        mem = f" {row['peak_gpu_gib']:8.2f} GiB" if "peak_gpu_gib" in row else ""
        print(f"  {row['stage']:<46} {row['seconds']:7.1f} s{mem}  {row['status']}")
    print("\nresults (target / unlearned pre -> post quantization, recovery):")
    print(f"  {'cell':<32} " + " ".join(f"{m:>30}" for m in SHOWN))
    for cell in check.figures["cells"]:
        name = f"{cell['method']} x {cell['quant']} ({cell['engine']})"
        if cell["status"] != "ok":
            print(f"  {name:<32} FAILED")
            continue
        parts = []
        for metric in SHOWN:
            m = cell["metrics"].get(metric)
            if m is None or None in (m["target_pre"], m["pre"], m["post"]):
                parts.append(f"{'-':>30}")
                continue
            rec = "n/a" if m["recovery"] is None else f"{m['recovery'] + 0.0:+.0%}"  # + 0.0: no "-0%"
            parts.append(f"{m['target_pre']:7.3g} / {m['pre']:6.3g}->{m['post']:6.3g} {rec:>5}".rjust(30))
        print(f"  {name:<32} " + " ".join(parts))


def vllm_phase(check: Check, size: str, results_dir: Path) -> None:
    """One cell with the `vllm` engine, if vLLM is there, on a GPU, with time left."""
    from qubench.engines.vllm_server import PYTHON_ENV

    if not check.device.is_cuda:
        check.figures["vllm"] = {"status": "skipped", "reason": "not a CUDA run"}
    elif not os.environ.get(PYTHON_ENV) and importlib.util.find_spec("vllm") is None:
        check.figures["vllm"] = {"status": "skipped", "reason": f"vLLM not importable and ${PYTHON_ENV} unset"}
    elif check.budget - check.elapsed() < VLLM_SECONDS:
        check.figures["vllm"] = {"status": "skipped", "reason": f"{check.budget - check.elapsed():.0f} s left of the "
                                 f"budget, {VLLM_SECONDS} s needed for five vLLM servers"}
    else:
        import gc

        from qubench.specs import PluginRef

        gc.collect()
        check.torch.cuda.empty_cache()  # vLLM sizes its KV cache from the memory free when it starts
        spec = specs(size)[("ga_gdr", "rtn-4bit")]
        spec = spec.model_copy(update={"engine": PluginRef(name="vllm", params={
            "gpu_memory_utilization": 0.5, "extra_args": ["--enforce-eager"], "startup_timeout": 240})})
        t = time.perf_counter()
        score(check, {("ga_gdr", "rtn-4bit"): spec}, results_dir, "vllm")
        ok = check.figures["cells"][-1]["status"] == "ok"
        check.figures["vllm"] = {"status": "ok" if ok else "failed", "seconds": round(time.perf_counter() - t, 1)}
    print(f"\nvLLM: {check.figures['vllm']}")
    check.save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="auto, cpu, cuda or cuda:N (default cuda)")
    ap.add_argument("--size", choices=sorted(SIZES), default="gpu")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON file of every figure")
    ap.add_argument("--home", type=Path, help="QUBENCH_HOME (default: a fresh temporary folder: a cold run)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds the whole check may take (default 450)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM cell")
    ap.add_argument("--keep-home", action="store_true", help="keep the temporary QUBENCH_HOME (models, checkpoints)")
    args = ap.parse_args()

    missing = [lib for lib in REQUIRED if importlib.util.find_spec(lib) is None]
    if missing:
        print(f"missing libraries: {', '.join(missing)} (pip install -e '.[bnb]' with a CUDA torch)", file=sys.stderr)
        return 3
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"  # nothing here needs a network, and nothing may wait for one
    os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' per-call progress bars; this prints its own lines
    home = args.home or Path(tempfile.mkdtemp(prefix="qubench-gpu-check-"))
    os.environ["QUBENCH_HOME"] = str(home)
    try:
        return check_all(args, home)
    finally:
        if args.home is None and not args.keep_home:  # a re-run starts cold again, and the disk stays free
            shutil.rmtree(home, ignore_errors=True)


def check_all(args, home: Path) -> int:
    from qubench.device import resolve
    from qubench.env import environment
    from qubench.errors import QubenchError
    from qubench.quiet import quiet_libraries

    quiet_libraries()
    try:
        device = resolve(args.device)
    except QubenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    check = Check(args.out.resolve(), args.budget, device)
    check.figures.update(size=args.size, home=str(home), environment=environment())
    hw = check.figures["environment"]["hardware"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in hw["gpus"]) or "none"
    print(f"gpu_check: device {device.torch_device} ({args.device}), size {args.size}, GPUs: {gpus}, "
          f"CUDA {hw.get('cuda_runtime')}, driver {hw.get('driver')}; QUBENCH_HOME {home}", flush=True)

    results_dir = home / "results"
    cells = specs(args.size)
    build_stages(check, cells)
    score(check, cells, results_dir, "hf")
    if not args.no_vllm:
        vllm_phase(check, args.size, results_dir)
    print_tables(check)

    failed = [r["stage"] for r in check.figures["stages"] if r["status"] != "ok"]
    over = check.elapsed() > args.budget
    elsewhere = [c for c in check.figures["cells"] if c["status"] == "ok"
                 and (c["ran"]["device"] or {}).get("kind") != device.kind]
    # The unlearning loop records where it trained (qubench.methods.runtime, when it has one): on a GPU
    # check, a loop that trained on the CPU is a finding, though not a failure of this script.
    cpu_trained = [f"{c['method']}" for c in check.figures["cells"] if c["status"] == "ok" and device.is_cuda
                   and (c["ran"]["training"] or {}).get("device", "cuda") != "cuda"]
    check.figures["unlearning_not_on_gpu"] = sorted(set(cpu_trained))
    check.figures["ok"] = not failed and not over and not elsewhere
    check.save()
    print(f"\n{'OK' if check.figures['ok'] else 'FAILED'}: {check.elapsed():.0f} s of a {args.budget:.0f} s budget"
          + (f"; failed stages: {', '.join(failed)}" if failed else "")
          + ("; over budget" if over else "")
          + (f"; {len(elsewhere)} result(s) record another device" if elsewhere else "")
          + (f"; warning: unlearning trained off the GPU for {', '.join(sorted(set(cpu_trained)))}"
             if cpu_trained else "")
          + f"; figures in {args.out}", flush=True)
    return 0 if check.figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
