"""Schema-valid result files with chosen numbers, for leaderboard tests that need no training."""

from __future__ import annotations

from pathlib import Path

from qubench import pipeline, results
from qubench.results import RunResult, catalogued_row
from qubench.specs import PluginRef, RunSpec

TASK = PluginRef(name="synth-news", params={"size": "micro"})
SCHEMES = {
    "rtn-4bit": {"family": "rtn", "library": "llmcompressor", "library_version": "0.14.0.1", "bits": 4, "group_size": 64},
    "bnb-int8": {"family": "bitsandbytes", "library": "bitsandbytes", "library_version": "0.50.0", "bits": 8,
                 "block_size": None},
}
ENVIRONMENT = {"python": "3.11", "libraries": {"qubench": "0.1.0", "torch": "2.13.0"},
               "git": {"commit": "0123456789abcdef", "dirty": False}}


def make_result(method: str, quant: str = "rtn-4bit", seed: int = 0, *, forget=(40.0, 10.0, 15.0),
                utility=(50.0, 48.0, 47.0, 46.0), method_params: dict | None = None,
                control: bool = False) -> RunResult:
    """forget = (target_pre, pre, post) of verbmem_f (target_post = target_pre + 1, retrain 5, retrain
    quantized 6); utility = (target_pre, target_post, pre, post) of knowmem_r."""
    t_pre, pre, post = forget
    u_tpre, u_tpost, u_pre, u_post = utility
    spec = RunSpec(task=TASK, method=PluginRef(name=method, params=method_params or {}),
                   quant=PluginRef(name=quant), seed=seed, eval_limit=2)
    metrics = {
        "verbmem_f": catalogued_row("verbmem_f", pre, post, t_pre, t_pre + 1.0, 5.0, retrain_post=6.0),
        "knowmem_f": catalogued_row("knowmem_f", pre / 2, post / 2, t_pre / 2, t_pre / 2, 3.0),
        "knowmem_r": catalogued_row("knowmem_r", u_pre, u_post, u_tpre, u_tpost, 45.0),
    }
    return RunResult(
        run_id=spec.run_id(), status="ok", spec=spec, metrics=metrics,
        resolved={"method": {"name": method, "params": {}, "control": control},
                  "quant": {"name": quant, "scheme": SCHEMES[quant]},
                  "engine": {"name": "hf", "version": "transformers 5.17.0"},
                  "models": {"target": {"fingerprint": "abc123"}}},
        diagnostics={"mean_abs_delta": 1e-4, "max_abs_delta": 1e-3, "mean_quant_step": 1e-2,
                     "delta_over_step": 1e-2, "quantized_disagreement": 0.05},
        environment=ENVIRONMENT,
    )


def write(result: RunResult, results_dir: Path) -> Path:
    path = pipeline.result_path(Path(results_dir) / "cells", result.spec)
    results.save(result, path)
    return path


def standard_tree(results_dir: Path) -> list[Path]:
    """Baselines, three methods (one of which destroys utility) on two quantizers, two seeds for ga."""
    paths = []
    for quant in ("rtn-4bit", "bnb-int8"):
        paths.append(write(make_result("target", quant, forget=(40.0, 40.0, 41.0), utility=(50, 48, 50, 48)), results_dir))
        paths.append(write(make_result("retrain", quant, forget=(40.0, 5.0, 6.0), utility=(50, 48, 49, 47)), results_dir))
        paths.append(write(make_result("npo", quant, forget=(40.0, 8.0, 12.0)), results_dir))
        for seed, post in ((0, 20.0), (1, 24.0)):
            paths.append(write(make_result("ga", quant, seed, forget=(40.0, 10.0, post)), results_dir))
        # forgets best but keeps almost no utility: never ranked above the others
        paths.append(write(make_result("ga_klr", quant, forget=(40.0, 1.0, 2.0), utility=(50, 48, 10, 9)), results_dir))
    return paths
