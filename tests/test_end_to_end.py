"""End-to-end runs of the whole pipeline on the micro configuration, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qubench import results
from qubench.cli import main

MICRO = ["--task-param", "size=micro", "--method-param", "epochs=2", "--method-param", "lr=1e-3",
         "--method-param", "batch_size=4", "--method-param", "grad_accum=1", "--limit", "4"]


def _run(home, results_dir, *extra, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(home))
    res = CliRunner().invoke(main, ["run", *MICRO, "--results", str(results_dir), "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("e2e")
    try:
        yield root, _run(root / "home", root / "results", "--method", "ga_gdr", monkeypatch=mp)
    finally:
        mp.undo()


def test_run_reports_pre_post_gap_recovery_and_validates(first_run):
    root, out = first_run
    result = results.RunResult.model_validate(out)  # the printed JSON is the typed schema
    assert result.status == "ok"
    for name in ("verbmem_f", "knowmem_f", "privleak", "knowmem_r"):
        row = result.metrics[name]
        assert row.pre is not None and row.post is not None and row.target_pre is not None
        assert row.gap == pytest.approx(row.post - row.pre)
        if row.recovery is not None:
            assert row.recovery == pytest.approx((row.post - row.pre) / (row.target_pre - row.pre))
        else:
            assert row.recovery_note
    # the retrain model is the PrivLeak reference, so its own PrivLeak is exactly 0
    assert result.metrics["privleak"].retrain == pytest.approx(0.0)
    assert result.resolved["privleak_reference"]["source"] == "retrain model evaluated"
    d = result.diagnostics
    assert d.mean_abs_delta > 0 and d.mean_quant_step > 0 and 0 <= d.quantized_disagreement <= 1
    assert result.resolved["quant"]["scheme"]["bits"] == 4
    assert result.resolved["method"]["params"]["lr"] == pytest.approx(1e-3)
    assert result.environment["libraries"]["torch"] and result.data_hashes
    assert result.environment["plugins"]["method"] == f"qubench {result.environment['libraries']['qubench']}"
    saved = list((root / "results").glob("*.json"))
    assert len(saved) == 1 and results.load(saved[0]) == result


def test_identical_spec_reuses_stored_result(first_run, monkeypatch):
    root, out = first_run
    again = _run(root / "home", root / "results", "--method", "ga_gdr", monkeypatch=monkeypatch)
    assert again == out  # same created timestamp: nothing was recomputed


def test_same_spec_from_a_clean_cache_gives_identical_metrics(first_run, tmp_path, monkeypatch):
    _, out = first_run
    fresh = _run(tmp_path / "home", tmp_path / "results", "--method", "ga_gdr", monkeypatch=monkeypatch)
    assert fresh["metrics"] == out["metrics"]
    assert fresh["diagnostics"] == out["diagnostics"]
    for model in ("target", "retrain", "unlearned"):  # bit-identical weights, trained from scratch twice
        assert fresh["resolved"]["models"][model]["fingerprint"] == out["resolved"]["models"][model]["fingerprint"]


def test_device_cpu_engine_auto_batch_auto_give_the_same_numbers_from_the_same_stages(first_run, monkeypatch):
    """On the CPU, --device cpu is what every run did before devices existed: the unlearned model and the
    checkpoints are found under the keys they had (nothing is unlearned or quantized again), `auto` picks
    the hf engine and a batch of 16, and every number is identical. The result records the device and
    the hardware."""
    root, out = first_run
    before = {kind: sorted(p.name for p in (root / "home" / kind).iterdir()) for kind in ("unlearned", "quantized")}
    again = _run(root / "home", root / "results-auto", "--method", "ga_gdr", "--device", "cpu", "--engine", "auto",
                 "--batch-size", "auto", monkeypatch=monkeypatch)
    assert {kind: sorted(p.name for p in (root / "home" / kind).iterdir()) for kind in before} == before
    assert again["metrics"] == out["metrics"] and again["diagnostics"] == out["diagnostics"]
    assert again["run_id"] != out["run_id"]  # engine auto and batch auto are what this spec asked for
    assert again["resolved"]["device"] == {"requested": "cpu", "kind": "cpu", "index": None, "count": 0,
                                           "torch_device": "cpu"}
    engine = again["resolved"]["engine"]
    assert engine["name"] == "hf" and engine["requested"] == "auto" and "on the cpu" in engine["reason"]
    assert again["environment"]["hardware"]["gpu_count"] == 0
    assert out["resolved"]["device"]["requested"] == "auto"  # the default


def test_npo_klr_shares_the_target_stages(first_run, monkeypatch):
    root, out = first_run
    npo = _run(root / "home", root / "results", "--method", "npo_klr", "--quant", "rtn-8bit", monkeypatch=monkeypatch)
    assert npo["status"] == "ok" and npo["spec"]["method"]["name"] == "npo_klr"
    assert npo["resolved"]["models"]["target"] == out["resolved"]["models"]["target"]
    assert npo["timings"]["prepare_models"] < 5  # the target was loaded from the cache, not retrained
    assert npo["metrics"]["knowmem_r"]["target_pre"] == out["metrics"]["knowmem_r"]["target_pre"]


def test_failed_stage_is_recorded_with_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(main, ["run", *MICRO, "--method-param", "lr=1e30", "--method", "ga",
                                    "--results", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "run failed in stage unlearn" in res.output
    (saved,) = (tmp_path / "r").glob("*.json")
    failed = results.load(saved)
    assert failed.status == "failed" and failed.error.stage == "unlearn"
    assert "TrainingError" in failed.error.type and "Traceback" in failed.error.traceback
    assert not list((tmp_path / "home" / "unlearned").glob("ga-*"))  # no half-written model left behind


def test_show_prints_a_stored_result(first_run):
    root, _ = first_run
    (saved,) = (root / "results").glob("*ga_gdr*.json")
    res = CliRunner().invoke(main, ["show", str(saved)])
    assert res.exit_code == 0 and "verbmem_f" in res.output and "recovery" in res.output


def test_show_rejects_a_malformed_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"run_id": "x"}')
    res = CliRunner().invoke(main, ["show", str(bad)])
    assert res.exit_code == 2 and "not a valid qubench result" in res.output


#: What other libraries print during a run unless qubench silences them (qubench.quiet).
THIRD_PARTY_NOISE = ("Applying quantization config", "Compressing model", "Dispatching model", "Decompressing model",
                     "Running generate_until requests", "Running loglikelihood requests", "it/s]", "\r",
                     "fatal: not a git repository")


def test_a_target_that_never_saw_the_forget_set_says_it_cannot_show_forgetting(first_run, tmp_path):
    """The retrain model (trained on retain only) as the target: it does not remember the forget set more
    than the retrain model, so the run must say first that it cannot show forgetting, and record it in the
    JSON and `qubench show`. Run as a user would: a subprocess outside any git checkout, stderr not a
    terminal (a CI log): every stage logs its start and end or that it was cached, the unlearning loop
    logs plain lines with the time left, and no other library's bars or git errors get through, even
    with TQDM_DISABLE unset."""
    root, out = first_run
    retrain = out["resolved"]["models"]["retrain"]["id"]
    env = {**os.environ, "QUBENCH_HOME": str(root / "home"), "OMP_NUM_THREADS": "1", "QUBENCH_PROGRESS_INTERVAL": "0"}
    env.pop("TQDM_DISABLE", None)
    proc = subprocess.run([sys.executable, "-m", "qubench", "run", *MICRO, "--model", retrain, "--retrain-model",
                           retrain, "--results", str(tmp_path / "r")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert " ".join(proc.stdout.split()).startswith(
        "NO SEPARATION: the target does not remember the forget set measurably more than the retrain model "
        "(verbmem_f ")
    assert "this run cannot show forgetting or recovery" in " ".join(proc.stdout.split())

    lines = proc.stderr.splitlines()
    for noise in THIRD_PARTY_NOISE:
        assert noise not in proc.stderr, f"{noise!r} reached stderr:\n{proc.stderr}"
    for activity in ("preparing task data (synth-news)", "preparing target and retrain models", "unlearning with ga_gdr",
                     "quantizing target with rtn-4bit", "quantizing unlearned with rtn-4bit", "evaluating retrain",
                     "evaluating target", "evaluating target/rtn-4bit", "evaluating unlearned",
                     "evaluating unlearned/rtn-4bit", "computing weight diagnostics"):
        assert any(line.startswith(activity) and line.endswith((" s", ": cached", ": found")) for line in lines), (
            f"no end line for {activity}:\n{proc.stderr}")
    started = [line[:-len(" ...")] for line in lines if line.endswith(" ...")]
    assert "unlearning with ga_gdr" in started and "evaluating unlearned/rtn-4bit" in started
    for activity in started:
        assert any(line.startswith(f"{activity}: done in ") for line in lines)
    assert any(line.startswith("  unlearning (ga_gdr): 1/") and " left, loss " in line for line in lines)
    assert all(line.startswith(("  ", *started)) or line.endswith((": cached", ": found")) for line in lines), lines

    (saved,) = (tmp_path / "r").glob("*.json")
    stored = json.loads(saved.read_text())
    assert stored["separation"]["status"] == "not separated"
    check = next(c for c in stored["separation"]["metrics"] if c["metric"] == "verbmem_f")
    assert (check["reference_kind"], check["margin"], check["separated"]) == ("retrain", 0.0, False)
    shown = CliRunner().invoke(main, ["show", str(saved)])
    assert shown.exit_code == 0 and shown.output.startswith("NO SEPARATION")
    assert "recov" not in shown.output.split("utility and reference metrics")[1].split("mean |Δw|")[0]


def test_results_record_the_thread_count_models_were_trained_with(first_run):
    """CPU float sums are split per thread, so another thread count trains slightly different weights:
    the result names the count for the target/retrain pair and for the unlearning."""
    _, out = first_run
    result = results.RunResult.model_validate(out)
    trained = result.resolved["models"]["trained_with"]
    assert isinstance(trained["torch_threads"], int) and trained["torch_threads"] >= 1 and trained["seconds"] > 0
    assert isinstance(result.resolved["training"]["torch_threads"], int)
