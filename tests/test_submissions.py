"""Third-party submissions: the worked example package is pip-installed (into a scratch folder on
sys.path), submitted on a two-cell micro grid, validated, verified by re-running one cell (the
record goes to the maintainers' folder), and shown on the leaderboard with a per-cell badge;
tampered, forged and malformed submissions are rejected with their reasons."""

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
from qubench.submissions import integrity, schema, verification
from qubench.submissions.validate import validate

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "submissions" / "example-random-relabel"
NAME = "example-random-relabel"
MICRO_GRID = {"tasks": [{"name": "synth-news", "params": {"size": "micro"}}], "methods": ["random_relabel"],
              "quantizers": [{"name": "rtn-4bit", "params": {"group_size": 64}}, "none"], "seeds": [0],
              "eval_limit": 2}
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
    """`qubench submit` of the example on a two-cell grid, into a copy of the example's package folder."""
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
    cells = sorted((submitted / "results" / "cells").glob("*.json"))
    assert len(cells) == 2 and sub.results_sha256 == integrity.folder_digests(submitted / "results")
    for cell in cells:
        result, _, reason = integrity.read_result(cell)
        assert reason is None and result.status == "ok" and result.spec.method.name == "random_relabel"


def test_validate_installs_the_package_and_accepts_the_submission(submitted):
    res = _invoke("validate", submitted)
    assert res.exit_code == 0, res.output
    assert "valid" in res.output


def _verifications(submitted: Path) -> Path:
    """The maintainers' folder of records, outside every submission folder."""
    return submitted.parent.parent / "verifications"


@pytest.fixture(scope="module")
def verified(submitted) -> Path:
    """`qubench verify --cells 1` on the submission (the plugin is importable already: --no-install)."""
    res = _invoke("verify", submitted, "--cells", "1", "--seed", "0", "--no-install",
                  "--verifications", _verifications(submitted))
    assert res.exit_code == 0, res.output
    text = _text(res)
    assert "verified (1 of 2 cells re-run" in text
    assert "a single tampered cell would have been caught with probability 1/2 = 50%; re-run 2 cells for 90%" in text
    assert not list(submitted.glob("verif*")), "verify must not write into the submission folder"
    return submitted


