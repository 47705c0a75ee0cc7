"""Unlearning on several processes, on CPU with the gloo backend: data parallel (DDP) and sharded (FSDP2)
runs give the weights of the one-process run with the same global batch; the launcher, its errors, the
shipped accelerate configs, and `torchrun -m qubench run` (what `accelerate launch -m qubench` does).

Tolerance. Two processes sum the same gradient contributions in another order (DDP/FSDP all-reduce,
per-rank sums), so gradients agree to float32 rounding (~1e-7 relative). AdamW then divides each gradient
element by its own running magnitude: an element whose gradient is numerically zero (rounding noise
around 0) moves by about +-lr either way, so a handful of weights may differ by up to ~lr per step while
the rest agree to ~1e-7. We therefore bound the whole difference by the size of the update itself:
||w_2proc - w_1proc|| <= 1e-3 * ||w_1proc - w_target||. Measured with the settings below: 3e-7 to 4e-6
(DDP and FSDP alike); with other settings up to 1e-4, where one or two such elements flip. Each step's
logged loss must agree to 1e-5 relative or 1e-6 absolute (GA+GDR's loss is a difference of two float32
terms of about 6, whose rounding is ~5e-7). A wrong loss normalisation (each rank's own token mean,
averaged by DDP) misses by far more: with it, ga_gdr's relative difference is 0.66 here (the forget
windows are 2 to 12 tokens long, one per rank).

The tests that start processes are marked slow: each world costs two interpreter start-ups (~10 s of
imports each on a busy 2-core machine) before a few seconds of training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qubench import registry
from qubench.errors import ConfigError, DataError
from qubench.methods import launch
from qubench.methods.base import UnlearnContext
from qubench.methods.data import ShareOf, chunk_documents, collate, rank_share
from qubench.methods.hinge import hinge_loss
from qubench.methods.losses import kl_to_reference, logits_of, mean_nll, npo_loss
from qubench.methods.runtime import Parallelism, resolve_precision
from qubench.tasks.muse_layout import TaskData

from toy_corpus import FORGET, RETAIN

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
REL_TOL = 1e-3   # ||w_N - w_1|| / ||w_1 - w_target|| (see the module docstring)
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
# max_len 12 cuts the toy forget set into 7 windows of 2 to 12 tokens: micro-batches of 2, 2, 2 and 1 rows,
# so each rank holds one window of very different length, and the last micro-batch leaves rank 1 without rows.
PARAMS = {"lr": 1e-3, "batch_size": 2, "grad_accum": 2, "max_len": 12, "max_steps": 3}
JOBS = {
    "ga_gdr": {},
    "npo_klr": {},
    "quail": {},
    "sure": {},
    "sure-rows": {"sure_granularity": "row", "weight_decay": 0.1},
    # Dropout draws masks per process, which no process count can reproduce: the comparison runs without it.
    "lora": {"lora_dropout": 0.0, "lora_r": 4},
}
CHILD_ENV = {"OMP_NUM_THREADS": "1"}  # tiny matmuls on a loaded 2-core machine: one thread per rank


@pytest.fixture(scope="module", autouse=True)
def child_env():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CHILD_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One QUBENCH_HOME (the hinge's logit cache) for every run here, seen by the launched ranks too."""
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUBENCH_HOME", str(path))
        yield path


def data(root: Path) -> TaskData:
    return TaskData(root, list(FORGET), list(RETAIN), [], [], [], [], [], [], [], [], [])


def job(name: str, target: Path, out: Path):
    method = registry.create("methods", name.split("-")[0], {**PARAMS, **JOBS[name]})
    return method, UnlearnContext(target, None, data(out.parent), out, seed=0, progress=False)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def relative_difference(a: Path, b: Path, target: Path) -> float:
    wa, wb, w0 = weights(a), weights(b), weights(target)
    diff = sum(float(((wa[k] - wb[k]) ** 2).sum()) for k in wa) ** 0.5
    update = sum(float(((wa[k] - w0[k]) ** 2).sum()) for k in wa) ** 0.5
    assert update > 0
    return diff / update


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory, home):
    root = tmp_path_factory.mktemp("one")
    outcomes = {name: launch.unlearn(*job(name, tiny_model_dir, root / name)) for name in JOBS}
    return root, outcomes


