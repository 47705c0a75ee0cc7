"""The task YAMLs run under plain lm-eval, outside qubench, and give qubench's numbers.

    lm_eval run --model hf --model_args pretrained=PATH --tasks qubench_muse --include_path tasks/ \
        --metadata '{"data_root": "FOLDER"}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_evaluation import write_muse_folder

from qubench.engines.hf import HFEngine
from qubench.evaluation.evaluate import CLASSIFY_TASKS, GENERATION_TASKS, evaluate_model, tasks_dir
from qubench.tasks import muse_layout

LM_EVAL = [sys.executable, "-m", "lm_eval"]


def _lm_eval(args: list[str], env_extra: dict[str, str] | None = None, tmp: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k != "QUBENCH_DATA_ROOT"}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run(LM_EVAL + args, capture_output=True, text=True, env=env, cwd=tmp, timeout=600)


def _results(out_dir: Path) -> dict:
    files = sorted(out_dir.rglob("results_*.json"))
    assert files, f"lm-eval wrote no results under {out_dir}"
    return json.loads(files[-1].read_text())["results"]


@pytest.fixture(scope="module")
def muse_folder(tmp_path_factory) -> Path:
    return write_muse_folder(tmp_path_factory.mktemp("muse_cli"))


def _lm_eval_and_qubench(model_dir: Path, suite: str, folder: Path, tmp_path: Path, **how) -> tuple[dict, dict]:
    """Run `suite` through the plain lm-eval CLI and the same data through qubench's evaluator."""
    proc = _lm_eval(["run", "--model", "hf", "--model_args", f"pretrained={model_dir}", "--tasks", suite,
                     "--include_path", str(tasks_dir()), "--device", "cpu", "--batch_size", "4",
                     *how.get("args", []), "--output_path", str(tmp_path / "out")], env_extra=how.get("env"),
                    tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = evaluate_model(HFEngine.from_params({"batch_size": 4}), model, AutoTokenizer.from_pretrained(model_dir),
                          muse_layout.load(folder), folder, auc_retrain=None)
    return _results(tmp_path / "out"), ours.metrics


def test_plain_lm_eval_cli_reproduces_qubench_metrics(tiny_model_dir, muse_folder, tmp_path):
    results, ours = _lm_eval_and_qubench(tiny_model_dir, "qubench_muse", muse_folder, tmp_path,
                                         args=["--metadata", json.dumps({"data_root": str(muse_folder)})])
    for task, metric in GENERATION_TASKS.items():
        assert results[task]["rougeL_f1,none"] * 100 == pytest.approx(ours[metric], abs=1e-6), task


def test_plain_lm_eval_cli_reproduces_the_classification_view(tiny_model_dir, tmp_path):
    from test_misinfo import _classify_folder

    folder = _classify_folder(tmp_path / "data")
    results, ours = _lm_eval_and_qubench(tiny_model_dir, "qubench_classify", folder, tmp_path,
                                         env={"QUBENCH_DATA_ROOT": str(folder)})
    for task, metric in CLASSIFY_TASKS.items():
        assert results[task]["acc,none"] * 100 == pytest.approx(ours[metric], abs=1e-6), task


def test_without_a_data_root_lm_eval_stops_with_what_to_set(tiny_model_dir, tmp_path):
    missing = _lm_eval(["run", "--model", "hf", "--model_args", f"pretrained={tiny_model_dir}", "--tasks",
                        "qubench_knowmem_forget", "--include_path", str(tasks_dir()), "--device", "cpu"], tmp=tmp_path)
    assert missing.returncode != 0
    assert "QUBENCH_DATA_ROOT" in missing.stderr and "data_root" in missing.stderr
