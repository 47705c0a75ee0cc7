"""Hold the memory plan (qubench/memplan) against measured peaks on this machine, and print the plan of
MUSE's 7B models under each strategy.

    python benchmarks/memory_plan_check.py [--sizes micro default] [--probe] [--threads 1]
    python benchmarks/memory_plan_check.py --muse-table

Measured: every stage runs alone in a fresh child process; the largest RSS a thread sees while it runs
(every 5 ms) minus its RSS just before the stage (after every library it uses is imported) is set
beside the plan's CPU peak for the same run (largest phase, device + host); "anon" counts only
anonymous memory (allocations), without the mapped checkpoint files the loaders read through. `--probe` adds a wider random Llama (~90M parameters) on the
default task's data, where the training state (16 bytes per parameter) dominates the process. Also
printed: the bytes autograd keeps for backward (saved-tensor hooks) against the plan's activation item.
Unlearning runs two optimizer steps of one micro-batch each (the second backward is the peak: AdamW
state allocated, gradients again). Uses $QUBENCH_HOME for
the task's models (trained once there if missing); each child writes its own artifacts to a temporary
folder, QUAIL's logit cache included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("ga_gdr", "npo_klr", "quail", "sure", "lora")
QUANTS = ("rtn-4bit", "gptq-4bit", "awq-4bit", "bnb-nf4")
MiB = 2**20


def _status() -> dict[str, int]:
    """VmRSS and RssAnon of this process in bytes (anonymous = allocations, without mapped files such as
    the safetensors checkpoint, which the kernel may drop and re-read)."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class Sampler:
    """The largest VmRSS and RssAnon seen while a stage runs (read every 5 ms by a thread)."""

    def __enter__(self):
        import threading

        self.peak, self.stop = _status(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.005):
            for key, value in _status().items():
                self.peak[key] = max(self.peak[key], value)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def child(job: dict) -> None:
    """Run one stage and print {"baseline", "peak"} in bytes."""
    import torch

    torch.set_num_threads(job["threads"])
    os.environ["QUBENCH_HOME"] = job["home"]
    import lm_eval  # noqa: F401  (every library a stage uses is imported before the baseline)
    import llmcompressor  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from qubench import registry
    from qubench.tasks import muse_layout

    data = muse_layout.load(Path(job["data_dir"]))
    out = Path(job["home"]) / "out"
    stage = job["stage"]
    if stage == "unlearn":
        from qubench.methods.base import UnlearnContext

        # two micro-batches of two optimizer steps: the second backward runs with the AdamW state allocated
        method = registry.create("methods", job["plugin"], {"max_steps": 2, "grad_accum": 1})
        run = lambda: method.unlearn(UnlearnContext(Path(job["model_dir"]), None, data, out, 0, progress=False))
    elif stage == "quantize":
        from qubench.stages.quantized import calibration_texts

        quant = registry.create("quantizers", job["plugin"])
        run = lambda: quant.quantize(Path(job["model_dir"]), out, calibration_texts(data))
    else:
        from qubench.specs import RunSpec
        from qubench.stages import Evaluation
        from qubench.stages.run import RunStages

        stages = RunStages(RunSpec(**job["spec"]), progress=False)
        evaluation = Evaluation(stages.eval_setup(data, Path(job["data_dir"])), Path(job["model_dir"]), "target",
                                stages.load_full)
        run = lambda: evaluation.build(Path(job["home"]) / "eval.json")
    before = _status()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with Sampler() as sampled:
        run()
    print(json.dumps({"baseline": before["VmRSS"], "peak": sampled.peak["VmRSS"], "anon_baseline": before["RssAnon"],
                      "anon_peak": sampled.peak["RssAnon"], "maxrss_before": maxrss_before,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(job: dict, mmap_threshold: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    if mmap_threshold:  # glibc then returns every freed block above it at once: RSS follows live bytes
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    with tempfile.TemporaryDirectory() as home:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps({**job, "home": home})],
                              capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{job['stage']} {job['plugin']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe_model(template: Path, out: Path) -> Path:
    """A random Llama of ~90M parameters with the default task's tokenizer (same data, wider model)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(template)
    config.update({"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(template).save_pretrained(out)
    return out


def saved_tensor_bytes(model_dir: Path, rows: int, seq: int) -> int:
    """Bytes autograd keeps for backward in one forward + log-softmax (parameters excluded)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (rows, seq))
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        torch.log_softmax(logits[:, :-1], dim=-1)
    return sum(seen.values())


def check(sizes: list[str], probe: bool, threads: int, methods=METHODS, quants=QUANTS, evaluate=True,
          mmap_threshold: int | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from qubench.memplan import Parallelism
    from qubench.memplan.build import plan_run
    from qubench.memplan.estimate import TrainSettings, _activations
    from qubench.memplan.plan import Hardware
    from qubench.specs import PluginRef, RunSpec
    from qubench.stages.run import RunStages
    from qubench.tasks import muse_layout

    cpu = Hardware(kind="cpu", device_bytes=2**40, host_bytes=2**40, source="CPU")
    allocator = f", MALLOC_MMAP_THRESHOLD_={mmap_threshold}" if mmap_threshold else ", glibc default allocator"
    table = Table(title=f"memory plan vs measured peak RSS growth (torch threads {threads}, {os.cpu_count()} cores"
                        f"{allocator})")
    for col in ("model", "params", "stage", "plugin", "baseline RSS", "RSS growth", "anon growth", "estimate",
                "est/RSS"):
        table.add_column(col, justify="left" if col in ("model", "stage", "plugin") else "right")
    saved = Table(title="activations: bytes autograd keeps for one forward (B=4, S=max_len) vs the plan's formula")
    for col in ("model", "measured", "estimate", "est/meas"):
        saved.add_column(col, justify="right" if col != "model" else "left")
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for size in sizes:
            task = PluginRef(name="synth-news", params={"size": size})
            stages = RunStages(RunSpec(task=task), progress=False)
            data_dir = stages.task_data().get()
            models = stages.models(muse_layout.load(data_dir)).get_models()
            runs.append((f"synth-news {size}", task, data_dir, models.target_dir, None))
        if probe:
            label, task, data_dir, target, _ = next(r for r in runs if r[0].endswith("default")) if "default" in sizes \
                else runs[0]
            runs.append(("probe ~90M", task, data_dir, probe_model(target, Path(tmp) / "probe"), True))
        for label, task, data_dir, target, is_probe in runs:
            data = muse_layout.load(data_dir)
            jobs = ([("unlearn", m) for m in methods] + [("quantize", q) for q in quants]
                    + ([("evaluate", "hf")] if evaluate else []))
            for stage, plugin in jobs:
                spec = RunSpec(task=task, model=str(target) if is_probe else None,
                               **({"method": PluginRef(name=plugin)} if stage == "unlearn" else {}),
                               **({"quant": PluginRef(name=plugin)} if stage == "quantize" else {}),
                               **({"eval_limit": 16} if is_probe else {}))
                plan = plan_run(spec, Parallelism(), cpu, data=data)
                st = next(s for s in plan.stages if s.stage == stage)
                phase = max(st.phases, key=lambda p: p.device + p.host)
                estimate = phase.device + phase.host
                got = measure({"stage": stage, "plugin": plugin, "model_dir": str(target), "data_dir": str(data_dir),
                               "threads": threads, "spec": json.loads(spec.model_dump_json())}, mmap_threshold)
                grown, anon = got["peak"] - got["baseline"], got["anon_peak"] - got["anon_baseline"]
                table.add_row(label, f"{plan.shape.params:,}", stage, plugin, f"{got['baseline'] / MiB:,.0f} MiB",
                              f"{grown / MiB:,.1f} MiB", f"{anon / MiB:,.1f} MiB",
                              f"{estimate / MiB:,.1f} MiB ({phase.name})", f"{estimate / grown:.2f}" if grown > 0 else "-")
            seq = plan.train.seq_len if plan.train else 256
            measured = saved_tensor_bytes(target, 4, seq)
            est, _ = _activations(plan.shape, TrainSettings(batch_size=4, seq_len=seq), graphs=1)
            est -= 2 * 4 * seq * plan.shape.vocab * 4  # transients, not saved tensors
            saved.add_row(label, f"{measured / MiB:,.1f} MiB", f"{est / MiB:,.1f} MiB", f"{est / measured:.3f}")
    console = Console(width=160)
    console.print(table)
    console.print(saved)


def muse_table() -> None:
    """The plan of MUSE's 7B models (Llama-2-7B) under each strategy, bf16 with float32 master weights."""
    from rich.console import Console
    from rich.table import Table

    from qubench.memplan.estimate import TrainSettings, unlearning
    from qubench.memplan.inference import EvalSettings, QuantSettings, evaluation, quantization
    from qubench.memplan.lengths import Lengths, measure
    from qubench.memplan.plan import UNCHECKED, Hardware, judge
    from qubench.memplan.shape import config_of, shape_of

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
        shape = shape_of(config_of(tmp))
    # the shared data folder beside the project (or beside the folder of git worktrees)
    muse = next((p / "shared" / "data" / "muse-news" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "data" / "muse-news").is_dir()), None)
    if muse is not None:
        from qubench.tasks import muse_layout

        lengths = measure(muse_layout.load(muse), None, 256, 128)
        where = f"MUSE-News files in {muse} ({lengths.source})"
    else:
        lengths, where = Lengths(source="bounds"), "bounds from the config (no MUSE data here)"
    forget = lengths.forget_tokens()
    # MUSE's optimiser step: 32 windows (4 per GPU x 8 GPUs); here batch_size x grad_accum = 32.
    setups = [
        ("1 x 141 GB (H200)", 141e9, dict(batch_size=4)),
        ("1 x 141 GB, gradient checkpointing", 141e9, dict(batch_size=4, gradient_checkpointing=True)),
        ("8 x 80 GB, FSDP", 80e9, dict(strategy="fsdp", processes=8, batch_size=8)),
        ("1 x 80 GB, FSDP + CPU offload", 80e9, dict(strategy="fsdp", cpu_offload=True, batch_size=4)),
        ("1 x 80 GB, LoRA r=32", 80e9, dict(batch_size=4, lora_rank=32, lora_targets=(
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))),
    ]
    methods = {"ga_gdr": dict(retain_term="gdr"), "npo_klr": dict(retain_term="klr", reference=True),
               "quail (top-k 64)": dict(retain_term="gdr", hinge=True, hinge_top_k=64, forget_tokens=forget)}
    table = Table(title="unlearning a Llama-2-7B target (MUSE), bf16 compute, float32 master weights and AdamW, "
                        "max_len 256: peak per device / host RAM of the node")
    table.add_column("setup")
    for name in methods:
        table.add_column(name, justify="right")
    for label, size, extra in setups:
        hw = Hardware(kind="simulated", devices=extra.get("processes", 1), device_bytes=int(size),
                      host_bytes=UNCHECKED, source=label)
        cells = []
        for settings in methods.values():
            plan = unlearning(shape, TrainSettings(precision="bf16", seq_len=256, **settings, **extra), True)
            verdict = judge(plan, hw)
            fits = ("fits, tight" if verdict.tight else "fits") if verdict.fits else "does not fit"
            cells.append(f"{plan.device_peak / 1e9:,.0f} GB / {plan.host_peak / 1e9:,.0f} GB, {fits}")
        table.add_row(label, *cells)
    console = Console(width=160)
    console.print(table)
    quant = quantization(shape, QuantSettings(name="gptq-4bit", family="gptq",
                                              calibration_tokens=lengths.calibration_tokens(128, 512) or 128 * 512), True)
    rtn = quantization(shape, QuantSettings(name="rtn-4bit", family="rtn"), True)
    console.print(f"quantization (one checkpoint; the model stays in host RAM, one block on the GPU): gptq-4bit "
                  f"{quant.device_peak / 1e9:,.1f} GB per device / {quant.host_peak / 1e9:,.1f} GB host; rtn-4bit "
                  f"{rtn.device_peak / 1e9:,.1f} GB / {rtn.host_peak / 1e9:,.1f} GB")
    for dtype, nbytes in (("bfloat16", 2), ("float32", 4)):
        for q in (QuantSettings(name="gptq-4bit", family="gptq"),
                  QuantSettings(name="bnb-nf4", family="bnb", eval_float32=False)):
            ev = evaluation(shape, EvalSettings(dtype_bytes=nbytes, batch_size=16, new_tokens=128,
                                                prompt_tokens=min(lengths.prompt_tokens or 3968, 3968),
                                                document_tokens=min(lengths.document_tokens or 4096, 4096)), q, True)
            console.print(f"evaluation (hf, batch 16, --dtype {dtype}, {q.name} loaded as its loader does): "
                          f"{ev.device_peak / 1e9:,.1f} GB per device", highlight=False)
    console.print(f"token counts: {where}; QUAIL's full-vocabulary cache would be "
                  f"{(forget or 0) * 32000 * 4 / 1e9:,.0f} GB on disk and twice that in RAM while built", highlight=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["micro", "default"])
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--quants", nargs="*", default=list(QUANTS))
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="glibc mmap threshold for the stage processes (e.g. 65536: freed memory goes back to the "
                         "OS, so RSS follows live bytes rather than the allocator's high-water mark)")
    ap.add_argument("--muse-table", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
    elif args.muse_table:
        muse_table()
    else:
        check(args.sizes, args.probe, args.threads, args.methods, args.quants, not args.no_eval,
              args.malloc_mmap_threshold)
