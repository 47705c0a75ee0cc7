"""Third-party submissions: the worked example package is pip-installed (into a scratch folder on
sys.path), submitted on a micro grid, validated, verified by re-running a cell, and shown on the
leaderboard as verified; tampered and malformed submissions are rejected with their reasons."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qubench.cli import main
from qubench.leaderboard import ranking
from qubench.leaderboard.data import load_board
from qubench.leaderboard.rows import build_rows
from qubench.results import catalogued_row
from qubench.submissions import integrity, schema
from qubench.submissions.validate import validate

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "submissions" / "example-random-relabel"
NAME = "example-random-relabel"
MICRO_GRID = {"tasks": [{"name": "synth-news", "params": {"size": "micro"}}], "methods": ["random_relabel"],
              "quantizers": [{"name": "rtn-4bit", "params": {"group_size": 64}}], "seeds": [0], "eval_limit": 2}
MICRO_METHOD = ["--method-param", "epochs=1", "--method-param", "batch_size=4", "--method-param", "lr=1e-3"]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _text(res) -> str:
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("submissions")
    mp.setenv("QUBENCH_HOME", str(root / "home"))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def plugin(workspace):
    """The example package pip-installed into its own folder, put first on sys.path (the venv is untouched)."""
    target = workspace / "site"
    package = shutil.copytree(EXAMPLE, workspace / "package",  # built from a copy: nothing lands in the repo
                              ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "results"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), str(package)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("qubench_random_relabel", None)
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def submitted(workspace, plugin) -> Path:
    """`qubench submit` of the example on a one-cell grid, into a copy of the example's package folder."""
    folder = workspace / "subs" / NAME
    folder.mkdir(parents=True)
    for part in ("pyproject.toml", "README.md", "src"):
        src = EXAMPLE / part
        shutil.copytree(src, folder / part) if src.is_dir() else shutil.copy(src, folder / part)
    grid = workspace / "micro.yaml"
    grid.write_text(yaml.safe_dump(MICRO_GRID))
    res = _invoke("submit", "--method", "random_relabel", *MICRO_METHOD, "--spec", grid, "--out", workspace / "subs",
                  "--name", NAME, "--source", ".", "--author", "A. Tester")
    assert res.exit_code == 0, res.output
    return folder


def test_plugin_is_found_through_its_entry_point(plugin):
    from qubench import registry
    from qubench.submissions.submit import distribution_of, method_entry_point

    assert distribution_of(method_entry_point("random_relabel")) == ("qubench-random-relabel", "0.1.0")
    method = registry.create("methods", "random_relabel", {"lr": 1e-3})
    assert type(method).__module__ == "qubench_random_relabel" and method.params()["permutation_seed"] == 0


def test_submit_writes_submission_yaml_and_the_grid_results(submitted):
    sub = schema.load_submission(submitted)
    assert sub.package.model_dump() == {"name": "qubench-random-relabel", "version": "0.1.0", "source": "."}
    assert sub.method.entry_point == "qubench_random_relabel:RandomRelabel"
    assert sub.method.params == {"epochs": 1, "batch_size": 4, "lr": 1e-3}
    assert sub.authors == ["A. Tester"] and sub.license == "Apache-2.0"
    assert sub.preset.name == "custom" and sub.preset.grid["methods"] == [
        {"name": "random_relabel", "params": sub.method.params, "label": None}]
    cells = list((submitted / "results" / "cells").glob("*.json"))
    assert len(cells) == 1 and sub.results_sha256 == integrity.folder_digests(submitted / "results")
    result, _, reason = integrity.read_result(cells[0])
    assert reason is None and result.status == "ok" and result.spec.method.name == "random_relabel"


def test_validate_installs_the_package_and_accepts_the_submission(submitted):
    res = _invoke("validate", submitted)
    assert res.exit_code == 0, res.output
    assert "valid" in res.output


@pytest.fixture(scope="module")
def verified(submitted) -> Path:
    """`qubench verify --cells 1` on the submission (the plugin is importable already: --no-install)."""
    res = _invoke("verify", submitted, "--cells", "1", "--seed", "0", "--no-install")
    assert res.exit_code == 0, res.output
    assert "verified (1 of 1 cells re-run" in _text(res)
    return submitted