def test_verify_records_the_rerun_outside_the_folder_and_the_board_badges_each_cell(verified, monkeypatch):
    submitted = verified
    record = schema.load_verification(_verifications(submitted), NAME)
    assert record.verified and record.cells_in_grid == 2 and len(record.cells) == 1
    assert record.detection_probability == pytest.approx(0.5)
    (cell,) = record.cells
    assert cell.matches and cell.max_deviation == 0.0 and cell.error is None
    # The draw follows from the nonce and the digest of the submission: anyone can recompute it.
    digest = verification.submission_digest(submitted)
    assert record.selection.nonce == "0" and record.selection.submission_digest == digest
    assert record.selection.seed == verification.selection_seed("0", digest)
    from qubench.grid.plan import all_cells, expand
    from qubench.grid.spec import parse_spec

    grid_cells = all_cells(expand(parse_spec(schema.load_submission(submitted).preset.grid)))
    assert [c.id for c in verification.choose(grid_cells, 1, record.selection.seed)] == [cell.cell]
    # The record carries the re-run's own numbers, equal to the submitted ones here (same machine, same code).
    stored, _, _ = integrity.read_result(submitted / cell.result_file)
    assert cell.rerun == verification.measured(stored.metrics)
    assert cell.submitted_sha256 == integrity.file_sha256(submitted / cell.result_file)

    board = load_board([], submitted.parent, _verifications(submitted))
    badges = {run.result.spec.quant.name: run.badge for run in board.runs}
    rerun_quant = next(r.result.spec.quant.name for r in board.runs if r.result.run_id == cell.run_id)
    assert badges == {q: "verified" if q == rerun_quant else "submitted" for q in ("rtn-4bit", "none")}
    (source,) = board.sources
    assert source.badge == "submitted" and source.note.startswith("1 of 2 cells verified")
    assert "caught with probability 50%" in source.note
    rows = {r.quantizer.split(" ")[0]: r for r in ranking.rank(build_rows(board))}  # "rtn-4bit (group_size=64)"
    assert rows[rerun_quant].badge == "verified" and rows[rerun_quant].verified
    assert rows[rerun_quant].plugin == "qubench-random-relabel 0.1.0"
    assert load_board([], submitted.parent).runs[0].badge == "submitted"  # no records folder: nothing verified

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("QUBENCH_LEADERBOARD_RESULTS", str(submitted / "no-reference"))
    monkeypatch.setenv("QUBENCH_LEADERBOARD_SUBMISSIONS", str(submitted.parent))
    monkeypatch.setenv("QUBENCH_LEADERBOARD_VERIFICATIONS", str(_verifications(submitted)))
    at = AppTest.from_file(str(REPO / "leaderboard" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert sorted(at.dataframe[0].value["badge"]) == ["submitted", "verified"]
    sources = next(d.value for d in at.dataframe if "why" in d.value.columns)
    assert sources["why"][0].startswith("1 of 2 cells verified")
    at.checkbox(key="filter_verified").check().run()
    shown = at.dataframe[0].value
    assert list(shown["method"]) == ["random_relabel"] and list(shown["badge"]) == ["verified"]


def _tampered_copy(submitted: Path, tmp_path: Path, quant: str) -> tuple[Path, Path]:
    """A copy of the submission whose cell `quant` has its utility numbers raised by 20 points, gap and
    recovery recomputed so that the file is self-consistent."""
    copy = tmp_path / "subs" / NAME
    shutil.copytree(submitted, copy)
    cell = next(p for p in (copy / "results" / "cells").glob("*.json") if f"__{quant}__" in p.name)
    data = json.loads(cell.read_text())
    m = data["metrics"]["knowmem_r"]
    m.update(catalogued_row("knowmem_r", m["pre"] + 20, m["post"] + 20, m["target_pre"], m["target_post"], m["retrain"]).model_dump())
    cell.write_text(json.dumps(data, indent=2))
    return copy, cell


def _rerun_quant(submitted: Path) -> str:
    (cell,) = schema.load_verification(_verifications(submitted), NAME).cells
    return cell.cell.split("/")[2]


def test_tampered_metric_is_caught_by_validate_and_by_verify(verified, tmp_path, plugin, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(plugin))  # validate --no-install probes this environment
    copy, cell = _tampered_copy(verified, tmp_path, _rerun_quant(verified))
    board = load_board([], copy.parent, _verifications(verified))
    tampered = next(r for r in board.runs if r.path.endswith(cell.name))
    assert tampered.badge == "submitted" and tampered.badge_note == "re-run, but its result file changed after verification"

    res = _invoke("validate", copy, "--no-install")
    assert res.exit_code == 1
    assert "content differs from the sha256 recorded at submit time" in _text(res)

    # Someone who also rewrites the digests (anyone can) gets past validate, but not past the re-run's
    # numbers: the board compares the file with them again, and a new verify fails.
    sub = schema.load_submission(copy)
    sub.results_sha256 = integrity.folder_digests(copy / "results")
    schema.dump_yaml(sub, copy / schema.SUBMISSION_FILE)
    assert validate(copy, install=False) == []
    record_path = schema.verification_path(_verifications(verified), NAME)
    forged = schema.load_verification(_verifications(verified), NAME)
    forged.cells[0].submitted_sha256 = integrity.file_sha256(cell)  # even a record pointing at the new file
    maintainers = tmp_path / "verifications"
    schema.dump_yaml(forged, schema.verification_path(maintainers, NAME))
    tampered = next(r for r in load_board([], copy.parent, maintainers).runs if r.path.endswith(cell.name))
    assert tampered.badge == "submitted" and tampered.badge_note.startswith("re-run and did not match: knowmem_r.post")

    # A nonce whose draw is the tampered cell (the rule is public: nonce + digest -> seed -> cells).
    from qubench.grid.plan import all_cells, expand
    from qubench.grid.spec import parse_spec

    grid_cells = all_cells(expand(parse_spec(sub.preset.grid)))
    digest = verification.submission_digest(copy)
    nonce = next(n for n in range(100) if verification.choose(
        grid_cells, 1, verification.selection_seed(str(n), digest))[0].spec.run_id() in cell.name)
    res = _invoke("verify", copy, "--cells", "1", "--seed", nonce, "--no-install", "--verifications", maintainers)
    assert res.exit_code == 1
    text = _text(res)
    assert "NOT verified" in text and "knowmem_r.pre: submitted" in text and "> tolerance 1" in text
    assert "caught with probability 1/2 = 50%" in text
    record = schema.load_verification(maintainers, NAME)
    assert not record.verified and [c.matches for c in record.cells] == [False]
    source = load_board([], copy.parent, maintainers).sources[0]
    assert source.badge == "submitted" and source.note.startswith("0 of 2 cells verified")
    assert record_path.exists()  # the original record is untouched


def test_a_verification_claim_inside_the_submission_is_refused_and_never_shown(verified, tmp_path, plugin,
                                                                                monkeypatch):
    """The forged badge: a submitter writes a verification record into their own folder (with digests
    recomputed). validate fails it and the board ignores it."""
    monkeypatch.setenv("PYTHONPATH", str(plugin))
    copy = tmp_path / "subs" / NAME
    shutil.copytree(verified, copy)
    record = schema.load_verification(_verifications(verified), NAME)
    schema.dump_yaml(record, copy / "verification.yaml")
    (copy / "results" / "verified.json").write_text('{"verified": true}')
    sub = schema.load_submission(copy)
    sub.results_sha256 = integrity.folder_digests(copy / "results")
    schema.dump_yaml(sub, copy / schema.SUBMISSION_FILE)
    problems = validate(copy, install=False)
    claims = [p for p in problems if "cannot carry verification claims" in p]
    assert [c.split(":")[0] for c in claims] == ["results/verified.json", "verification.yaml"]
    assert "leaderboard/verifications/" in claims[0]
    board = load_board([], copy.parent)  # no maintainers' records: the submitter's own claim counts for nothing
    assert {r.badge for r in board.runs} == {"submitted"} and board.sources[0].badge == "submitted"


def test_detection_probability_and_cells_needed_are_hand_computed():
    assert verification.detection_probability(1, 6) == pytest.approx(1 / 6)
    assert verification.detection_probability(2, 6, tampered=2) == pytest.approx(1 - 6 / 15)  # 1 - C(4,2)/C(6,2)
    assert verification.detection_probability(6, 6) == 1.0 and verification.detection_probability(0, 6) == 0.0
    assert verification.cells_for(0.9, 6) == 6 and verification.cells_for(0.5, 6) == 3
    assert verification.cells_for(0.9, 121) == 109


def test_validate_lists_every_problem_at_once(submitted, tmp_path, plugin, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(plugin))
    copy = tmp_path / "renamed"
    shutil.copytree(submitted, copy)
    sub = schema.load_submission(copy)
    sub.package.version = "9.9.9"
    schema.dump_yaml(sub, copy / schema.SUBMISSION_FILE)
    cell = sorted((copy / "results" / "cells").glob("*.json"))[0]
    cell.unlink()
    (copy / "results" / "cells" / "junk.json").write_text("{not json")
    problems = validate(copy, install=False)
    joined = "\n".join(problems)
    assert "differs from the folder name 'renamed'" in joined
    assert "not from the declared qubench-random-relabel 9.9.9" in joined
    assert "junk.json: not JSON" in joined
    assert "grid incomplete: 1 of 2 cells have no ok result" in joined
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


def test_the_shipped_verification_record_verifies_the_cells_it_reran():
    """leaderboard/verifications/example-random-relabel.yaml, written by `qubench verify --cells 3` on the
    shipped example: its cells follow from its nonce and the example's digest, and the board finds
    exactly those cells verified (the other three stay submitted)."""
    from qubench.grid.plan import all_cells, expand
    from qubench.grid.spec import parse_spec

    verifications = REPO / "leaderboard" / "verifications"
    record = schema.load_verification(verifications, NAME)
    assert record is not None and record.verified and record.cells_in_grid == 6 and len(record.cells) == 3
    assert record.selection.submission_digest == verification.submission_digest(EXAMPLE)
    assert record.selection.seed == verification.selection_seed(record.selection.nonce,
                                                                record.selection.submission_digest)
    grid_cells = all_cells(expand(parse_spec(schema.load_submission(EXAMPLE).preset.grid)))
    assert [c.id for c in verification.choose(grid_cells, 3, record.selection.seed)] == [c.cell for c in record.cells]
    board = load_board([], REPO / "submissions", verifications)
    source = board.source(NAME)
    assert source.note.startswith("3 of 6 cells verified") and "probability 50%" in source.note
    verified = sorted(r.result.run_id for r in board.runs if r.source == NAME and r.badge == "verified")
    assert verified == sorted(c.run_id for c in record.cells)


def test_submit_refuses_built_in_and_composed_methods(tmp_path):
    res = _invoke("submit", "--method", "ga", "--out", tmp_path)
    assert res.exit_code == 2 and "built into qubench" in _text(res)
    res = _invoke("submit", "--method", "ga_gdr+lora", "--out", tmp_path)
    assert res.exit_code == 2 and "composition" in _text(res)
    assert not list(tmp_path.iterdir())
