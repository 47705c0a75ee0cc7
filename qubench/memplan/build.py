"""The memory plan of a `qubench run` spec: its plugins' configs, the model's config and, when the task
data is prepared, its token counts, turned into the plain settings `estimate` and `inference` take."""

from __future__ import annotations

from pathlib import Path

from qubench.memplan.estimate import TrainSettings, unlearning
from qubench.memplan.inference import EvalSettings, QuantSettings, evaluation, quantization
from qubench.memplan.lengths import Lengths, measure
from qubench.memplan.plan import PROCESS_COUNTS, Hardware, MemoryPlan, Move
from qubench.memplan.shape import ModelShape, config_of, shape_of
from qubench.methods.runtime import Parallelism

NO_DATA = ("bounds from the configs: the task data is not prepared here (max_len for training windows, the "
           "model's context for prompts and documents; `qubench prepare --task ...` makes them exact)")


def model_config(stages, data):
    """(config, local folder or None, what it is) of the run's target, without loading weights."""
    from qubench.stages.models import ExistingModels

    models = stages.models(data)
    if isinstance(models, ExistingModels):
        local = models.local(models.target_ref)
        return config_of(local or models.target_ref), local, models.target_ref
    if data is not None and models.exists():
        folder = models.prepared().target_dir
        return config_of(folder), folder, str(folder)
    from qubench.models.pretrain import recipe_config

    return recipe_config(models.recipe), None, f"{stages.plugins.task.name} recipe (not trained yet)"


def train_settings(method, config, parallel: Parallelism, lengths: Lengths, accelerator: bool) -> TrainSettings | None:
    """The unlearn stage's settings; None for methods that train nothing (target, retrain)."""
    from qubench.methods.data import default_max_len
    from qubench.methods.train_loop import LossBasedMethod

    if not isinstance(method, LossBasedMethod):
        return None
    c = method.config
    mods = {m.name for m in getattr(type(method), "modifiers", ())}
    max_len = c.max_len or default_max_len(config)
    # Training precision is a method parameter once the loop runs on Accelerate ("auto" = bf16 on CUDA);
    # until then the loop trains in float32 everywhere.
    precision = getattr(c, "precision", "fp32")
    if precision == "auto":
        precision = "bf16" if accelerator else "fp32"
    return TrainSettings(
        strategy=parallel.strategy, processes=parallel.processes, cpu_offload=parallel.cpu_offload,
        precision=precision, gradient_checkpointing=getattr(c, "gradient_checkpointing", False),
        batch_size=c.batch_size, seq_len=lengths.train_seq(max_len) or max_len, retain_term=method.retain_term,
        # as LossBasedMethod.unlearn decides it
        reference=method.forget_needs_reference or method.retain_term == "klr",
        hinge="hinge" in mods, hinge_top_k=getattr(c, "hinge_top_k", None), forget_tokens=lengths.forget_tokens(),
        lora_rank=c.lora_r if "lora" in mods else None,
        lora_targets=tuple(c.lora_target_modules) if "lora" in mods else (),
        sure_percentile=c.sure_percentile if "sure" in mods else None,
        sure_rows="sure" in mods and c.sure_granularity == "row",
    )


def quant_settings(quant, lengths: Lengths) -> QuantSettings:
    from qubench.quantizers.bnb import BnbQuantizer
    from qubench.quantizers.llmc import CalibratedConfig, CompressedTensorsQuantizer
    from qubench.quantizers.none import NoQuantization

    c = quant.config
    if isinstance(quant, CompressedTensorsQuantizer):
        family = quant.family
    elif isinstance(quant, BnbQuantizer):
        family = "bnb"
    elif isinstance(quant, NoQuantization):
        family = "none"
    elif type(quant).__module__.endswith("gptqmodel"):
        family = "gptqmodel"
    else:
        family = "other"
    tokens = 0
    samples, max_seq = getattr(c, "num_calibration_samples", None), getattr(c, "max_seq_length", None)
    if isinstance(c, CalibratedConfig) or (samples and max_seq):
        tokens = lengths.calibration_tokens(samples, max_seq) or samples * max_seq
    bits = getattr(quant, "bits", None) or getattr(c, "bits", 4)
    return QuantSettings(name=quant.name, family=family, bits=bits, group_size=getattr(c, "group_size", 128),
                         calibration_tokens=tokens, eval_float32=family != "bnb")