# --- the normalisation, without processes --------------------------------------------------------------


def test_rank_shares_reassemble_the_micro_batch_and_its_gradient(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    windows = chunk_documents(FORGET, tokenizer, 12)
    batch = collate([windows[3], windows[0], windows[1]], tokenizer.pad_token_id)  # 2, 12 and 7 tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():  # model != reference; seeded, and large enough that tokens' NLLs differ (see below)
        noise = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
        model.lm_head.weight.add_(0.5 * noise)
    with torch.no_grad():
        target_logits = logits_of(reference, batch)

    def hinge(m, b, rows):
        share = b.share_of
        count = share.positions * target_logits.shape[-1] if share is not None else None
        return hinge_loss(logits_of(m, b), target_logits[rows], None, b.attention_mask, 1.0, count)[0]

    losses = {
        "nll": lambda m, b, rows: mean_nll(m, b),
        "kl": lambda m, b, rows: kl_to_reference(m, reference, b),
        "npo": lambda m, b, rows: npo_loss(m, reference, b, beta=0.1),
        "hinge": hinge,
    }
    for ranks in (2, 4):  # 4 ranks, 3 rows: rank 3 gets a stand-in row of weight 0
        parts = [rank_share(batch, r, ranks) for r in range(ranks)]
        assert [w for _, w in parts] == [1.0] * min(3, ranks) + [0.0] * max(0, ranks - 3)
        assert parts[0][0].share_of == ShareOf(sequences=3 / ranks, label_tokens=18 / ranks, positions=21 / ranks)
        rows = torch.tensor_split(torch.arange(3), ranks)
        for name, loss in losses.items():
            model.zero_grad()
            whole = loss(model, batch, slice(None))
            whole.backward()
            expected = model.lm_head.weight.grad.clone()
            model.zero_grad()
            total = 0.0
            for r, (part, weight) in enumerate(parts):
                value = loss(model, part, rows[r] if weight else slice(0, 1)) * weight
                (value / ranks).backward()  # what DDP's gradient average does
                total += float(value.detach()) / ranks
            assert total == pytest.approx(float(whole.detach()), rel=1e-5), name
            torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-4, atol=1e-7, msg=name)

    # Without the whole-batch counts (each rank its own mean, DDP's average of them) the mean is wrong:
    # 2 ranks, rows split [2 and 12 tokens] + [7 tokens]: the per-rank token means weigh tokens unequally.
    with torch.no_grad():
        naive = [mean_nll(model, collate([windows[3], windows[0]], tokenizer.pad_token_id)),
                 mean_nll(model, collate([windows[1]], tokenizer.pad_token_id))]
        assert abs(float(sum(naive)) / 2 - float(mean_nll(model, batch))) > 1e-3


def test_one_rank_trains_on_the_batch_itself():
    batch = collate([[1, 5, 6], [1, 7]], pad_id=0)
    assert rank_share(batch, 0, 1) == (batch, 1.0)


