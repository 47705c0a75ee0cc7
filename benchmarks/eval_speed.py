"""Evaluation speed before and after issue #14, side by side in one process, on the five models of a run.

    python benchmarks/eval_speed.py [--method ga_gdr] [--quant rtn-4bit] [--threads 1] [--repeats 1]
    python benchmarks/eval_speed.py --sweep 16,32,64,128      # the current path at several batch sizes

The five models of a default-task run (target, quantized target, retrain, unlearned, quantized
unlearned; trained/unlearned/quantized first if QUBENCH_HOME lacks them) are each evaluated by

- before: the path qubench had before issue #14, reproduced here: `lm_eval.simple_evaluate` per
  model (which also collects the environment with `pip list`, `git describe` and other
  subprocesses for every model), batch size 16, PrivLeak log-probs from right-padded batches,
  ROUGE-L computed for every pair;
- after: the current `evaluate_model` at the current default batch size.

Each model is loaded once and evaluated by both paths back to back (the order alternates between
models, so a load change on a shared machine does not favour one side). Printed per model: wall
seconds, CPU seconds of this process plus its subprocesses (the better figure when other jobs share
the cores), and evaluation tokens/s (prompt + generated tokens of every lm-eval request plus the
PrivLeak documents' tokens, the same count on both sides). Every metric is checked to be identical
on both sides, and every generation; PrivLeak's per-document Min-40% scores are compared too (the
old right-padded batches moved them in the last bits; the PrivLeak AUC over their ranks is what is
reported, and it must be identical). Finally an estimate for the default grid's evaluation time, scaled from the measured
cold grid in the README.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from pathlib import Path

import torch

import qubench.evaluation.evaluate as evaluate_mod
import qubench.evaluation.metrics as metrics_mod
from qubench import registry
from qubench.engines.hf import HFEngine
from qubench.stages.run import RunStages
from qubench.specs import DEFAULT_BATCH_SIZE, PluginRef, RunSpec
from qubench.tasks import muse_layout

BEFORE_BATCH_SIZE = 16  # the default before issue #14
#: The measured cold `default` grid, 1 seed (README, "Grids"): wall seconds and evaluation's share
#: of stage time, and the evaluations it built.
GRID_COLD_SECONDS = 3144
GRID_EVAL_SHARE = 0.70
GRID_EVALS_PER_SEED = 123


def _legacy_run_generation(engine, model, tokenizer, data_root, tasks, limit):
    """qubench's `_run_generation` as it was before issue #14 (comments left out)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    E = evaluate_mod
    with E._tokenizer_path(tokenizer) as tok_path, E._quiet_lm_eval():
        manager = TaskManager(
            include_path=str(E.tasks_dir()), include_defaults=False,
            metadata={"data_root": str(data_root), "tokenizer": tok_path},
        )
        results = lm_eval.simple_evaluate(
            model=engine.lm(model, tokenizer), tasks=tasks, task_manager=manager, limit=limit,
            bootstrap_iters=0, log_samples=True, use_cache=None, cache_requests=False,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None,
        )
    metrics, samples = {}, {}
    for t in tasks:
        name = E.GENERATION_TASKS.get(t) or E.CLASSIFY_TASKS[t]
        key = E._ACC_METRIC if t in E.CLASSIFY_TASKS else E._LM_EVAL_METRIC
        metrics[name] = results["results"][t][key] * 100
        samples[name] = E._sample_log(t, results["samples"][t])
    return metrics, samples


@torch.inference_mode()
def _legacy_token_logprobs(self, model, tokenizer, texts, max_length):
    """HFEngine.token_logprobs as it was before issue #14 (right-padded batches; comments left out)."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    model.eval()
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[float]] = [[] for _ in texts]
    bs = self.config.batch_size
    for start in range(0, len(order), bs):
        batch = [i for i in order[start:start + bs] if len(encoded[i]) > 1]
        if not batch:
            continue
        width = len(encoded[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for row, i in enumerate(batch):
            n = len(encoded[i])
            logprobs = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)
            targets = ids[row, 1:n].to(logprobs.device).unsqueeze(-1)
            out[i] = logprobs.gather(-1, targets).squeeze(-1).tolist()
    return out


@contextlib.contextmanager
def legacy_path():
    """Swap in the pre-#14 generation path, PrivLeak log-probs and uncached ROUGE-L for the duration."""
    saved = evaluate_mod._run_generation, metrics_mod.rouge_l_f1, HFEngine.token_logprobs
    evaluate_mod._run_generation = _legacy_run_generation
    HFEngine.token_logprobs = _legacy_token_logprobs
    # The task utilities import rouge_l_f1 each time lm-eval loads them, so they see this one.
    metrics_mod.rouge_l_f1 = metrics_mod.rouge_l_f1.__wrapped__
    try:
        yield
    finally:
        evaluate_mod._run_generation, metrics_mod.rouge_l_f1, HFEngine.token_logprobs = saved


