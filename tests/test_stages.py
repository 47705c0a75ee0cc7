"""Stage identities: content-true fingerprints, one object per artifact kind, and the cache listing."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qubench import fingerprint, store
from qubench.cli import main
from qubench.stages import STAGE_KINDS, Download, Evaluation, step_is_group_shared

PACKAGE = Path(__file__).resolve().parents[1] / "qubench"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _write_big(path: Path, size: int, tail: bytes) -> None:
    """A sparse file of `size` bytes of zeros whose last bytes are `tail`."""
    with open(path, "wb") as fh:
        fh.truncate(size - len(tail))
        fh.seek(size - len(tail))
        fh.write(tail)


def test_files_over_64_mib_that_differ_only_near_the_end_get_different_fingerprints(home, tmp_path):
    size = 65 << 20
    for name, tail in (("a", b"layer.31 weights: 1"), ("b", b"layer.31 weights: 2")):
        (tmp_path / name).mkdir()
        _write_big(tmp_path / name / "model.safetensors", size, tail)
        (tmp_path / name / "config.json").write_text("{}")
    assert fingerprint.file_digest(tmp_path / "a" / "model.safetensors") != \
        fingerprint.file_digest(tmp_path / "b" / "model.safetensors")
    assert fingerprint.model_fingerprint(tmp_path / "a") != fingerprint.model_fingerprint(tmp_path / "b")


def test_digests_are_remembered_until_the_file_changes(home, tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 1000)
    first = fingerprint.file_digest(path)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(str(p)), real_open(p, *a, **k))[1])
    assert fingerprint.file_digest(path) == first and str(path) not in reads  # from the memo, file not read
    monkeypatch.undo()
    # Rewritten in place with the same size (say, a zeroed tensor): new mtime/ctime, hashed anew.
    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert fingerprint.file_digest(path) != first
    assert len(list((home / fingerprint.MEMO_KIND).glob("*.json"))) == 1


def test_side_files_do_not_change_a_model_fingerprint(home, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(b"abc")
    before = fingerprint.model_fingerprint(tmp_path / "m")
    (tmp_path / "m" / "qubench_unlearn_log.json").write_text('{"seconds": 3.2}')
    assert fingerprint.model_fingerprint(tmp_path / "m") == before
    (tmp_path / "m" / "weights.bin").write_bytes(b"abd")
    assert fingerprint.model_fingerprint(tmp_path / "m") != before


def test_every_stage_kind_has_a_folder_a_step_and_a_description():
    assert list(STAGE_KINDS) == ["tasks", "downloads", "models", "unlearned", "merged", "hinge_logits",
                                 "hinge_delta", "quantized", "evals"]
    for kind, cls in STAGE_KINDS.items():
        assert cls.kind == kind and cls.description and cls.step in ("prepare", "unlearn", "quantize", "evaluate")
    # A failure in a stage every cell of a grid group shares fails the group; others fail one cell.
    assert step_is_group_shared("prepare") and step_is_group_shared("unlearn")
    assert not step_is_group_shared("quantize") and not step_is_group_shared("evaluate")
    assert step_is_group_shared("check")  # an audit's input checks hold for every quantizer of its group


def test_no_module_outside_the_stages_spells_a_cache_folder():
    """Every cache path comes from a stage object: no other module joins QUBENCH_HOME with a kind name."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "stages" in path.parts or path.name in ("store.py", "fingerprint.py") or "lm_eval_tasks" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and node.right.value in STAGE_KINDS and "home()" in ast.unparse(node.left)):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_file_stages_are_written_atomically_and_once(home):
    calls = []

    def fetch(url, out: Path):
        calls.append(url)
        out.write_text("id,tweet,label\n")

    stage = Download("https://example.org/data/Constraint_Train.csv", fetch)
    assert not stage.exists()
    path = stage.get()
    assert path.name == "Constraint_Train.csv" and path.read_text() == "id,tweet,label\n"
    assert Download(stage.url, fetch).get() == path and calls == [stage.url]
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["Constraint_Train.csv"]

    def broken(url, out: Path):
        out.write_text("half a file")
        raise OSError("connection reset")

    failing = Download("https://example.org/other.csv", broken)
    with pytest.raises(OSError):
        failing.get()
    assert not failing.exists() and not [p for p in failing.path().parent.iterdir() if not p.name.startswith(".")]


def test_the_evaluation_key_covers_the_suite_actually_read(home, tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    from qubench.evaluation.evaluate import packaged_tasks_dir
    from qubench.stages.evaluation import EvalSetup

    class Engine:
        name = "hf"

        def params(self):
            return {"batch_size": 4}

        def version(self):
            return "test"

    class Data:
        def file_hashes(self):
            return {"raw/forget.txt": "0" * 64}

    key = lambda: Evaluation(EvalSetup(Engine(), Data(), tmp_path, None, "float32"), tiny_model_dir, "m",
                             loader=None).key()
    packaged = key()
    suite = tmp_path / "suite"
    shutil.copytree(packaged_tasks_dir(), suite, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("QUBENCH_TASKS_DIR", str(suite))
    assert key() == packaged  # an identical copy of the suite measures the same
    yaml = suite / "qubench_muse" / "_verbmem_template.yaml"
    yaml.write_text(yaml.read_text().replace("max_gen_toks: 128", "max_gen_toks: 64"))
    assert key() != packaged  # an edited override suite is never served stale measurements


def test_cache_ls_lists_every_kind_a_run_creates(home):
    res = CliRunner().invoke(main, ["cache", "ls", "--json"])
    assert res.exit_code == 0, res.output
    kinds = [k["kind"] for k in json.loads(res.stdout)["kinds"]]
    assert kinds == [*STAGE_KINDS, "hashes", "logs", "unsaved_results"]
    assert all(k["description"] for k in json.loads(res.stdout)["kinds"])
    res = CliRunner().invoke(main, ["cache", "clean", "--kind", "hinge_logits", "--dry-run"])
    assert res.exit_code == 0, res.output


def test_retrain_model_without_model_is_refused_before_any_work(home, tmp_path):
    res = CliRunner().invoke(main, ["run", "--task-param", "size=micro", "--retrain-model", str(tmp_path / "nope"),
                                    "--results", str(tmp_path / "results")])
    said = " ".join(res.output.split())  # rich wraps long messages
    assert res.exit_code == 2
    assert "--retrain-model was given without --model" in said and "trains its own target" in said
    assert not (home / "tasks").exists() and not (tmp_path / "results").exists()  # nothing was built or recorded