def test_precision_auto_resolves_per_device_and_keys_the_unlearned_model(tiny_model_dir, tmp_path):
    from qubench.stages import PreparedModels, Unlearned

    models = PreparedModels(tiny_model_dir, None, str(tiny_model_dir), None, None)
    task_data = data(tmp_path)

    def unlearned_path(method, seed, target, parallelism):
        assert target == tiny_model_dir
        return Unlearned(method, seed, models, task_data, parallelism=parallelism).path()

    assert [resolve_precision(p, d) for p, d in [("auto", "cuda"), ("auto", "cpu"), ("fp32", "cuda"),
                                                 ("bf16", "cpu")]] == ["bf16", "fp32", "fp32", "bf16"]
    method = lambda **kw: registry.create("methods", "ga_gdr", kw)  # noqa: E731
    assert method().params()["precision"] == "auto" and method().params()["gradient_checkpointing"] is False
    cpu = Parallelism(device="cpu")
    # On CPU, auto *is* fp32: one cached model; bf16 is another.
    assert unlearned_path(method(), 0, tiny_model_dir, cpu) == unlearned_path(method(precision="fp32"), 0,
                                                                              tiny_model_dir, cpu)
    assert unlearned_path(method(), 0, tiny_model_dir, cpu) != unlearned_path(method(precision="bf16"), 0,
                                                                              tiny_model_dir, cpu)
    # How many processes is not part of the key.
    assert unlearned_path(method(), 0, tiny_model_dir, Parallelism(device="cpu", processes=2)) == unlearned_path(
        method(), 0, tiny_model_dir, cpu)


def test_gradient_checkpointing_changes_nothing_and_bf16_trains_with_float32_master_weights(tiny_model_dir, tmp_path,
                                                                                          home):
    runs = {"fp32": {}, "checkpointing": {"gradient_checkpointing": True}, "bf16": {"precision": "bf16"}}
    for name, extra in runs.items():
        method = registry.create("methods", "ga_gdr", {**PARAMS, **extra})
        record = method.unlearn(UnlearnContext(tiny_model_dir, None, data(tmp_path), tmp_path / name, seed=0,
                                               progress=False)).extra["training"]
        assert record["precision"] == ("bf16" if name == "bf16" else "fp32")
        assert record["gradient_checkpointing"] is (name == "checkpointing")
    # Recomputing activations in backward gives the same arithmetic on CPU.
    assert relative_difference(tmp_path / "checkpointing", tmp_path / "fp32", tiny_model_dir) == 0.0
    # bf16 compute: another result (hence part of the key), same direction, saved in the target's float32.
    assert 1e-4 < relative_difference(tmp_path / "bf16", tmp_path / "fp32", tiny_model_dir) < 0.2
    assert {t.dtype for t in weights(tmp_path / "bf16").values()} == {torch.float32}


def test_bad_parallel_settings_are_refused_before_any_work(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from qubench.cli import main

    with pytest.raises(ValueError, match="cpu_offload needs a sharded strategy"):
        Parallelism(cpu_offload=True)
    res = CliRunner().invoke(main, ["run", "--cpu-offload"])
    assert res.exit_code == 2 and "--strategy fsdp or --strategy deepspeed" in res.output
    res = CliRunner().invoke(main, ["run", "--num-processes", "0"])
    assert res.exit_code == 2 and "--num-processes" in res.output
    # FSDP's CPU offload pins memory for transfers to a GPU; without one it has nothing to offload from.
    with pytest.raises(ConfigError, match="no GPU is in use here"):
        launch.unlearn(*job("ga_gdr", tiny_model_dir, tmp_path / "out"),
                       Parallelism(processes=2, strategy="fsdp", cpu_offload=True, device="cpu"))


# --- the shipped accelerate configs ------------------------------------------------------------------


def _accelerate_launch_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives its processes (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "qubench", "run"])
    args = _validate_launch_command(args)[0]
    return prepare_multi_gpu_env(args)