def _cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def timed_eval(engine, model, tok, data, data_dir, legacy: bool):
    if not legacy:
        metrics_mod.rouge_l_f1.cache_clear()  # each measurement starts cold: no credit for earlier runs
    ctx = legacy_path() if legacy else contextlib.nullcontext()
    with ctx:
        t0, c0 = time.perf_counter(), _cpu()
        report = evaluate_mod.evaluate_model(engine, model, tok, data, data_dir, auc_retrain=None)
        return report, time.perf_counter() - t0, _cpu() - c0


def eval_tokens(report, tok) -> int:
    """Tokens the model processed: every request's prompt and continuation, and the PrivLeak documents."""
    n = 0
    for key, rows in report.samples.items():
        if key.startswith("privleak"):
            n += sum(r["n_tokens"] for r in rows)
            continue
        for r in rows:
            n += len(tok(r["prompt"], add_special_tokens=True)["input_ids"])
            if "loglikelihoods" in r:  # classification: one scored continuation per choice
                n += sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in r["choices"])
            else:
                n += len(tok(r.get("raw_output", r["output"]), add_special_tokens=False)["input_ids"])
    return n


def compare(before, after) -> tuple[bool, str]:
    same_metrics = before.metrics == after.metrics
    gen_diffs = {k: sum(a != b for a, b in zip(rows, before.samples[k]))
                 for k, rows in after.samples.items() if not k.startswith("privleak")}
    gen_same = all(d == 0 for d in gen_diffs.values()) and before.samples.keys() == after.samples.keys()
    pl = [(a["score"], b["score"]) for k in ("privleak_forget", "privleak_holdout")
          for a, b in zip(after.samples[k], before.samples[k])]
    pl_diff = sum(a != b for a, b in pl)
    pl_max = max((abs(a - b) for a, b in pl), default=0.0)
    note = (f"metrics {'identical' if same_metrics else 'DIFFER'}, generations "
            f"{'identical' if gen_same else f'DIFFER {gen_diffs}'}, PrivLeak doc scores: "
            f"{pl_diff}/{len(pl)} differ, max |diff| {pl_max:.1e}")
    return same_metrics and gen_same, note


def five_models(method: str, quant: str):
    spec = RunSpec(method=PluginRef(name=method), quant=PluginRef(name=quant))
    stages = RunStages(spec, progress=False)  # the run's own stage objects (cached like `qubench run`)
    plugins = stages.plugins
    data_dir = stages.task_data().get()
    data = muse_layout.load(data_dir)
    models = stages.models(data).get_models()
    unlearned = stages.unlearned(models, data).get()
    q_target = stages.quantized(models.target_dir, data).get()
    q_unlearned = stages.quantized(unlearned, data).get()
    full = lambda d: _load_full(d)  # noqa: E731
    entries = [("target", models.target_dir, full), (f"target/{quant}", q_target, plugins.quant.load_quantized),
               ("retrain", models.retrain_dir, full), ("unlearned", unlearned, full),
               (f"unlearned/{quant}", q_unlearned, plugins.quant.load_quantized)]
    return data, data_dir, entries


