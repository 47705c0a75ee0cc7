"""Fail before the work, not after it: unwritable or full folders, model options that cannot apply,
model folders that cannot load, malformed task data and bad CLI values are refused with a message
before anything is computed; what fails after the compute loses nothing (issue #16, items 5-7)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qubench import pipeline, preflight, results
from qubench.cli import main
from qubench.errors import DataError
from qubench.specs import PluginRef, RunSpec

MICRO = ["--task-param", "size=micro", "--method-param", "epochs=1", "--method-param", "lr=1e-3",
         "--method-param", "batch_size=4", "--method-param", "grad_accum=1", "--limit", "2"]
SPEC = RunSpec(task=PluginRef(name="synth-news", params={"size": "micro"}),
               method=PluginRef(name="ga_gdr", params={"epochs": 1, "lr": 1e-3, "batch_size": 4, "grad_accum": 1}),
               eval_limit=2)


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _said(res) -> str:
    """The output without any whitespace: rich wraps long lines anywhere, even inside a path."""
    return "".join(res.output.split())


def _has(res, text: str) -> bool:
    return "".join(text.split()) in _said(res)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _built(home: Path) -> list[str]:
    from qubench.stages import STAGE_KINDS

    return [p.name for kind in STAGE_KINDS if (home / kind).is_dir()
            for p in (home / kind).iterdir() if not p.name.startswith(".")]


# --- the results folder and QUBENCH_HOME -------------------------------------------------------------

def test_a_results_folder_that_cannot_be_created_is_refused_before_any_work(home, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder's parent should be")
    res = _invoke("run", *MICRO, "--results", blocker / "results")
    assert res.exit_code == 2
    assert _has(res, f"error: results folder {blocker / 'results'} is not writable (Not a directory); nothing was run")
    assert _built(home) == []  # refused before the task data, let alone training


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (the case above covers root)")
def test_a_read_only_results_folder_is_refused_before_any_work(home, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = _invoke("run", *MICRO, "--results", ro)
    finally:
        ro.chmod(0o755)
    assert res.exit_code == 2 and _has(res, f"results folder {ro} is not writable (Permission denied)")
    assert _built(home) == []


def test_a_full_disk_is_refused_before_any_work(home, tmp_path, monkeypatch):
    # Simulated: a real full file system would need a mount this test cannot make.
    monkeypatch.setattr(preflight, "_free", lambda path: 3 << 20)
    res = _invoke("run", *MICRO, "--results", tmp_path / "results")
    assert res.exit_code == 2
    assert _has(res, f"results folder {tmp_path / 'results'} has 3 MiB free, less than the 16 MiB this needs; "
                     "nothing was run")
    assert _built(home) == []


def test_grid_checks_its_folders_before_any_cell(home, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _invoke("grid", *MICRO, "--results", blocker / "grid")
    assert res.exit_code == 2 and _has(res, "is not writable (Not a directory); nothing was run")
    assert "Traceback" not in res.output and _built(home) == []


# --- model options ------------------------------------------------------------------------------------

def test_a_retrain_model_that_does_not_exist_is_refused_not_ignored(home, tiny_model_dir, tmp_path):
    res = _invoke("run", *MICRO, "--model", tiny_model_dir, "--retrain-model", tmp_path / "nope",
                  "--results", tmp_path / "r")
    assert res.exit_code == 2
    assert _has(res, f"--retrain-model {tmp_path / 'nope'}: no such folder, and not a hub ID of the form owner/name")
    assert _built(home) == [] and not (tmp_path / "r").exists()


def test_grid_refuses_a_retrain_model_without_a_model_before_any_cell(home, tmp_path):
    res = _invoke("grid", *MICRO, "--retrain-model", tmp_path / "nope", "--results", tmp_path / "g")
    assert res.exit_code == 2 and _has(res, "--retrain-model was given without --model")
    assert not (tmp_path / "g").exists() and _built(home) == []


def test_a_model_folder_with_only_a_config_is_refused_naming_what_it_lacks(home, tiny_model_dir, tmp_path):
    folder = tmp_path / "only-config"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    res = _invoke("run", *MICRO, "--model", folder, "--results", tmp_path / "r")
    assert res.exit_code == 2
    assert _has(res, f"error: --model {folder} is not a complete model folder; it lacks weights (*.safetensors or "
                     "pytorch_model*.bin); a tokenizer (one of tokenizer.json")
    assert not _has(res, "You need to have sentencepiece") and _built(home) == []


def test_a_truncated_checkpoint_in_a_model_folder_is_named(home, tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    res = _invoke("run", *MICRO, "--model", folder, "--results", tmp_path / "r")
    assert res.exit_code == 2
    assert _has(res, f"--model {folder}: model.safetensors: truncated safetensors: {size // 2} bytes, its header "
                     f"declares {size}")


# --- task data ----------------------------------------------------------------------------------------

def _muse_folder(root: Path, verbmem) -> Path:
    for rel, rows in {"verbmem/forget.json": verbmem,
                      "knowmem/forget_qa.json": [{"question": "Q?", "answer": "A"}],
                      "knowmem/retain_qa.json": [{"question": "Q?", "answer": "A"}],
                      "privleak/forget.json": ["a document"], "privleak/holdout.json": ["another"]}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(rows))
    return root


@pytest.mark.parametrize("verbmem,message", [
    ({"0": {"prompt": "p", "gt": "g"}}, "expected a JSON list of entries, found dict (MUSE's files are lists)"),
    ([{"prompt": "p", "gt": "g"}, {"prompt": "p"}], "entry 1 has no 'gt' (every entry needs 'prompt' and 'gt')"),
    ([{"prompt": "p", "gt": 3}], "entry 0: 'gt' is int, not a string"),
])
def test_a_muse_file_of_the_wrong_shape_is_named_with_the_entry_and_field(home, tmp_path, verbmem, message):
    from qubench.tasks.muse_source import read_muse

    folder = _muse_folder(tmp_path / "muse", verbmem)
    with pytest.raises(DataError) as err:
        read_muse(str(folder))
    assert str(err.value) == f"{folder / 'verbmem/forget.json'}: {message}"
    res = _invoke("prepare", "--task", "muse-news-mini", "--task-param", f"source={folder}")
    assert res.exit_code == 2 and _has(res, message) and "KeyError" not in res.output
    assert _built(home) == []  # nothing half-read was cached


# --- CLI values -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["run", "--batch-size", "0"], "Invalid value for '--batch-size': '0' is not a positive number (or 'auto')"),
    (["run", "--limit", "0"], "Invalid value for '--limit': 0 is not in the range x>=1."),
    (["run", "--seed", "-1"], "Invalid value for '--seed': -1 is not in the range x>=0."),
    (["run", "--task-param", "size=["], "Invalid value: 'size=[': '[' is not a valid value"),
    (["run", "--method-param", "=3"], "Invalid value: '=3' has no KEY before '='"),
    (["grid", "--seeds", "0"], "Invalid value for '--seeds': 0 is not in the range x>=1."),
    (["verify", ".", "--cells", "0"], "Invalid value for '--cells': 0 is not in the range x>=1."),
    (["verify", ".", "--tolerance", "0"], "Invalid value for '--tolerance': 0.0 is not in the range x>0."),
    (["verify", ".", "--auc-tolerance", "-1"], "Invalid value for '--auc-tolerance': -1.0 is not in the range x>0."),
    (["leaderboard", "--port", "0"], "Invalid value for '--port': 0 is not in the range 1<=x<=65535."),
])
def test_bad_cli_values_get_a_message_not_a_traceback(home, args, message):
    res = _invoke(*args)
    assert res.exit_code == 2 and _has(res, message), res.output
    assert "Traceback" not in res.output and _built(home) == []


# --- after the compute ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A micro run's stages, cached in a private home."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("late")
    mp.setenv("QUBENCH_HOME", str(root / "home"))
    try:
        first = pipeline.run(SPEC, root / "first", log=lambda msg: None, progress=False)
        yield root, first
    finally:
        mp.undo()


def test_a_results_folder_that_goes_away_during_the_run_keeps_the_result_and_says_where(warm, monkeypatch):
    root, first = warm
    monkeypatch.setenv("QUBENCH_HOME", str(root / "home"))
    spec = SPEC.model_copy(update={"quant": PluginRef(name="rtn-8bit")})
    out_dir = root / "vanishing"

    def sabotage(msg: str) -> None:  # once the work is under way, the folder becomes a file
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
            out_dir.write_text("not a folder any more")

    with pytest.raises(pipeline.ResultNotSaved) as err:
        pipeline.run(spec, out_dir, log=sabotage, progress=False)
    kept = root / "home" / pipeline.UNSAVED_KIND / pipeline.result_path(out_dir, spec).name
    message = str(err.value)
    assert message.startswith(f"the run finished (status ok) but its result could not be written to "
                              f"{pipeline.result_path(out_dir, spec)} (FileExistsError")
    assert f"it is kept at {kept} (`qubench show {kept}`" in message
    saved = results.load(kept)
    assert saved.status == "ok" and saved.metrics == err.value.result.metrics and saved.run_id == spec.run_id()
    # Nothing computed is lost: into a writable folder, the same run only scores again from the cache.
    before = {p.name for p in (root / "home" / "evals").iterdir()}
    again = pipeline.run(spec, root / "writable", log=lambda msg: None, progress=False)
    assert again.metrics == saved.metrics and {p.name for p in (root / "home" / "evals").iterdir()} == before


@pytest.mark.parametrize("damage", ["truncated", "nested", "other spec", "binary"])
def test_a_damaged_stored_result_is_recomputed_without_a_traceback(warm, monkeypatch, damage):
    root, first = warm
    monkeypatch.setenv("QUBENCH_HOME", str(root / "home"))
    path = pipeline.result_path(root / "first", SPEC)
    good = path.read_bytes()
    other = first.model_copy(update={"spec": SPEC.model_copy(update={"seed": 5})})
    other.run_id = other.spec.run_id()  # a sound result, of another spec, under this spec's name
    path.write_bytes({"truncated": good[:300], "nested": b"[" * 100_000 + b"]" * 100_000, "binary": b"\xff\x00" * 50,
                      "other spec": other.model_dump_json().encode()}[damage])
    assert results.stored_ok(path, SPEC) is None
    res = _invoke("run", *MICRO, "--results", root / "first", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"] == first.model_dump(mode="json")["metrics"]
    assert results.stored_ok(path, SPEC) is not None


def test_a_grid_recovers_from_a_damaged_cell_result_in_one_rerun(warm, monkeypatch):
    root, _ = warm
    monkeypatch.setenv("QUBENCH_HOME", str(root / "home"))
    args = ["grid", *MICRO, "--quant", "rtn-4bit", "--quant", "rtn-8bit", "--results", root / "grid", "--json"]
    assert _invoke(*args).exit_code == 0
    cells = sorted((root / "grid" / "cells").glob("*.json"))
    cells[0].write_text("[" * 100_000 + "]" * 100_000)
    cells[1].write_bytes(cells[1].read_bytes()[:200])
    from qubench.grid import aggregate

    summary = _invoke(*args)
    assert summary.exit_code == 0, summary.output
    assert json.loads(summary.stdout)["ok"] == 2
    agg = aggregate.load(root / "grid" / "aggregate.json")
    assert not agg.failures and all(row.seeds == [0] for row in agg.rows)
    assert all(results.stored_ok(c) is not None for c in cells)