def test_shipped_accelerate_configs_parse_and_match_the_launcher():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    expected = {  # file: (distributed type, processes, machines)
        "1gpu.yaml": (DistributedType.NO, 1, 1),
        "1gpu-fsdp-offload.yaml": (DistributedType.FSDP, 1, 1),
        "8gpu-fsdp.yaml": (DistributedType.FSDP, 8, 1),
        "2nodes-fsdp.yaml": (DistributedType.FSDP, 16, 2),
        "8gpu-deepspeed-zero3.yaml": (DistributedType.DEEPSPEED, 8, 1),
    }
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, (kind, processes, machines) in expected.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert isinstance(config, ClusterConfig)
        assert (config.distributed_type, config.num_processes, config.num_machines) == (kind, processes, machines)
        assert config.mixed_precision == "no"  # precision is the method's parameter, handed to Accelerate by qubench
        if kind == DistributedType.FSDP:
            assert config.fsdp_config["fsdp_version"] == 2
            # `qubench run --strategy fsdp [--cpu-offload]` sets what `accelerate launch` sets for this file.
            offload = config.fsdp_config["fsdp_offload_params"]
            ours = launch.accelerate_env(Parallelism(strategy="fsdp", cpu_offload=offload), CONFIGS)
            theirs = _accelerate_launch_env(CONFIGS / name)
            assert {k: theirs.get(k) for k in ours if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))} == {
                k: v for k, v in ours.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}

    deepspeed = yaml.safe_load((CONFIGS / "8gpu-deepspeed-zero3.yaml").read_text())["deepspeed_config"]
    assert json.loads((REPO / deepspeed["deepspeed_config_file"]).read_text()) == launch.DEEPSPEED_ZERO3
    assert launch.DEEPSPEED_ZERO3["zero_optimization"]["stage"] == 3