def _load_full(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def sweep(sizes: list[int], data, data_dir, entry) -> None:
    from transformers import AutoTokenizer

    label, model_dir, loader = entry
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = loader(model_dir)
    print(f"\nbatch-size sweep, current path, {label} (CPU s of this process + subprocesses):")
    ref = None
    for bs in sizes:
        engine = registry.create("engines", "hf", {"batch_size": bs})
        report, wall, cpu = timed_eval(engine, model, tok, data, data_dir, legacy=False)
        same = "" if ref is None else ("  identical to the first" if compare(ref, report)[0] else "  OUTPUTS DIFFER")
        ref = ref or report
        print(f"  batch {bs:4d}: wall {wall:6.1f} s   CPU {cpu:6.1f} s{same}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ga_gdr")
    ap.add_argument("--quant", default="rtn-4bit")
    ap.add_argument("--threads", default="1", help="torch threads (OMP_NUM_THREADS); default 1")
    ap.add_argument("--repeats", type=int, default=1, help="measure each side this many times; the minimum counts")
    ap.add_argument("--after-batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--sweep", default=None, help="comma-separated batch sizes: time only the current path on the target")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the grid estimate")
    args = ap.parse_args()
    torch.set_num_threads(int(args.threads))
    print(f"torch threads: {torch.get_num_threads()}   cores: {os.cpu_count()}   "
          f"load average at start: {os.getloadavg()[0]:.1f}   QUBENCH_HOME={os.environ.get('QUBENCH_HOME', '(default)')}")
    data, data_dir, entries = five_models(args.method, args.quant)
    if args.sweep:
        sweep([int(s) for s in args.sweep.split(",")], data, data_dir, entries[0])
        return

    from transformers import AutoTokenizer

    before_engine = registry.create("engines", "hf", {"batch_size": BEFORE_BATCH_SIZE})
    after_engine = registry.create("engines", "hf", {"batch_size": args.after_batch_size})
    print(f"before: simple_evaluate, batch {BEFORE_BATCH_SIZE}, ROUGE-L uncached | "
          f"after: current evaluate_model, batch {args.after_batch_size}")
    rows, all_same = [], True
    for i, (label, model_dir, loader) in enumerate(entries):
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = loader(model_dir)
        best = {True: (float("inf"), float("inf"), None), False: (float("inf"), float("inf"), None)}
        for r in range(args.repeats):
            order = (True, False) if (i + r) % 2 == 0 else (False, True)
            for legacy in order:
                report, wall, cpu = timed_eval(before_engine if legacy else after_engine, model, tok, data,
                                               data_dir, legacy)
                w, c, _ = best[legacy]
                best[legacy] = (min(w, wall), min(c, cpu), report)
        same, note = compare(best[True][2], best[False][2])
        all_same &= same
        n_tok = eval_tokens(best[False][2], tok)
        rows.append((label, n_tok, best[True][:2], best[False][:2]))
        print(f"{label:>20}: {n_tok} tokens | before wall {best[True][0]:6.1f} s  CPU {best[True][1]:6.1f} s | "
              f"after wall {best[False][0]:6.1f} s  CPU {best[False][1]:6.1f} s | {note}", flush=True)
        del model

    print(f"\n{'model':>20} {'tokens':>7} | {'s/model before':>14} {'after':>6} | "
          f"{'tok/s before':>12} {'after':>6} | speed-up (CPU)")
    tot = {"tok": 0, "bc": 0.0, "ac": 0.0, "bw": 0.0, "aw": 0.0}
    for label, n_tok, (bw, bc), (aw, ac) in rows:
        print(f"{label:>20} {n_tok:7d} | {bc:14.1f} {ac:6.1f} | {n_tok / bc:12.0f} {n_tok / ac:6.0f} | {bc / ac:5.2f}x")
        tot["tok"] += n_tok
        tot["bc"] += bc
        tot["ac"] += ac
        tot["bw"] += bw
        tot["aw"] += aw
    print(f"{'all five':>20} {tot['tok']:7d} | {tot['bc']:14.1f} {tot['ac']:6.1f} | {tot['tok'] / tot['bc']:12.0f} "
          f"{tot['tok'] / tot['ac']:6.0f} | {tot['bc'] / tot['ac']:5.2f}x   (wall: {tot['bw']:.1f} s -> "
          f"{tot['aw']:.1f} s, {tot['bw'] / tot['aw']:.2f}x)")
    print(f"(s/model and tok/s on CPU seconds of this process + subprocesses, {torch.get_num_threads()} torch "
          f"thread(s); load average at end: {os.getloadavg()[0]:.1f})")
    print("every metric and every generation identical before and after: " + ("yes" if all_same else "NO"))

    ratio = tot["ac"] / tot["bc"]
    per_eval_before, per_eval_after = tot["bc"] / len(rows), tot["ac"] / len(rows)
    grid_before = args.seeds * GRID_COLD_SECONDS
    grid_after = args.seeds * GRID_COLD_SECONDS * ((1 - GRID_EVAL_SHARE) + GRID_EVAL_SHARE * ratio)
    print(f"\ngrid estimate ({args.seeds} seeds of the `default` preset, {GRID_EVALS_PER_SEED} evaluations per seed):")
    print(f"  evaluation CPU: {args.seeds * GRID_EVALS_PER_SEED * per_eval_before / 60:.0f} min before -> "
          f"{args.seeds * GRID_EVALS_PER_SEED * per_eval_after / 60:.0f} min after "
          f"(= {args.seeds * GRID_EVALS_PER_SEED * per_eval_after / 120:.0f} min wall on 2 workers with the cores to themselves)")
    print(f"  cold wall, scaled from the README's measured 1-seed grid ({GRID_COLD_SECONDS} s, evaluation "
          f"{GRID_EVAL_SHARE:.0%} of stage time): {grid_before / 60:.0f} min before -> {grid_after / 60:.0f} min after "
          f"(other stages unchanged)")


if __name__ == "__main__":
    main()
