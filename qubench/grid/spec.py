"""What a grid asks for: tasks x methods x quantizers x seeds, as a typed spec, and its presets.

A grid spec is YAML (or flags for the simple case):

    tasks: [{name: synth-news, params: {size: micro}}]
    methods: [ga_gdr, {name: npo_klr, params: {lr: 2e-5}}, {name: ga, label: ga-fast, params: {lr: 1e-4}}]
    quantizers: [rtn-4bit, gptq-4bit]
    seeds: [0, 1, 2]
    engine: hf

Every entry is a plugin name or {name, params, label}; the label (default: the name) names the
entry in results and aggregates, so one method may appear twice with different parameters.

Checkpoints unlearned elsewhere are audited beside (or instead of) methods, against the grid's
`model` (their target, required with audits) and `retrain_model`:

    audits: [{unlearned: /models/my-unlearned, name: mine}, {unlearned: owner/name@rev, allow_identical: true}]

Each is a method entry named `external:<name>` (default name: the folder's name or the hub ID).
An audit unlearns nothing, so it runs once per task and quantizer, at the grid's first seed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qubench import registry
from qubench.errors import ConfigError
from qubench.specs import (DEFAULT_BATCH_SIZE, EXTERNAL_PREFIX, AuditInput, EvalBatchSize, PluginRef, RunSpec,
                           external_name)

GRID_SCHEMA_VERSION = "1.0"


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @property
    def id(self) -> str:
        return self.label or self.name

    def ref(self) -> PluginRef:
        return PluginRef(name=self.name, params=self.params)


class AuditEntry(AuditInput):
    """A checkpoint unlearned elsewhere, audited like a method's output (see `qubench audit`)."""

    name: str | None = Field(None, min_length=1)  # its method is external:<name> (default: folder name / hub ID)

    @model_validator(mode="before")
    @classmethod
    def _from_ref(cls, value):
        return {"unlearned": value} if isinstance(value, str) else value

    @property
    def id(self) -> str:
        return EXTERNAL_PREFIX + (self.name or external_name(self.unlearned))

    def input(self) -> AuditInput:
        return AuditInput(**self.model_dump(exclude={"name"}))


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: str = GRID_SCHEMA_VERSION
    tasks: list[Entry] = Field(min_length=1)
    methods: list[Entry] = Field(default_factory=list)   # at least one method or audit
    quantizers: list[Entry] = Field(min_length=1)
    audits: list[AuditEntry] = Field(default_factory=list)
    seeds: list[int] = Field(default=[0], min_length=1)
    engine: Entry = Entry(name="hf")
    model: str | None = None           # an existing target for every task (default: each task's own)
    retrain_model: str | None = None
    batch_size: EvalBatchSize = DEFAULT_BATCH_SIZE
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    eval_limit: int | None = Field(None, ge=1)
    notes: list[str] = Field(default_factory=list)  # what a preset left out, and why

    @field_validator("tasks", "methods", "quantizers")
    @classmethod
    def _unique_labels(cls, entries: list[Entry]) -> list[Entry]:
        ids = [e.id for e in entries]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate entries {dupes}: give repeated plugins distinct `label`s")
        return entries

    @model_validator(mode="after")
    def _methods_or_audits(self) -> "GridSpec":
        if not self.methods and not self.audits:
            raise ValueError("give at least one method (methods:) or checkpoint to audit (audits:)")
        if self.audits and self.model is None:
            raise ValueError("audits need their target: set `model:` to the model the checkpoints were unlearned "
                             "from (and `retrain_model:` to its retrain reference, if there is one)")
        ids = [e.id for e in self.methods] + [a.id for a in self.audits]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate methods or audits {dupes}: give them distinct `label`s / `name`s")
        return self

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"duplicate seeds in {seeds}")
        return seeds

    def run_spec(self, task: Entry, method: Entry, quant: Entry, seed: int) -> RunSpec:
        return RunSpec(task=task.ref(), method=method.ref(), quant=quant.ref(), engine=self.engine.ref(),
                       model=self.model, retrain_model=self.retrain_model, seed=seed,
                       batch_size=self.batch_size, dtype=self.dtype, eval_limit=self.eval_limit)

    def audit_spec(self, task: Entry, audit: AuditEntry, quant: Entry) -> RunSpec:
        return RunSpec(task=task.ref(), method=PluginRef(name=audit.id), quant=quant.ref(), engine=self.engine.ref(),
                       model=self.model, retrain_model=self.retrain_model, seed=self.seeds[0],
                       batch_size=self.batch_size, dtype=self.dtype, eval_limit=self.eval_limit, audit=audit.input())

    def validate_plugins(self) -> None:
        """Instantiate every plugin once, so a typo fails the grid before any work starts; so do model
        options that cannot apply to a task (--retrain-model without --model on a task that trains its
        own pair) and model folders that cannot be loaded."""
        from qubench.stages.models import ExistingModels, models_stage

        for family, entries in (("tasks", self.tasks), ("methods", self.methods), ("quantizers", self.quantizers)):
            for entry in entries:
                plugin = registry.create(family, entry.name, entry.params)
                if family == "tasks":
                    planned = models_stage(plugin, None, self.model, self.retrain_model, self.seeds[0])
                    if isinstance(planned, ExistingModels):
                        planned.check()
        registry.create("engines", self.engine.name, {"batch_size": self.batch_size, **self.engine.params})


def load_spec(path: Path) -> GridSpec:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read grid spec {path}: {exc}") from None
    return parse_spec(raw, str(path))