def test_verify_reruns_a_cell_and_the_leaderboard_shows_it_verified(verified, monkeypatch):
    submitted = verified
    record = schema.load_verification(submitted)
    assert record.verified and len(record.cells) == 1 and record.cells[0].max_deviation == 0.0
    assert record.tolerance.points == 1.0 and record.selection_seed == 0

    board = load_board([], submitted.parent)
    (row,) = ranking.rank(build_rows(board))
    assert (row.method, row.badge, row.plugin) == ("random_relabel", "verified", "qubench-random-relabel 0.1.0")

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("QUBENCH_LEADERBOARD_RESULTS", str(submitted / "no-reference"))
    monkeypatch.setenv("QUBENCH_LEADERBOARD_SUBMISSIONS", str(submitted.parent))
    at = AppTest.from_file(str(REPO / "leaderboard" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    at.checkbox(key="filter_verified").check().run()
    shown = at.dataframe[0].value
    assert list(shown["method"]) == ["random_relabel"] and list(shown["badge"]) == ["verified"]


def _tampered_copy(submitted: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the submission whose utility numbers were raised by 20 points, gap and recovery
    recomputed so that the file is self-consistent."""
    copy = tmp_path / "subs" / NAME
    shutil.copytree(submitted, copy)
    (cell,) = (copy / "results" / "cells").glob("*.json")
    data = json.loads(cell.read_text())
    m = data["metrics"]["knowmem_r"]
    m.update(catalogued_row("knowmem_r", m["pre"] + 20, m["post"] + 20, m["target_pre"], m["target_post"], m["retrain"]).model_dump())
    cell.write_text(json.dumps(data, indent=2))
    return copy, cell


def test_tampered_metric_is_caught_by_validate_and_by_verify(verified, tmp_path, plugin, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(plugin))  # validate --no-install probes this environment
    copy, cell = _tampered_copy(verified, tmp_path)
    (row,) = build_rows(load_board([], copy.parent))
    assert row.badge == "not verified"
    assert load_board([], copy.parent).sources[0].note == "results changed after verification"

    res = _invoke("validate", copy, "--no-install")
    assert res.exit_code == 1
    text = _text(res)
    assert "content differs from the sha256 recorded at submit time" in text and "verification.yaml: stale" in text

    # Someone who also rewrites the digests (anyone can) gets past validate, but not past verify.
    sub = schema.load_submission(copy)
    sub.results_sha256 = integrity.folder_digests(copy / "results")
    schema.dump_yaml(sub, copy / schema.SUBMISSION_FILE)
    (copy / schema.VERIFICATION_FILE).unlink()
    assert validate(copy, install=False) == []
    res = _invoke("verify", copy, "--cells", "1", "--no-install")
    assert res.exit_code == 1
    text = _text(res)
    assert "NOT verified" in text and "knowmem_r.pre: submitted" in text and "> tolerance 1" in text
    record = schema.load_verification(copy)
    assert not record.verified and record.cells[0].mismatches
    source = load_board([], copy.parent).sources[0]
    assert source.badge == "not verified" and source.note.startswith("verification failed on 1")


def test_validate_lists_every_problem_at_once(submitted, tmp_path, plugin, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(plugin))
    copy = tmp_path / "renamed"
    shutil.copytree(submitted, copy)
    (copy / schema.VERIFICATION_FILE).unlink(missing_ok=True)
    sub = schema.load_submission(copy)
    sub.package.version = "9.9.9"
    schema.dump_yaml(sub, copy / schema.SUBMISSION_FILE)
    (cell,) = (copy / "results" / "cells").glob("*.json")
    cell.unlink()
    (copy / "results" / "cells" / "junk.json").write_text("{not json")
    problems = validate(copy, install=False)
    joined = "\n".join(problems)
    assert "differs from the folder name 'renamed'" in joined
    assert "not from the declared qubench-random-relabel 9.9.9" in joined
    assert "junk.json: not JSON" in joined
    assert "grid incomplete: 1 of 1 cells have no ok result" in joined
    assert "listed in results_sha256 but missing" in joined and "junk.json: not in results_sha256" in joined
    res = _invoke("validate", copy, "--no-install")
    assert res.exit_code == 1 and f"{len(problems)} problem(s)" in _text(res)


def test_malformed_submission_yaml_is_rejected_with_every_schema_error(tmp_path):
    folder = tmp_path / "bad"
    (folder / "results").mkdir(parents=True)
    (folder / "submission.yaml").write_text("name: Bad Name!\nlicense: ''\nsurprise: 1\n"
                                            "package: {name: x, version: '1', source: x}\n")
    problems = validate(folder)
    joined = "\n".join(problems)
    for expected in ("name: String should match pattern", "license: String should have at least 1 character",
                     "surprise: Extra inputs are not permitted", "authors: Field required", "method: Field required",
                     "preset: Field required"):
        assert expected in joined
    board = load_board([], tmp_path)
    assert board.rejected[0].reason.startswith("invalid submission:") and not board.sources


SHIPPED = sorted(p for p in (REPO / "submissions").glob("*/") if (p / schema.SUBMISSION_FILE).exists())


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_submission_validates(folder):
    """CI's check of submissions/: each folder installs its package, loads it and matches its results."""
    assert validate(folder) == []


def test_submit_refuses_built_in_and_composed_methods(tmp_path):
    res = _invoke("submit", "--method", "ga", "--out", tmp_path)
    assert res.exit_code == 2 and "built into qubench" in _text(res)
    res = _invoke("submit", "--method", "ga_gdr+lora", "--out", tmp_path)
    assert res.exit_code == 2 and "composition" in _text(res)
    assert not list(tmp_path.iterdir())
