"""The leaderboard: reading untrusted result files, the ranking rule, the Streamlit page (AppTest)
and a real browser (Debian's headless Chromium) on `qubench leaderboard`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from qubench.grid.aggregate import bootstrap_mean
from qubench.leaderboard import detail, ranking, table
from qubench.leaderboard.data import load_board
from qubench.leaderboard.rows import build_rows
from leaderboard_data import make_result, standard_tree, write

pytest.importorskip("streamlit", reason="the leaderboard extra is not installed: pip install -e '.[leaderboard]'")

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "leaderboard" / "app.py")
HOSTILE = "**bold** [link](https://example.invalid) <img src=x onerror=alert(1)>"


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "grid"
    standard_tree(root)
    return root


def _rows(*folders, submissions=None):
    board = load_board(list(folders), submissions)
    return board, ranking.rank(build_rows(board))


def test_rows_are_ranked_by_controlled_recovery_among_rows_that_forget_and_keep_utility(tree):
    board, rows = _rows(tree)
    assert not board.rejected and len(board.runs) == 12
    rtn = [r for r in rows if r.quantizer == "rtn-4bit"]
    assert [(r.method, r.rank) for r in rtn] == [("target", None), ("retrain", None), ("npo", 1), ("ga", 2),
                                                  ("ga_klr", None)]
    # verbmem_f between retrain (5, quantized 6) and target (40, quantized 41): npo moves from 3/35 to 6/35 of the
    # way, taking back (6/35 - 3/35) / (1 - 3/35) = 3/32 of its forgetting; ga 0.3 and 13/30 over its two seeds.
    npo, ga = rtn[2], rtn[3]
    assert npo.forget.mean("controlled_recovery") == pytest.approx(3 / 32)
    assert ga.forget.mean("controlled_recovery") == pytest.approx((0.3 + 13 / 30) / 2)
    assert rtn[0].standing == "baseline (target)" and rtn[1].standing == "baseline (retrain)"
    assert rtn[4].standing.startswith("unranked: utility 9.0 < 43.2")  # 90% of the quantized target's 48
    assert "within 10% of the quantized target's" in ranking.RULE and "damage-controlled recovery" in ranking.RULE


def test_a_known_answer_control_is_labelled_and_never_ranked(tree):
    write(make_result("ga_gdr+inbucket", forget=(40.0, 6.0, 41.0), control=True), tree)
    _, rows = _rows(tree)
    rtn = [r for r in rows if r.quantizer == "rtn-4bit"]
    control = next(r for r in rtn if r.method == "ga_gdr+inbucket")
    assert control.rank is None and control.standing == "control (known answer, not ranked)"
    assert control.forget.mean("controlled_recovery") == pytest.approx(1.0)  # quantized onto the quantized target
    assert [r.method for r in rtn][:3] == ["target", "retrain", "ga_gdr+inbucket"]  # pinned with the baselines
    frame = table.to_frame(rtn).set_index("method")
    assert bool(frame.loc["ga_gdr+inbucket", "control"]) and frame.loc["npo", "rank"] == "1"


def test_the_utility_gate_uses_the_metric_the_task_declares(tmp_path):
    """synth-news declares VerbMem on retain (its tiny models answer no question): a method that keeps
    KnowMem_r but wrecks VerbMem_r is not ranked, and the page names the metric it used."""
    from qubench.results import catalogued_row

    def declared(method, verbmem_r):
        result = make_result(method, forget=(40.0, 10.0, 12.0) if method != "target" else (40.0, 40.0, 41.0))
        result.metrics["verbmem_r"] = catalogued_row("verbmem_r", *verbmem_r, 5.0)  # pre, post, target_pre/post
        result.resolved["task"] = {"name": "synth-news", "utility_metric": "verbmem_r"}
        return result

    for method, verbmem_r in (("target", (70, 66, 70, 66)), ("npo", (68, 64, 70, 66)), ("ga", (8, 6, 70, 66))):
        write(declared(method, verbmem_r), tmp_path)
    _, rows = _rows(tmp_path)
    by_method = {r.method: r for r in rows}
    assert by_method["npo"].utility.name == "verbmem_r" and by_method["npo"].rank == 1
    assert by_method["ga"].rank is None and by_method["ga"].standing.startswith("unranked: utility 6.0 < 59.4")
    assert table.to_frame(rows).set_index("method").loc["ga", "utility_metric"] == "verbmem_r"


def test_seeds_are_averaged_with_the_grids_bootstrap(tree):
    _, rows = _rows(tree)
    ga = next(r for r in rows if r.method == "ga" and r.quantizer == "rtn-4bit")
    assert ga.seeds == [0, 1] and len(ga.runs) == 2
    expected = bootstrap_mean([(20 - 10) / 30, (24 - 10) / 30])
    rec = ga.forget.values["recovery"]
    assert (rec.mean, rec.low, rec.high, rec.n) == (expected.mean, expected.ci_low, expected.ci_high, 2)
    frame = table.to_frame([ga])
    assert frame.loc[0, "recovery_ci"].endswith("(n=2)") and frame.loc[0, "forget_post"] == 22.0
    assert frame.loc[0, "family"] == "rtn" and frame.loc[0, "bits"] == 4 and frame.loc[0, "group_size"] == 64
    assert frame.loc[0, "plugin"] == "qubench 0.1.0" and frame.loc[0, "library"] == "llmcompressor 0.14.0.1"


def test_malformed_and_tampered_files_are_rejected_with_reasons(tree):
    cells = tree / "cells"
    (cells / "not-json.json").write_text("{oops")
    (cells / "not-a-result.json").write_text('{"hello": "world"}')
    (cells / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    edited = json.loads(next(cells.glob("*__npo__rtn-4bit*")).read_text())
    edited["spec"]["seed"] = 7  # the spec no longer hashes to its run_id
    (cells / "spec-edited.json").write_text(json.dumps(edited))
    naive = json.loads(next(cells.glob("*__npo__bnb-int8*")).read_text())
    naive["metrics"]["verbmem_f"]["post"] = 0.0  # gap and recovery left as they were
    naive["spec"]["seed"] = 3
    naive["run_id"] = make_result("npo", "bnb-int8", 3).run_id
    (cells / "naive-tamper.json").write_text(json.dumps(naive))
    nan = json.loads(next(cells.glob("*__ga__rtn-4bit__s0*")).read_text())
    nan["metrics"]["verbmem_f"]["post"] = float("nan")
    nan["spec"]["seed"], nan["run_id"] = 9, make_result("ga", "rtn-4bit", 9).run_id
    (cells / "nan.json").write_text(json.dumps(nan))
    shutil.copy(next(cells.glob("*__ga_klr__rtn-4bit*")), cells / "copy.json")

    board = load_board([tree])
    reasons = {Path(r.path).name: r.reason for r in board.rejected}
    assert reasons["not-json.json"].startswith("not JSON")
    assert reasons["not-a-result.json"].startswith("not a qubench result") and "run_id" in reasons["not-a-result.json"]
    assert reasons["binary.json"].startswith("unreadable")
    assert "is not the hash of the spec" in reasons["spec-edited.json"]
    assert "verbmem_f: gap" in reasons["naive-tamper.json"] and "does not follow" in reasons["naive-tamper.json"]
    assert "non-finite post" in reasons["nan.json"]
    assert sum("duplicate of" in r and "same run_id" in r for r in reasons.values()) == 1  # the copy or its original
    assert len(board.runs) == 12  # the valid files are all still there


def test_reproduce_command_recreates_the_same_spec(tree, monkeypatch):
    from qubench import pipeline
    from qubench.cli import main

    result = make_result("ga_gdr", method_params={"lr": 1e-5, "epochs": 1, "note": "a b;c", "layers": [1, 2]})
    command = detail.reproduce_command(result).splitlines()[-1]
    captured = {}

    def fake_run(spec, *args, **kwargs):
        captured["spec"] = spec
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "run", fake_run)
    args = shlex.split(command)
    assert args[:2] == ["qubench", "run"]
    CliRunner().invoke(main, args[1:])
    assert captured["spec"].run_id() == result.run_id


def test_baseline_rows_show_an_empty_rank_and_a_baseline_label(tree):
    """A missing rank used to reach the page as a null number, which the table draws as "None"."""
    import csv
    import io

    _, rows = _rows(tree)
    frame = table.to_frame(rows)
    rtn = frame[frame.quantizer == "rtn-4bit"]
    assert list(zip(rtn["method"], rtn["rank"])) == [("target", ""), ("retrain", ""), ("npo", "1"), ("ga", "2"),
                                                    ("ga_klr", "")]
    assert list(rtn["standing"][:2]) == ["baseline (target)", "baseline (retrain)"]
    assert not frame["rank"].isna().any() and "None" not in set(frame["rank"])
    shown = list(csv.DictReader(io.StringIO(table.to_csv(frame).decode())))
    assert [(r["method"], r["rank"]) for r in shown if r["quantizer"] == "rtn-4bit"][:3] == [
        ("target", ""), ("retrain", ""), ("npo", "1")]


def test_csv_download_neutralises_spreadsheet_formulas(tree):
    write(make_result("=HYPERLINK(\"http://x\")", "rtn-4bit"), tree)
    _, rows = _rows(tree)
    csv = table.to_csv(table.to_frame(rows)).decode()
    assert "'=HYPERLINK" in csv and "\n=HYPERLINK" not in csv and ",=HYPERLINK" not in csv


def test_the_data_layer_never_imports_submission_code(tmp_path):
    """A submission whose package would leave a marker when imported: loading the board must not."""
    marker = tmp_path / "imported"
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    info = pkg / "evil_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qubench.methods]\nevil = evil_plugin:Evil\n")
    sub = tmp_path / "subs" / "evil"
    standard_tree(sub / "results")
    (sub / "submission.yaml").write_text(
        "name: evil\nauthors: [x]\nlicense: MIT\npackage: {name: evil-plugin, version: '1.0', source: evil-plugin}\n"
        "method: {name: evil, entry_point: 'evil_plugin:Evil'}\npreset: {name: custom, grid: {}}\n")
    code = ("import sys; from pathlib import Path; from qubench.leaderboard.data import load_board; "
            "from qubench.leaderboard.rows import build_rows; from qubench.leaderboard import ranking, table; "
            f"b = load_board([], Path({str(tmp_path / 'subs')!r})); rows = ranking.rank(build_rows(b)); "
            "table.to_frame(rows); assert b.sources[0].name == 'evil' and rows, b; "
            "assert 'evil_plugin' not in sys.modules and 'torch' not in sys.modules; print('ok')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()


# --- the Streamlit page (AppTest) ----------------------------------------------------------------------

def _app(monkeypatch, results: Path, submissions: Path | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("QUBENCH_LEADERBOARD_RESULTS", str(results))
    monkeypatch.setenv("QUBENCH_LEADERBOARD_SUBMISSIONS", str(submissions or results / "no-submissions"))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def _table(at):
    return at.dataframe[0].value


def test_page_loads_and_filters_change_the_rows(tree, monkeypatch):
    (tree / "cells" / "broken.json").write_text("[1, 2")
    at = _app(monkeypatch, tree)
    assert at.title[0].value == "qubench leaderboard"
    assert any("How rows are ranked" in i.value for i in at.info)
    assert len(_table(at)) == 10  # 12 runs: ga's two seeds make one row
    rejected = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    assert list(rejected["path"]) == ["grid/cells/broken.json"] and rejected["reason"][0].startswith("not JSON")

    at.multiselect(key="filter_family").set_value(["rtn"]).run()
    assert set(_table(at)["family"]) == {"rtn"} and len(_table(at)) == 5
    at.multiselect(key="filter_methods").set_value(["npo"]).run()
    assert list(_table(at)["method"]) == ["target", "retrain", "npo"]  # baselines stay pinned
    at.multiselect(key="filter_family").set_value([]).run()
    at.multiselect(key="filter_bits").set_value([8.0]).run()
    assert set(_table(at)["quantizer"]) == {"bnb-int8"}
    at.checkbox(key="filter_verified").check().run()
    assert len(_table(at)) == 0  # a local results folder is not verified


def test_detail_page_opens_with_spec_diagnostics_command_and_download(tree, monkeypatch):
    at = _app(monkeypatch, tree)
    # the method x quantizer heatmap, pre/post, recovery by quantizer, utility vs forgetting
    assert len(at.get("vega_lite_chart")) == 4
    choice = at.selectbox(key="detail_choice")
    ga = next(o for o in choice.options if " · ga · rtn-4bit · seed 1" in o)
    choice.select(ga).run()
    at.button(key="open_detail").click().run()
    assert not at.exception
    assert at.query_params["result"][0].startswith("grid/cells/synth-news__ga__rtn-4bit__s1__") or \
        str(at.query_params["result"]).startswith("grid/cells/synth-news__ga__rtn-4bit__s1__")
    assert at.title[0].value == "Result"
    assert any(c.value.splitlines()[-1].startswith("qubench run --task synth-news --method ga") for c in at.code)
    assert len(at.json) >= 4  # spec, resolved, environment, unlearning/timings/hashes
    diag = next(d.value for d in at.dataframe if "diagnostic" in d.value.columns)
    assert "mean quantization step" in set(diag["diagnostic"])
    assert len(at.get("download_button")) == 1
    assert any(t.value.startswith("separated: the target remembers the forget set measurably more than the "
                                  "retrain model (verbmem_f 40.0 vs 5.0") for t in at.text)
    at.button(key="back").click().run()
    assert at.title[0].value == "qubench leaderboard"


def test_file_content_is_never_rendered_as_markdown_or_html(tree, monkeypatch):
    write(make_result(HOSTILE, "rtn-4bit"), tree)
    at = _app(monkeypatch, tree)
    assert HOSTILE in set(_table(at)["method"])  # shown, as text in the table
    rendered = [e.value for kind in ("markdown", "caption", "title", "header", "subheader", "info", "warning",
                                     "error", "success") for e in getattr(at, kind)]
    assert not any("onerror" in text or "example.invalid" in text for text in rendered)
    assert len(at.get("html")) == 0
    at.selectbox(key="detail_choice").select(next(o for o in at.selectbox(key="detail_choice").options
                                                  if HOSTILE in o)).run()
    at.button(key="open_detail").click().run()
    rendered = [e.value for kind in ("markdown", "caption", "title", "header", "subheader") for e in getattr(at, kind)]
    assert not any("onerror" in text for text in rendered)
    assert any(HOSTILE in t.value for t in at.text)  # the title line is plain text


def test_shipped_reference_is_marked_as_the_projects_own(tree, tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ship_reference", REPO / "leaderboard" / "ship_reference.py")
    ship_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship_reference)
    cells = sorted(p.name for p in (tree / "cells").glob("*.json"))
    (tree / "grid.json").write_text(json.dumps({"spec": {"tasks": ["synth-news"]}, "cells": cells}))
    dest = tmp_path / "reference"
    command = "qubench grid --preset default --seeds 1 --results X"
    manifest = ship_reference.ship(tree, command, dest)
    assert manifest["cells"] == {"expected": 12, "ok": 12, "failed": 0, "missing": 0}
    assert manifest["produced_by"] == [{"qubench_version": "0.1.0", "git_commit": "0123456789abcdef",
                                        "git_dirty": False, "cells": 12}]
    board, rows = _rows(dest)
    assert board.sources[0].kind == "reference" and all(r.badge == "reference" and r.verified for r in rows)
    at = _app(monkeypatch, dest)
    assert any(c.value == command for c in at.code)
    at.checkbox(key="filter_verified").check().run()
    assert len(_table(at)) == 10  # the project's own results count as verified


def test_the_reference_grid_shipped_in_the_repository_is_complete_and_intact():
    """What a fresh clone's `qubench leaderboard` shows: the project's own grid, every file as shipped."""
    import yaml

    from qubench.submissions import integrity

    folder = REPO / "leaderboard" / "reference"
    manifest = yaml.safe_load((folder / "MANIFEST.yaml").read_text())
    assert manifest["command"].startswith("qubench grid --preset default")
    shipped = {k: v for k, v in integrity.folder_digests(folder).items() if k != "MANIFEST.yaml"}
    assert shipped == manifest["sha256"]  # nothing edited after shipping
    assert all(not p["git_dirty"] and p["git_commit"] for p in manifest["produced_by"])
    board, rows = _rows(folder)
    assert not board.rejected and board.sources[0].kind == "reference"
    assert len(board.runs) == manifest["cells"]["ok"] == manifest["cells"]["expected"]
    seeds = manifest["grid"]["seeds"]
    assert len(seeds) == 3 and len(rows) * 3 == manifest["cells"]["expected"]  # a row: one cell over 3 seeds
    assert all(r.seeds == seeds for r in rows)
    ranked = [r for r in rows if r.rank is not None]
    assert ranked and all(r.utility is not None and r.utility.name == "verbmem_r" for r in ranked)
    assert {r.method for r in rows if r.baseline} == {"target", "retrain"}
    # Every ranked row carries both recoveries with an interval, and a verdict from the controlled one.
    for r in ranked:
        for field in ("recovery", "controlled_recovery"):
            stat = r.forget.values[field]
            assert stat.low is not None and stat.low <= stat.mean <= stat.high, (r.method, r.quantizer, field)
        assert r.forget.verdict in ("recovers", "does not recover", "undetermined")
    # The known-answer control is there, labelled, never ranked, and shows what it must: all of its
    # forgetting back under the scheme it hides from (bit-identical to the quantized target), none at 8 bits.
    control = {r.quantizer: r for r in rows if r.control}
    assert control and all(r.method == "ga_gdr+inbucket" and r.rank is None for r in control.values())
    hidden = control["rtn-4bit"].forget
    assert hidden.mean("controlled_recovery") == pytest.approx(1.0) and hidden.verdict == "recovers"
    assert hidden.mean("post") == hidden.mean("target_post")
    assert control["rtn-8bit"].forget.verdict == "does not recover"


def test_cli_leaderboard_rejects_a_missing_results_folder(tmp_path):
    from qubench.cli import main

    res = CliRunner().invoke(main, ["leaderboard", "--results", str(tmp_path / "absent")])
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())


# --- a real browser ----------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: The page has rendered its table and at least one chart.
RENDERED = ("document.querySelector('[data-testid=stDataFrame]') && "
            "document.querySelector('.vega-embed canvas, .vega-embed svg')")


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the leaderboard exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the leaderboard did not answer on {url} within {timeout:.0f} s")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                            ".ci/run installs it")
def test_browser_screenshot_of_qubench_leaderboard(tmp_path):
    """`qubench leaderboard` with its defaults (the shipped reference grid and submissions/) on loopback,
    loaded by headless Chromium until the table and a chart have rendered; the screenshot is saved
    (to $QUBENCH_SCREENSHOT when set) and must not be a blank page."""
    from browser import free_port, screenshot, stop

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qubench", "leaderboard", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    shot = Path(os.environ.get("QUBENCH_SCREENSHOT") or tmp_path / "leaderboard.png")
    try:
        _wait_for(f"http://127.0.0.1:{port}/_stcore/health", proc)
        ready = screenshot(CHROMIUM, f"http://127.0.0.1:{port}/", shot, RENDERED, tmp_path / "profile")
    finally:
        stop(proc, timeout=30)
    data = shot.read_bytes()
    assert _png_size(data) == (1400, 2000)
    assert ready, f"the table and a chart did not render in time (screenshot: {shot})"
    assert len(data) > 60_000, f"screenshot is only {len(data)} bytes: the page did not render"
