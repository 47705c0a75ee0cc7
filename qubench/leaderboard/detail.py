"""What a result's detail page shows besides the raw file: the command that reproduces it and the
mechanism diagnostics as a small table."""

from __future__ import annotations

import json
import shlex

from qubench.leaderboard.data import Run, Source
from qubench.results import RunResult


def _value(value) -> str:
    """A parameter value as `qubench run` parses it back (YAML scalars; JSON is valid YAML)."""
    return value if isinstance(value, str) else json.dumps(value)


def reproduce_command(result: RunResult, source: Source | None = None) -> str:
    """The shell commands that recompute this result with the same spec (hence the same run_id)."""
    spec = result.spec
    if spec.audit is not None:
        return _with_provenance(result, source, _audit_args(spec))
    args = ["qubench", "run", "--task", spec.task.name, "--method", spec.method.name, "--quant", spec.quant.name,
            "--engine", spec.engine.name]
    for flag, params in (("--task-param", spec.task.params), ("--method-param", spec.method.params),
                         ("--quant-param", spec.quant.params), ("--engine-param", spec.engine.params)):
        for key, value in params.items():
            args += [flag, f"{key}={_value(value)}"]
    if spec.model is not None:
        args += ["--model", spec.model]
    if spec.retrain_model is not None:
        args += ["--retrain-model", spec.retrain_model]
    args += ["--seed", str(spec.seed), "--batch-size", str(spec.batch_size), "--dtype", spec.dtype]
    if spec.eval_limit is not None:
        args += ["--limit", str(spec.eval_limit)]
    return _with_provenance(result, source, args)


def _audit_args(spec) -> list[str]:
    """`qubench audit` arguments that rebuild an audit's spec (and so its run_id)."""
    from qubench.specs import EXTERNAL_PREFIX

    args = ["qubench", "audit", "--task", spec.task.name, "--target", str(spec.model), "--unlearned",
            spec.audit.unlearned, "--name", spec.method.name.removeprefix(EXTERNAL_PREFIX), "--quant", spec.quant.name,
            "--engine", spec.engine.name]
    if spec.retrain_model is not None:
        args += ["--retrain", spec.retrain_model]
    for flag, params in (("--task-param", spec.task.params), ("--quant-param", spec.quant.params),
                         ("--engine-param", spec.engine.params)):
        for key, value in params.items():
            args += [flag, f"{key}={_value(value)}"]
    args += [flag for flag, on in (("--allow-identical", spec.audit.allow_identical),
                                   ("--allow-no-separation", spec.audit.allow_no_separation)) if on]
    args += ["--batch-size", str(spec.batch_size), "--dtype", spec.dtype]
    if spec.eval_limit is not None:
        args += ["--limit", str(spec.eval_limit)]
    return args


def _with_provenance(result: RunResult, source: Source | None, args: list[str]) -> str:
    lines = []
    libs = result.environment.get("libraries") or {}
    git = result.environment.get("git") or {}
    lines.append(f"# produced with qubench {libs.get('qubench', '?')} (git {git.get('commit') or 'unknown'}"
                 f"{', with local edits' if git.get('dirty') else ''})")
    if source is not None and source.kind == "submission" and source.package:
        lines.append(f"pip install {shlex.quote(f'{source.package}=={source.version}')}")
    lines.append(" ".join(shlex.quote(a) for a in args))
    return "\n".join(lines)


def diagnostics_rows(result: RunResult) -> list[dict]:
    d = result.diagnostics
    return [
        {"diagnostic": "mean |w_unlearned - w_target|", "value": d.mean_abs_delta},
        {"diagnostic": "max |w_unlearned - w_target|", "value": d.max_abs_delta},
        {"diagnostic": "mean quantization step", "value": d.mean_quant_step},
        {"diagnostic": "mean |delta w| / step", "value": d.delta_over_step},
        {"diagnostic": "share of quantized weights differing from the quantized target",
         "value": d.quantized_disagreement},
    ]


def metrics_rows(result: RunResult) -> list[dict]:
    return [{"metric": name, **row.model_dump()} for name, row in result.metrics.items()]


def title(run: Run) -> str:
    s = run.result.spec
    return f"{s.task.name} · {s.method.name} · {s.quant.name} · seed {s.seed} · {run.source}"