def eval_settings(spec, shape: ModelShape, lengths: Lengths, accelerator: bool) -> EvalSettings:
    from qubench.engines.batch_fit import CPU_BATCH
    from qubench.evaluation.metrics import VERBMEM_MAX_NEW_TOKENS

    batch = spec.engine_params()["batch_size"]
    if batch == "auto":
        # --batch-size auto takes the largest batch the free memory holds (engines.batch_fit), down to one
        # row: that is the least it needs on an accelerator; on a CPU it means CPU_BATCH.
        batch = 1 if accelerator else CPU_BATCH
    new = VERBMEM_MAX_NEW_TOKENS
    # lm-eval's HFLM keeps the last (context - max_gen_toks) tokens of a prompt; PrivLeak cuts documents
    # at the context (engines.base.Engine.max_length)
    prompt = min(lengths.prompt_tokens or shape.context, max(shape.context - new, 1))
    return EvalSettings(engine=spec.engine.name, dtype_bytes=2 if spec.dtype in ("bfloat16", "float16") else 4,
                        batch_size=batch, prompt_tokens=prompt, new_tokens=new,
                        document_tokens=min(lengths.document_tokens or shape.context, shape.context))


def unlearn_moves(method, shape: ModelShape) -> list[Move]:
    """The changes the refusal message may suggest, spelled as the user passes them."""
    from qubench.methods.lora import LLAMA_LINEARS

    fields = type(method).Config.model_fields
    grad_accum = getattr(method.config, "grad_accum", 1)
    composition = type(method).composition() if hasattr(type(method), "composition") else None
    parts = [composition["base"], *composition["modifiers"]] if composition else [method.name]
    leaves = {lin.leaf for lin in shape.linears}

    def batch(s: TrainSettings, rows: int) -> tuple[str, TrainSettings] | None:
        """Micro-batch `rows` with the same windows per optimizer step (batch_size x grad_accum)."""
        if (s.batch_size * grad_accum) % rows:
            return None
        text = f"--method-param batch_size={rows} --method-param grad_accum={s.batch_size * grad_accum // rows}"
        return text, s.model_copy(update={"batch_size": rows})

    def halvings(s):
        found = [batch(s, r) for r in sorted({s.batch_size // 2**k for k in range(1, 8)} - {0}, reverse=True)]
        return [v for v in found if v]

    def checkpointing(s):
        if "gradient_checkpointing" not in fields or s.gradient_checkpointing:
            return []
        return [("--method-param gradient_checkpointing=true", s.model_copy(update={"gradient_checkpointing": True}))]

    def lora(s):
        targets = tuple(t for t in LLAMA_LINEARS if t in leaves)
        if s.lora_rank or s.sure_percentile is not None or not targets:
            return []
        name = "+".join([parts[0], "lora", *parts[1:]])
        return [(f"--method {name}", s.model_copy(update={"lora_rank": 32, "lora_targets": targets}))]

    def sharded(s, n):
        strategy = s.strategy if s.sharded else "fsdp"
        changed = s.model_copy(update={"strategy": strategy, "processes": n})
        text = f"--strategy {strategy} --num-processes {n}"
        if changed.batch_size % n:  # every process takes an equal share of each micro-batch
            fixed = batch(changed, n)
            if fixed is None:
                return None
            text, changed = f"{text} {fixed[0]}", fixed[1].model_copy(update={"processes": n})
        return text, changed

    def offload(s):
        if s.cpu_offload:
            return []
        strategy = s.strategy if s.sharded else "fsdp"
        changed = s.model_copy(update={"strategy": strategy, "cpu_offload": True})
        return [(f"--strategy {strategy} --cpu-offload", changed)]

    def processes(s):
        return [v for n in PROCESS_COUNTS if n > s.processes for v in [sharded(s, n)] if v]

    return [Move("more processes with FSDP", processes), Move("CPU offload", offload), Move("LoRA", lora),
            Move("gradient checkpointing", checkpointing), Move("smaller micro-batch", halvings)]


def plan_run(spec, parallel: Parallelism, hardware: Hardware, stages=None, data=None) -> MemoryPlan:
    """The plan of `spec` on `hardware`. `stages`: the run's RunStages when the caller has them. `data`
    (muse_layout.TaskData): the task's data when the caller has it; else it is read when already prepared,
    and the plan falls back to config bounds otherwise."""
    from qubench.methods.data import default_max_len
    from qubench.stages.run import RunStages
    from qubench.tasks import muse_layout

    if stages is None:
        stages = RunStages(spec, progress=False)
    if data is None:
        task_data = stages.task_data()
        data = muse_layout.load(task_data.path()) if task_data.exists() else None
    config, local, ref = model_config(stages, data)
    shape = shape_of(config)
    method, quant = stages.plugins.method, stages.plugins.quant
    max_len = getattr(method.config, "max_len", None) or default_max_len(config)  # as the training loop cuts
    samples = getattr(quant.config, "num_calibration_samples", 0)
    lengths = (measure(data, Path(local) if local else None, max_len, samples) if data is not None
               else Lengths(source=NO_DATA))
    train = train_settings(method, config, parallel, lengths, hardware.accelerator)
    q = quant_settings(quant, lengths)
    e = eval_settings(spec, shape, lengths, hardware.accelerator)
    acc = hardware.accelerator
    plan_stages = ([unlearning(shape, train, acc)] if train else []) + [quantization(shape, q, acc),
                                                                         evaluation(shape, e, q, acc)]

    def eval_with(**change):
        return evaluation(shape, e.model_copy(update=change), q, acc)

    halves = sorted({e.batch_size // 2**k for k in range(1, 5)} - {0}, reverse=True)
    alternatives = {"evaluate": ([("--dtype bfloat16", eval_with(dtype_bytes=2))] if e.dtype_bytes == 4 else [])
                    + [(f"--batch-size {b}", eval_with(batch_size=b)) for b in halves]}
    if q.calibration_tokens:
        alternatives["quantize"] = [
            (f"--quant-param num_calibration_samples={n}", quantization(
                shape, q.model_copy(update={"calibration_tokens": q.calibration_tokens * n // samples}), acc))
            for n in sorted({samples // 2**k for k in range(1, 5)} - {0}, reverse=True)]
    return MemoryPlan(model=ref, shape=shape, hardware=hardware, lengths=lengths, stages=plan_stages, train=train,
                      moves=unlearn_moves(method, shape) if train else [], alternatives=alternatives)


def for_run(spec, parallel: Parallelism, max_memory: str | None = None, device: str = "auto") -> MemoryPlan:
    """The plan `qubench run --dry-run` prints: from configs and the task data if it is already prepared."""
    from qubench.memplan.plan import detect_hardware
    from qubench.stages.run import RunStages

    hardware = detect_hardware(max_memory, device)
    stages = RunStages(spec, progress=False)  # bad plugin names or parameters fail here
    stages.models(data=None)  # so does a model option that cannot apply to the task, before any data is built
    return plan_run(spec, parallel, hardware, stages)


def check_before_run(spec, stages, parallel: Parallelism, max_memory: str | None, device: str, log) -> None:
    """Stop a run that cannot fit before it loads any model (`pipeline.run`, after its other checks). The
    task data is prepared first (the run does so anyway) so token counts are exact. A plan that cannot be
    made (e.g. a hub model's config out of reach offline) does not block the run, unless --max-memory asked
    for one: the run reports its own errors."""
    from qubench.memplan.plan import detect_hardware
    from qubench.memplan.shape import ConfigUnavailable
    from qubench.tasks import muse_layout

    try:
        data = muse_layout.load(stages.task_data().get())
    except Exception:  # the run itself reports a task that cannot be prepared, with its own record
        data = None
    try:
        plan = plan_run(spec, parallel, detect_hardware(max_memory, device), stages, data)
    except ConfigUnavailable as exc:
        if max_memory is not None:
            raise
        log(f"memory plan skipped: {exc}")
        return
    plan.check()


__all__ = ["check_before_run", "for_run", "plan_run", "train_settings", "quant_settings", "eval_settings"]
