"""Hostile result, aggregate and submission files: each is one rejected line with its reason; the
leaderboard, `qubench validate` and the grid never fall over (issue #16, items 1 and 2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qubench import untrusted
from qubench.cli import main
from qubench.leaderboard import ranking
from qubench.leaderboard.data import load_board
from qubench.leaderboard.rows import build_rows
from qubench.results import metric_row
from qubench.submissions import integrity
from qubench.submissions.validate import validate
from leaderboard_data import make_result, standard_tree, write

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "submissions" / "example-random-relabel"
#: The issue's file: 200 KB of nested brackets, deeper than Python's recursion limit.
NESTED = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "grid"
    standard_tree(root)
    return root


def _forged(value: float, seed: int, metric: str = "verbmem_f"):
    """A result whose `metric` pre and post are `value`, gap and recovery recomputed, run_id matching:
    consistent in every way but the value itself."""
    result = make_result("npo", seed=seed)
    row = result.metrics[metric]
    result.metrics[metric] = metric_row(value, value, row.target_pre, row.target_post, row.retrain)
    return result


def test_nested_bracket_file_is_rejected_before_parsing_and_the_board_keeps_every_other_run(tree):
    (tree / "cells" / "nested.json").write_text(NESTED)
    assert len(NESTED) == 200_000
    board = load_board([tree])
    (rejected,) = board.rejected
    assert rejected.path == "grid/cells/nested.json"
    assert rejected.reason == ("nested more than 64 levels deep (qubench files nest a few levels): refused "
                               "before parsing")
    assert len(board.runs) == 12  # nothing else lost


def test_impossible_values_are_rejected_with_the_metric_range(tree):
    write(_forged(-1e9, 101), tree)
    write(_forged(1e308, 102), tree)
    write(_auc(1.5, 103), tree)
    board = load_board([tree])
    reasons = sorted(r.reason for r in board.rejected)
    assert reasons == [
        "metric privleak_auc: pre = 1.5, post = 1.5 outside the valid range [0, 1] of privleak_auc",
        "metric verbmem_f: pre = -1e+09, post = -1e+09 outside the valid range [0, 100] of verbmem_f",
        "metric verbmem_f: pre = 1e+308, post = 1e+308 outside the valid range [0, 100] of verbmem_f",
    ]
    rows = ranking.rank(build_rows(board))
    posts = [r.forget.mean("post") for r in rows if r.forget]
    assert posts and all(0 <= p <= 100 for p in posts)  # nothing impossible ranks, nothing stretches a chart
    assert len(board.runs) == 12


def _auc(value: float, seed: int):
    result = make_result("npo", seed=seed)
    result.metrics["privleak_auc"] = metric_row(value, value, 0.2, 0.2, 0.5, min_forgetting=0.01)
    return result


def test_an_infinite_recovery_is_rejected(tree):
    path = write(make_result("npo", seed=104), tree)
    data = json.loads(path.read_text())
    data["metrics"]["verbmem_f"]["recovery"] = float("inf")  # written as Infinity, which Python's json reads
    path.write_text(json.dumps(data))
    (rejected,) = load_board([tree]).rejected
    assert rejected.reason == "metric verbmem_f: non-finite recovery"


def test_symlinks_are_refused_files_and_folders(tree, tmp_path):
    outside = tmp_path / "outside"
    (outside / "cells").mkdir(parents=True)
    elsewhere = write(make_result("npo", seed=105), outside)  # a valid result, outside the folder
    (tree / "cells" / "link.json").symlink_to(elsewhere)
    (tree / "cells" / "linked-folder").symlink_to(outside / "cells", target_is_directory=True)
    board = load_board([tree])
    reasons = {r.path: r.reason for r in board.rejected}
    assert reasons == {
        "grid/cells/link.json": "symlink refused (the file is a symbolic link; results must be plain files inside "
                                "the folder)",
        "grid/cells/linked-folder": "symlink refused (the file is a symbolic link; results must be plain files "
                                    "inside the folder)",
    }
    assert len(board.runs) == 12 and all("link" not in r.key for r in board.runs)
    # A symlinked submission folder is refused too, and so is reading through a symlinked parent.
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "borrowed").symlink_to(EXAMPLE, target_is_directory=True)
    assert [r.reason for r in load_board([], subs).rejected] == ["symlink refused (a submission must be a plain folder)"]
    result, _, reason = integrity.read_result(tree / "cells" / "linked-folder" / elsewhere.name, tree)
    assert result is None and reason.startswith("symlink refused (its folder linked-folder")


def test_the_page_stays_up_with_every_hostile_file_listed(tree, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    (tree / "cells" / "nested.json").write_text(NESTED)
    write(_forged(1e308, 102), tree)
    monkeypatch.setenv("QUBENCH_LEADERBOARD_RESULTS", str(tree))
    monkeypatch.setenv("QUBENCH_LEADERBOARD_SUBMISSIONS", str(tree / "none"))
    at = AppTest.from_file(str(REPO / "leaderboard" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    rejected = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    assert sorted(rejected["path"]) == sorted(["grid/cells/nested.json", f"grid/cells/{_name(_forged(1e308, 102))}"])
    assert len(at.dataframe[0].value) == 10


def _name(result) -> str:
    from qubench import pipeline

    return pipeline.result_path(Path("."), result.spec).name


def test_validate_lists_hostile_files_and_never_crashes(tmp_path):
    copy = tmp_path / "example-random-relabel"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    cells = copy / "results" / "cells"
    first = sorted(cells.glob("*.json"))[0]
    (cells / "nested.json").write_text(NESTED)
    data = json.loads(first.read_text())
    row = data["metrics"]["verbmem_f"]
    row.update(metric_row(-1e9, -1e9, row["target_pre"], row["target_post"], row["retrain"]).model_dump())
    first.write_text(json.dumps(data))
    (cells / "link.json").symlink_to(first)
    problems = validate(copy, install=False)
    joined = "\n".join(problems)
    assert "results/cells/nested.json: nested more than 64 levels deep" in joined
    assert f"results/cells/{first.name}: metric verbmem_f: pre = -1e+09, post = -1e+09 outside the valid range" in joined
    assert "results/cells/link.json: symlink refused" in joined
    res = CliRunner().invoke(main, ["validate", str(copy), "--no-install"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)  # a list of problems, not a crash
    assert "nested more than 64 levels deep" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("text,reason", [
    ("a: " + "[" * 5000 + "]" * 5000, "nested more than 64 levels deep: refused before parsing"),
    ("a: &x [1, 2]\n" + "\n".join(f"b{i}: *x" for i in range(60)), "more than 50 YAML aliases: refused"),
    ("name: [unclosed", "not YAML"),
])
def test_hostile_submission_yaml_is_an_invalid_submission(tmp_path, text, reason):
    folder = tmp_path / "subs" / "bad"
    (folder / "results").mkdir(parents=True)
    (folder / "submission.yaml").write_text(text)
    problems = validate(folder, install=False)
    assert len(problems) == 1 and problems[0].startswith(f"submission.yaml: cannot read: {reason}")
    (rejected,) = load_board([], tmp_path / "subs").rejected
    assert rejected.reason.startswith(f"invalid submission: submission.yaml: cannot read: {reason}")


def test_json_depth_is_measured_without_parsing_and_ignores_brackets_in_strings(tmp_path):
    assert untrusted.json_depth(b'{"a": [1, {"b": "[[[[[[["}]}') == 3
    assert untrusted.json_depth(b'"\\"[[[["') == 0
    assert untrusted.json_depth(NESTED.encode(), limit=64) == 65  # stops counting past the limit
    path = tmp_path / "big.json"
    path.write_bytes(b"[1, 2, 3, 4, 5]")
    with pytest.raises(untrusted.UntrustedFileError, match="file is 15 bytes, more than the 10 allowed"):
        untrusted.read_json(path, max_bytes=10)


def test_a_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "cells" / "fifo.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    result, _, reason = integrity.read_result(fifo, tmp_path)
    assert result is None and reason == "not a regular file"


def test_a_damaged_aggregate_file_is_a_value_error_naming_why(tmp_path):
    from qubench.grid import aggregate

    path = tmp_path / "aggregate.json"
    path.write_text(NESTED)
    with pytest.raises(ValueError, match="nested more than 64 levels"):
        aggregate.load(path)
