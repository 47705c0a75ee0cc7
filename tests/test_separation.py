"""What a run's numbers can say: the separation check (does the target remember the forget set at all?),
utility metrics reported as change rather than recovery, and how result files of schema 1.0 load."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from qubench import metric_catalog, results
from qubench.evaluation.measure import Measured
from qubench.report import print_result
from qubench.scoring import SEPARATION_THRESHOLD, separation, separation_from_rows
from qubench.specs import RunSpec
from qubench.submissions.integrity import metric_problems


def _sep(target: dict, retrain: dict | None = None):
    by_model = {"target_pre": target, **({"retrain": retrain} if retrain is not None else {})}
    return separation(Measured(by_model, auc_reference={}))


def test_thresholds_are_stated_per_view_and_cover_the_forget_metrics_they_check():
    assert SEPARATION_THRESHOLD == {"generation": 5.0, "classification": 5.0}
    checked = {m.name for m in metric_catalog.METRICS if m.role == "forget" and m.view in SEPARATION_THRESHOLD}
    assert checked == {"verbmem_f", "knowmem_f", "cls_f"}  # PrivLeak (membership) is itself relative to retrain
    for m in metric_catalog.METRICS:  # a floor reference measures the same view on never-trained data
        if m.floor is not None:
            assert m.role == "forget" and metric_catalog.get(m.floor).role == "floor"
            assert metric_catalog.get(m.floor).view == m.view


@pytest.mark.parametrize("metric", ["verbmem_f", "knowmem_f"])
def test_generation_metrics_separate_at_five_rouge_points_over_retrain(metric):
    at = _sep({metric: 30.0}, {metric: 25.0})
    assert at.status == "separated" and at.of(metric).margin == pytest.approx(5.0) and at.of(metric).separated
    below = _sep({metric: 29.9}, {metric: 25.0})
    assert below.status == "not separated" and below.of(metric).separated is False
    assert below.of(metric).reference_kind == "retrain" and below.of(metric).threshold == 5.0
    assert "cannot show forgetting or recovery" in below.message and f"{metric} 29.9 vs 25.0" in below.message


def test_classification_accuracy_separates_at_five_points():
    assert _sep({"cls_f": 95.0}, {"cls_f": 90.0}).status == "separated"
    assert _sep({"cls_f": 94.0}, {"cls_f": 90.0}).status == "not separated"
    # a target that remembers *less* than the retrain model is not separated either (direction, not distance)
    assert _sep({"cls_f": 70.0}, {"cls_f": 90.0}).of("cls_f").margin == pytest.approx(-20.0)
    assert _sep({"cls_f": 70.0}, {"cls_f": 90.0}).status == "not separated"


def test_without_a_retrain_model_the_target_is_compared_with_its_never_trained_floor():
    sep = _sep({"verbmem_f": 76.6, "verbmem_holdout": 24.0, "knowmem_f": 1.0})
    check = sep.of("verbmem_f")
    assert (check.reference_kind, check.reference_metric, check.reference) == ("floor", "verbmem_holdout", 24.0)
    assert sep.status == "separated"
    # KnowMem has no never-trained floor: left unchecked, not counted either way
    assert sep.of("knowmem_f").separated is None and sep.of("knowmem_f").reference is None
    assert _sep({"verbmem_f": 26.0, "verbmem_holdout": 24.0}).status == "not separated"
    assert _sep({"knowmem_f": 1.0}).status == "unchecked"


def test_one_metric_separating_makes_a_partial_separation_that_names_the_other():
    sep = _sep({"verbmem_f": 76.6, "knowmem_f": 1.0}, {"verbmem_f": 24.8, "knowmem_f": 0.5})
    assert sep.status == "partly separated"
    assert sep.message.startswith("on knowmem_f the target does not remember") and "verbmem_f separates" in sep.message


def _result(rows: dict, **extra) -> results.RunResult:
    spec = RunSpec()
    return results.RunResult(run_id=spec.run_id(), status="ok", spec=spec, metrics=rows, **extra)


def _rows(target_f: float, retrain_f: float) -> dict:
    return {"verbmem_f": results.catalogued_row("verbmem_f", 20.0, 30.0, target_f, target_f - 2, retrain_f),
            "verbmem_r": results.catalogued_row("verbmem_r", 60.0, 40.0, 70.0, 66.0, 65.0),
            "verbmem_holdout": results.catalogued_row("verbmem_holdout", 24.0, 25.0, 25.0, 25.5, 24.5)}


def test_utility_floor_and_raw_metrics_get_their_change_and_never_a_recovery():
    r = results.catalogued_row("verbmem_r", 12.0, 51.24, 10.0, 11.0, 9.0)  # would have been "recov 1962%"
    assert r.recovery is None and r.gap == pytest.approx(39.24) and r.target_change == pytest.approx(1.0)
    assert r.recovery_note.startswith("not applicable: a utility metric has no forgetting to recover")
    for name in ("verbmem_holdout", "privleak_auc", "cls_test"):
        assert results.catalogued_row(name, 0.2, 0.5, 0.9, 0.8).recovery is None
    forget = results.catalogued_row("verbmem_f", 20.0, 50.0, 80.0, 78.0)
    assert forget.recovery == pytest.approx(0.5) and forget.target_change == pytest.approx(-2.0)


def test_report_says_no_separation_first_and_shows_utility_as_change(tmp_path):
    result = _result(_rows(target_f=25.6, retrain_f=24.0))
    assert result.separation.status == "not separated"  # derived from the rows when none is stored
    console = Console(record=True, width=100)
    print_result(console, result)
    text = console.export_text()
    assert " ".join(text.split()).startswith(  # first, before any table
        "NO SEPARATION: the target does not remember the forget set measurably more than the retrain model "
        "(verbmem_f 25.6 vs 24.0; at least 5 points needed): this run cannot show forgetting or recovery")
    forget_table, utility_table = text.split("utility and reference metrics: change under quantization")
    assert "recov" in forget_table and "verbmem_f *" in forget_table
    assert "recov" not in utility_table.split("mean |Δw|")[0] and "%" not in utility_table.split("mean |Δw|")[0]
    verbmem_r = next(line for line in utility_table.splitlines() if "verbmem_r" in line)
    # target, tgt q, tgt Δq, retrain, pre, post, Δq: the change of both models, no ratio
    assert [c.strip() for c in verbmem_r.split("│")[2:9]] == ["70.0", "66.0", "-4.0", "65.0", "60.0", "40.0", "-20.0"]


def test_a_separated_report_says_so_under_the_tables():
    console = Console(record=True, width=100)
    print_result(console, _result(_rows(target_f=76.6, retrain_f=24.8)))
    text = " ".join(console.export_text().split())
    assert "NO SEPARATION" not in text and "partial separation" not in text
    assert "separation: the target remembers the forget set measurably more than the retrain model (verbmem_f 76.6 vs 24.8" in text


def _legacy_file(tmp_path, rows: dict):
    """A result as qubench wrote it before schema 1.1: recovery on every metric, no target_change or separation."""
    raw = json.loads(_result(rows).model_dump_json())
    raw["schema_version"] = "1.0"
    raw.pop("separation")
    for name, row in raw["metrics"].items():
        row.pop("target_change")
        forgotten = row["target_pre"] - row["pre"]
        row["recovery"], row["recovery_note"] = row["gap"] / forgotten, None
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    return path, raw


def test_a_schema_1_0_file_loads_with_utility_recovery_dropped_and_separation_derived(tmp_path):
    path, raw = _legacy_file(tmp_path, _rows(target_f=76.6, retrain_f=24.8))
    assert raw["metrics"]["verbmem_r"]["recovery"] == pytest.approx(-2.0)  # (40-60)/(70-60): meaningless
    old = results.load(path)
    assert old.schema_version == results.SCHEMA_VERSION
    assert old.metrics["verbmem_r"].recovery is None and old.metrics["verbmem_r"].target_change == pytest.approx(-4.0)
    assert old.metrics["verbmem_f"].recovery == pytest.approx(raw["metrics"]["verbmem_f"]["recovery"])  # kept as stored
    assert old.separation.status == "separated" and not metric_problems(old)
    # a tampered forget recovery in an old file is still caught: only fields 1.0 lacked are derived
    raw["metrics"]["verbmem_f"]["recovery"] = 0.01
    path.write_text(json.dumps(raw))
    assert any("verbmem_f: recovery" in p for p in metric_problems(results.load(path)))


def test_integrity_rejects_a_separation_that_does_not_follow_from_the_numbers():
    result = _result(_rows(target_f=25.6, retrain_f=24.0))
    assert not metric_problems(result)
    forged = result.model_copy(deep=True)
    forged.separation.status = "separated"
    forged.separation.metrics[0].separated = True
    problems = metric_problems(forged)
    assert any("separation of verbmem_f does not follow" in p for p in problems)
    utility_forged = result.model_copy(deep=True)
    utility_forged.metrics["verbmem_r"].recovery = 4.27
    assert any("verbmem_r: recovery 4.27 does not follow" in p for p in metric_problems(utility_forged))


def test_separation_from_stored_rows_equals_the_one_from_measurements():
    rows = _rows(target_f=76.6, retrain_f=24.8)
    measured = {"target_pre": {n: r.target_pre for n, r in rows.items()},
                "retrain": {n: r.retrain for n, r in rows.items()}}
    assert separation_from_rows(rows) == separation(Measured(measured, auc_reference={}))


def _cells(tmp_path, method: str, forget: tuple):
    from leaderboard_data import make_result

    from qubench.grid.plan import Cell

    cells = []
    for seed in (0, 1):
        result = make_result(method, seed=seed, forget=forget)
        cell = Cell(task="synth-news", method=method, quant="rtn-4bit", seed=seed, spec=result.spec)
        results.save(result, cell.result_file(tmp_path))
        cells.append(cell)
    return cells


def test_grid_aggregate_gives_utility_a_change_and_flags_targets_that_do_not_separate(tmp_path):
    from qubench.grid import aggregate as agg

    # make_result's retrain scores verbmem_f 5.0: a target at 40 separates, one at 6 does not
    cells = _cells(tmp_path, "ga", (40.0, 10.0, 20.0)) + _cells(tmp_path, "npo", (6.0, 2.0, 4.0))
    rows = {r.method: r for r in agg.aggregate(cells, tmp_path, grid={}, resamples=200).rows}
    utility = rows["ga"].metrics["knowmem_r"]
    assert utility.recovery_verdict == "not applicable" and utility.values["recovery"] is None
    assert utility.values["gap"].mean == pytest.approx(-1.0) and utility.values["target_change"].mean == pytest.approx(-2.0)
    assert utility.recovery_undefined == 0
    assert rows["ga"].metrics["verbmem_f"].not_separated == 0
    assert rows["ga"].metrics["verbmem_f"].recovery_verdict != "target not separated"
    unseparated = rows["npo"].metrics["verbmem_f"]
    assert unseparated.not_separated == 2 and unseparated.recovery_verdict == "target not separated"


def test_leaderboard_row_says_when_its_target_does_not_separate_and_leaves_it_unranked(tmp_path):
    from leaderboard_data import make_result, write

    from qubench.leaderboard import ranking, table
    from qubench.leaderboard.data import load_board
    from qubench.leaderboard.rows import build_rows

    write(make_result("target", forget=(40.0, 40.0, 41.0), utility=(50, 48, 50, 48)), tmp_path)
    write(make_result("npo", forget=(40.0, 8.0, 12.0)), tmp_path)
    write(make_result("ga", forget=(6.0, 2.0, 3.0)), tmp_path)  # target 6.0 vs retrain 5.0
    board = load_board([tmp_path], None)
    assert not board.rejected
    rows = {r.method: r for r in ranking.rank(build_rows(board))}
    assert rows["npo"].separated is True and rows["npo"].rank == 1
    assert rows["npo"].separation == "separated: target verbmem_f 40.0 vs retrain 5.0"
    assert rows["ga"].separated is False and rows["ga"].rank is None
    assert rows["ga"].standing == "unranked: target not separated from retrain (see separation)"
    assert rows["ga"].separation.startswith("NOT separated: target verbmem_f 6.0 vs retrain 5.0 (< 5 points apart")
    frame = table.to_frame(list(rows.values())).set_index("method")
    assert frame.loc["ga", "separation"].startswith("NOT separated") and frame.loc["ga", "rank"] == ""
    assert frame.loc["npo", "utility_change"] == pytest.approx(-1.0)  # post - pre of knowmem_r: change, no recovery
    assert "recovery" not in {c.id for c in table.COLUMNS if c.id.startswith("utility")}
    assert "separation column" in ranking.RULE