def parse_spec(raw: Any, where: str = "grid spec") -> GridSpec:
    try:
        return GridSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"invalid {where}:"]
        for err in exc.errors():
            lines.append(f"  {'.'.join(str(p) for p in err['loc']) or '(spec)'}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _builtin(family: str) -> list[str]:
    with warnings.catch_warnings():  # a broken third-party plugin is not part of a built-in preset anyway
        warnings.simplefilter("ignore", registry.PluginImportWarning)
        return [info.name for info in registry.describe(family) if info.package == "qubench" and info.error is None]


def _usable_quantizers(names: list[str]) -> tuple[list[str], list[str]]:
    """Built-in quantizers whose optional dependencies are installed, and notes on the others."""
    usable, notes = [], []
    for name in names:
        try:
            registry.create("quantizers", name)
        except ConfigError as exc:
            notes.append(f"quantizer {name} left out: {str(exc).splitlines()[0]}")
        else:
            usable.append(name)
    return usable, notes


#: The known-answer control every default grid carries: GA+GDR hidden inside rtn-4bit's rounding buckets
#: (qubench.methods.inbucket). Under rtn-4bit it must read 100% damage-controlled recovery; under the other
#: quantizers it measures which of them undo forgetting hidden that way.
CONTROL_METHODS = ["ga_gdr+inbucket"]


def default_preset() -> GridSpec:
    """Every built-in method (and the known-answer control) x every usable built-in quantizer on the offline
    default task, 3 seeds."""
    quantizers, notes = _usable_quantizers(_builtin("quantizers"))
    methods = [Entry(name=n) for n in [*_builtin("methods"), *CONTROL_METHODS]]
    return GridSpec(tasks=[Entry(name="synth-news")], methods=methods,
                    quantizers=[Entry(name=n) for n in quantizers], seeds=[0, 1, 2], notes=notes)


#: The seed paper's methods (Zhang et al., arXiv 2410.16454: GA/NPO with GDR/KLR regularisers and
#: their SURE), bracketed by the target and retrain references.
PAPER_METHODS = ["target", "retrain", "ga", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr", "sure"]
#: Its quantizers: bitsandbytes 4-bit (FP4 defaults) and 8-bit, GPTQ and AWQ 4-bit; `none` as the control.
PAPER_QUANTIZERS = ["none", "bnb-fp4", "bnb-int8", "gptq-4bit", "awq-4bit"]


def paper_preset() -> GridSpec:
    """The seed paper's MUSE NEWS/BOOKS settings: MUSE's 7B models and data from the hub (GPU machines)."""
    return GridSpec(tasks=[Entry(name="muse-news"), Entry(name="muse-books")],
                    methods=[Entry(name=n) for n in PAPER_METHODS],
                    quantizers=[Entry(name=n) for n in PAPER_QUANTIZERS], seeds=[0, 1, 2], dtype="bfloat16",
                    # The pre-#14 default: a 7B model's KV cache and PrivLeak logits grow with the rows
                    # (64 rows of 2,048-token documents are 8 GB of bf16 logits alone); 64 suits tiny models.
                    batch_size=16,
                    notes=["needs hub access and a GPU: 7B models; `--engine vllm` evaluates faster"])


PRESETS = {"default": default_preset, "paper": paper_preset}


def with_overrides(spec: GridSpec, **changes: Any) -> GridSpec:
    """`spec` with the non-None `changes` applied (and validated again)."""
    update = {k: v for k, v in changes.items() if v is not None}
    return parse_spec({**spec.model_dump(mode="json"), **update}) if update else spec


def merge_params(entries: list[Entry], params: dict[str, Any]) -> list[dict]:
    """Every entry with `params` added to its own (flags that apply to a whole axis)."""
    return [{**e.model_dump(mode="json"), "params": {**e.params, **params}} for e in entries]


def build_spec(spec_file: Path | None = None, preset: str | None = None, tasks: tuple[str, ...] = (),
               methods: tuple[str, ...] = (), quantizers: tuple[str, ...] = (), engine: str | None = None,
               task_params: dict | None = None, method_params: dict | None = None,
               quant_params: dict | None = None, engine_params: dict | None = None, seeds: int | None = None,
               **overrides: Any) -> GridSpec:
    """The grid from a YAML file, a preset or neither (flags alone), with the flags applied on top:
    --task/--method/--quant replace that axis, *-params are added to every entry of their axis,
    --seeds N means seeds 0..N-1, the rest (batch_size, dtype, eval_limit, model, ...) replace."""
    if spec_file is not None and preset is not None:
        raise ConfigError("give either --spec or --preset, not both")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    if spec_file is not None:
        base = load_spec(spec_file).model_dump(mode="json")
    elif preset is not None:
        base = PRESETS[preset]().model_dump(mode="json")
    else:
        base = {"tasks": ["synth-news"], "methods": ["ga_gdr"], "quantizers": ["rtn-4bit"]}
    for key, names in (("tasks", tasks), ("methods", methods), ("quantizers", quantizers)):
        if names:
            base[key] = list(names)
    if engine is not None:
        base["engine"] = engine
    spec = parse_spec(base)
    if seeds is not None:
        if seeds < 1:
            raise ConfigError("--seeds must be at least 1")
        overrides["seeds"] = list(range(seeds))
    for key, params, entries in (("tasks", task_params, spec.tasks), ("methods", method_params, spec.methods),
                                 ("quantizers", quant_params, spec.quantizers)):
        if params:
            overrides[key] = merge_params(entries, params)
    if engine_params:
        overrides["engine"] = {**spec.engine.model_dump(mode="json"),
                               "params": {**spec.engine.params, **engine_params}}
    return with_overrides(spec, **overrides)