def test_deepspeed_offload_writes_its_json(tmp_path):
    env = launch.accelerate_env(Parallelism(strategy="deepspeed", cpu_offload=True), tmp_path)
    written = json.loads(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_USE_FSDP"] == "false"
    assert written["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert written["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_deepspeed_strategy_without_deepspeed_says_how_to_get_it(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        launch.unlearn(*job("ga_gdr", tiny_model_dir, tmp_path / "out"), Parallelism(processes=2, strategy="deepspeed"))


@pytest.mark.skip(reason="DeepSpeed is not installed here and ZeRO-3 training needs CUDA: its wrapping and "
                         "training are untested; its config and the launcher's environment are checked above")
def test_deepspeed_zero3_gives_the_one_process_weights():
    pass


# --- two processes, gloo ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_one_process_weights(strategy, one_process, tiny_model_dir, tmp_path):
    root, single = one_process
    jobs = [job(name, tiny_model_dir, tmp_path / name) for name in JOBS]
    outcomes = dict(zip(JOBS, launch.run_jobs(jobs, Parallelism(processes=2, strategy=strategy, device="cpu"))))
    for name, outcome in outcomes.items():
        assert relative_difference(tmp_path / name, root / name, tiny_model_dir) <= REL_TOL, name
        losses, expected = [e["loss"] for e in outcome.log], [e["loss"] for e in single[name].log]
        assert outcome.steps == single[name].steps == 3
        assert losses == pytest.approx(expected, rel=LOSS_RTOL, abs=LOSS_ATOL), name
        training = outcome.extra["training"]
        assert (training["processes"], training["strategy"], training["device"]) == (2, strategy, "cpu")
        if strategy == "fsdp":  # rank 0 stores about half of the model (one of two shards, plus padding)
            assert training["parameters_held"] < 0.6 * training["parameters"], name
        else:
            assert training["parameters_held"] == training["parameters"], name
    # The main process chose the salient weights and every rank trained the same ones.
    for name in ("sure", "sure-rows"):
        assert outcomes[name].extra["sure"] == single[name].extra["sure"]
    before, after = weights(tiny_model_dir), weights(tmp_path / "sure-rows")
    touched = outcomes["sure-rows"].extra["sure"]["modules_touched"]
    frozen = [k for k in before if k.removesuffix(".weight") not in touched]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)


def test_batch_size_must_split_evenly_across_processes(tiny_model_dir, tmp_path):
    _, ctx = job("ga_gdr", tiny_model_dir, tmp_path / "out")
    method = registry.create("methods", "ga_gdr", {**PARAMS, "batch_size": 3})
    with pytest.raises(ConfigError, match="batch_size=3 windows cannot be split evenly across 2 processes"):
        launch.unlearn(method, ctx, Parallelism(processes=2, device="cpu"))  # refused before any process starts
    assert not (tmp_path / "out").exists()


def test_a_failing_rank_comes_back_as_one_clear_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Both halves of the error path, in this process: a rank (here rank 1 of 2) that fails writes a report and
    prints one line; the launcher raises the earliest report's error, as its own class when it is qubench's."""
    plan = Parallelism(processes=2, device="cpu")
    method, ctx = job("ga_gdr", tiny_model_dir, tmp_path / "out")
    no_retain = TaskData(tmp_path, list(FORGET), [], [], [], [], [], [], [], [], [], [])
    job_dir = launch.write_jobs([(method, dataclasses.replace(ctx, data=no_retain))], plan)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as status:
        launch.run_jobs_as_rank(job_dir, 1)
    assert status.value.code == 1
    printed = capsys.readouterr().err
    assert "rank 1: DataError: this method needs retain data" in printed and "Traceback" not in printed
    report = json.loads((job_dir / "errors" / "rank1.json").read_text())
    assert report["type"] == "DataError" and "Traceback" in report["traceback"]
    # A rank that lost its peer afterwards reports later; the first report is the cause.
    later = {**report, "rank": 0, "time": report["time"] + 1, "type": "RuntimeError", "module": "builtins",
             "message": "Connection closed by peer"}
    (job_dir / "errors" / "rank0.json").write_text(json.dumps(later))
    error = launch.launch_failure(job_dir, plan, status=1)
    assert type(error) is DataError
    assert str(error).startswith("rank 1 of 2: this method needs retain data") and "launch.log" in str(error)
    (job_dir / "errors" / "rank1.json").unlink()
    error = launch.launch_failure(job_dir, plan, status=1)
    assert type(error) is launch.LaunchError
    assert str(error).startswith("training failed on rank 0 of 2: RuntimeError: Connection closed by peer")
    shutil.rmtree(job_dir)  # a real failure keeps it for the user to read


@pytest.mark.slow
def test_accelerate_launch_of_qubench_run_trains_on_every_rank(tmp_path):
    """`accelerate launch --config_file configs/accelerate/8gpu-fsdp.yaml -m qubench run`, on 2 CPU processes
    (accelerate starts them through torch.distributed.run with its FSDP environment): rank 0 runs the
    pipeline, the other rank joins it for the unlearning; the result records how it trained."""
    home = tmp_path / "home"
    env = {**os.environ, **CHILD_ENV, "QUBENCH_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    params = {"epochs": 1, "lr": 1e-3, "batch_size": 4, "grad_accum": 1}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "8gpu-fsdp.yaml"),
               "--num_processes", "2", "-m", "qubench", "run", "--task-param", "size=micro", "--method", "ga_gdr",
               "--quant", "none", "--limit", "1", "--results", str(tmp_path / "results"), "--json",
               *sum((["--method-param", f"{k}={v}"] for k, v in params.items()), [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "ok"
    training = result["resolved"]["training"]
    assert (training["processes"], training["strategy"], training["device"]) == (2, "fsdp", "cpu")
    assert training["parameters_held"] < 0.6 * training["parameters"]
    # The same unlearning in this one process, from the models and data the run prepared.
    from qubench.tasks import muse_layout

    [unlearned], [models], [task] = ([p for p in (home / kind).iterdir() if not p.name.startswith(".")]
                                     for kind in ("unlearned", "models", "tasks"))
    method = registry.create("methods", "ga_gdr", params)
    ctx = UnlearnContext(models / "target", None, muse_layout.load(task), tmp_path / "one", seed=0, progress=False)
    method.unlearn(ctx)
    assert relative_difference(unlearned, tmp_path / "one", models / "target") <= REL_TOL
