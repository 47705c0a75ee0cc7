"""Engine parity: the same checkpoints evaluated with `--engine hf` and `--engine vllm`.

Greedy decoding on both sides, so the engines should agree up to arithmetic: the hf
engine runs full-precision checkpoints in float32 and compressed-tensors checkpoints
dequantized to float32, while vLLM runs in --vllm-dtype (bfloat16 by default) with
its own low-bit kernels. Prints each metric side by side with the absolute
difference, the share of identical generations, and wall time / throughput, and
checks the differences against the tolerances below (exit code 1 if one is exceeded).

    QUBENCH_HOME=/work/qbhome python benchmarks/engine_parity.py \\
        --vllm-python /work/vllm-venv/bin/python --checkpoint DIR [--checkpoint DIR ...] \\
        [--vllm-dtype float32] [--limit 20] [--out benchmarks/results/engine_parity.md]

Data: a MUSE-layout folder (--data), default the synth-news task data from the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qubench import registry
from qubench.engines.hf import HFEngine
from qubench.engines.vllm_server import VLLMServerEngine
from qubench.evaluation.evaluate import evaluate_model
from qubench.quiet import quiet_libraries
from qubench.tasks import muse_layout

METRICS = ("verbmem_f", "verbmem_holdout", "verbmem_r", "knowmem_f", "knowmem_r", "privleak_auc")
# Stated before measuring. ROUGE metrics are on MUSE's 0-100 scale, the AUC on 0-1. With the
# same float32 arithmetic the engines may differ only by summation order (a flipped greedy
# token now and then); in bfloat16, or through vLLM's int4 kernels, rounding flips more of
# them, and one flipped token changes the rest of that continuation.
TOLERANCE = {"float32": {"rouge": 1.0, "auc": 0.01}, "other": {"rouge": 5.0, "auc": 0.05}}
GENERATION = ("verbmem_f", "verbmem_holdout", "verbmem_r", "knowmem_f", "knowmem_r")


def loader_for(model_dir: Path):
    """How the hf engine loads this checkpoint: as the qubench quantizer that wrote it would."""
    quant = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        return registry.create("quantizers", "rtn-4bit").load_quantized  # generic compressed-tensors loader
    if method is None:
        return registry.create("quantizers", "none").load_quantized
    raise SystemExit(f"{model_dir}: quant_method {method!r} is not a compressed-tensors checkpoint")


class Timed:
    """Wraps an engine to time PrivLeak scoring apart from generation."""

    def __init__(self, engine):
        self.engine, self.logprob_s = engine, 0.0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def token_logprobs(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.engine.token_logprobs(*args, **kwargs)
        finally:
            self.logprob_s += time.perf_counter() - t0


def measure(engine, model_dir: Path, data, data_dir: Path, limit: int | None) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    timed = Timed(engine)
    t0 = time.perf_counter()
    with engine.session(model_dir, loader_for(model_dir)) as model:
        t1 = time.perf_counter()
        report = evaluate_model(timed, model, tok, data, data_dir, auc_retrain=None, limit=limit)
        t2 = time.perf_counter()
    gen_tokens = sum(len(tok(s.get("raw_output", s["output"]), add_special_tokens=False)["input_ids"])
                     for key in GENERATION for s in report.samples.get(key, []))
    scored = sum(s["n_tokens"] for key in ("privleak_forget", "privleak_holdout") for s in report.samples[key])
    gen_s = t2 - t1 - timed.logprob_s
    return {"report": report, "start_s": t1 - t0, "gen_s": gen_s, "logprob_s": timed.logprob_s,
            "gen_tok_s": gen_tokens / gen_s if gen_s > 0 else float("nan"),
            "score_tok_s": scored / timed.logprob_s if timed.logprob_s > 0 else float("nan"),
            "gen_tokens": gen_tokens, "scored_tokens": scored}


def compare(name: str, hf: dict, vl: dict, tol: dict) -> tuple[list[str], bool]:
    lines = [f"### {name}", "", "| metric | hf | vllm | abs diff | tolerance | identical generations |",
             "|---|---|---|---|---|---|"]
    ok = True
    for key in METRICS:
        a, b = hf["report"].metrics.get(key), vl["report"].metrics.get(key)
        if a is None or b is None:
            continue
        limit = tol["auc"] if key == "privleak_auc" else tol["rouge"]
        diff = abs(a - b)
        ok &= diff <= limit
        same = "—"
        if key in GENERATION:
            pairs = list(zip(hf["report"].samples[key], vl["report"].samples[key]))
            same = f"{sum(x['output'] == y['output'] for x, y in pairs)}/{len(pairs)}"
        lines.append(f"| {key} | {a:.3f} | {b:.3f} | {diff:.3f} | {limit:g} {'ok' if diff <= limit else 'EXCEEDED'} "
                     f"| {same} |")
    score_diffs = [abs(x["score"] - y["score"]) for k in ("privleak_forget", "privleak_holdout")
                   for x, y in zip(hf["report"].samples[k], vl["report"].samples[k])]
    lines += ["", f"Min-40% scores: max |diff| {max(score_diffs):.2e}, mean {sum(score_diffs) / len(score_diffs):.2e} "
              f"over {len(score_diffs)} documents.", "",
              "| engine | start/load s | generation s | gen tok/s | PrivLeak s | scored tok/s |", "|---|---|---|---|---|---|"]
    for label, m in (("hf", hf), ("vllm", vl)):
        lines.append(f"| {label} | {m['start_s']:.1f} | {m['gen_s']:.1f} | {m['gen_tok_s']:.0f} | {m['logprob_s']:.1f} "
                     f"| {m['score_tok_s']:.0f} |")
    return lines, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, action="append", required=True)
    ap.add_argument("--vllm-python", required=True)
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    ap.add_argument("--vllm-param", action="append", default=[], metavar="KEY=JSON",
                    help="More vllm engine params, e.g. extra_args='[\"--enforce-eager\"]'")
    ap.add_argument("--data", type=Path, default=None, help="MUSE-layout folder (default: synth-news from the cache)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dump", type=Path, default=None, help="Folder for each engine's per-probe samples (JSON)")
    args = ap.parse_args()
    quiet_libraries()
    import torch

    if args.data is None:
        from qubench.stages import TaskData

        args.data = TaskData(registry.create("tasks", "synth-news")).get()
    data = muse_layout.load(args.data)
    params = {"python": args.vllm_python, "dtype": args.vllm_dtype, "batch_size": args.batch_size}
    params.update({k: json.loads(v) for k, v in (p.split("=", 1) for p in args.vllm_param)})
    vllm = VLLMServerEngine.from_params(params)
    hf = HFEngine.from_params({"batch_size": args.batch_size})
    tol = TOLERANCE["float32" if args.vllm_dtype == "float32" else "other"]
    lines = ["## Engine parity: hf vs vllm", "",
             f"hf: {hf.version()}, float32, torch threads {torch.get_num_threads()}; vllm: {vllm.version()}, "
             f"dtype {args.vllm_dtype}, params {json.dumps({k: v for k, v in params.items() if k != 'python'})}; "
             f"data {args.data}; limit {args.limit}; batch size {args.batch_size}.", ""]
    all_ok = True
    for ckpt in args.checkpoint:
        ckpt = ckpt.resolve()
        print(f"{ckpt}: hf ...", file=sys.stderr, flush=True)
        hf_m = measure(hf, ckpt, data, args.data, args.limit)
        print(f"{ckpt}: vllm ...", file=sys.stderr, flush=True)
        vl_m = measure(vllm, ckpt, data, args.data, args.limit)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            for label, m in (("hf", hf_m), ("vllm", vl_m)):
                (args.dump / f"{ckpt.name}.{label}.json").write_text(json.dumps(m["report"].samples, indent=1))
        block, ok = compare(ckpt.name, hf_m, vl_m, tol)
        all_ok &= ok
        lines += block + [""]
        print("\n".join(block) + "\n", flush=True)
    lines.append(f"All within tolerance: {'yes' if all_ok else 'NO'}")
    print(lines[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
