"""The package installs as a package: a wheel carries the lm-eval task suite, and a non-editable install
runs a micro benchmark from outside any checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = ("qubench_muse", "qubench_classify")


def _copy_checkout(dest: Path) -> Path:
    """The repository's sources without build outputs (building in place would leave qubench.egg-info
    in the checkout, which then shadows the installed metadata)."""
    top_level = {".git", ".venv", "build", "dist", "results", ".pytest_cache", ".qhome", "leaderboard",
                 "submissions", "benchmarks"}

    def junk(folder: str, names: list[str]) -> set[str]:
        here = Path(folder) == REPO
        return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (here and n in top_level)}

    shutil.copytree(REPO, dest, symlinks=True, ignore=junk)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _copy_checkout(tmp_path_factory.mktemp("src") / "qubench")
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(src)], check=True, capture_output=True, text=True)
    [built] = dist.glob("qubench-*.whl")
    return built


def test_the_wheel_carries_the_task_yamls_and_their_utils(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = REPO / "qubench" / "lm_eval_tasks"
    for folder in SUITE:
        expected = {f"qubench/lm_eval_tasks/{folder}/{p.name}" for p in (packaged / folder).iterdir()
                    if p.suffix in (".yaml", ".py")}
        assert f"qubench/lm_eval_tasks/{folder}/utils.py" in expected and len(expected) >= 5
        assert expected <= names, sorted(expected - names)
    # The repository's tasks/ is the same suite (a link), so `lm_eval --include_path tasks/` reads it.
    assert (REPO / "tasks").resolve() == packaged.resolve()


@pytest.mark.slow
def test_a_non_editable_install_runs_the_micro_benchmark(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # qubench's dependencies come from this environment (a path line; its .pth files, among them the
    # editable install's finder, are not processed there), qubench itself from the wheel.
    (site / "_qubench_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, text=True)
    work = tmp_path / "elsewhere"  # outside every checkout
    work.mkdir()
    env = {**os.environ, "QUBENCH_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("QUBENCH_TASKS_DIR", None)
    where = subprocess.run([str(python), "-c", "import qubench.evaluation.evaluate as e; print(e.tasks_dir())"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(site) and (Path(where) / "qubench_muse" / "utils.py").is_file()

    cmd = [str(venv / "bin" / "qubench"), "run", "--task", "synth-news", "--task-param", "size=micro",
           "--method-param", "epochs=1", "--method-param", "batch_size=4", "--limit", "2", "--json"]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "ok" and result["metrics"]["verbmem_f"]["pre"] is not None
    assert result["environment"]["git"] == {"commit": None, "dirty": None}  # installed, not a checkout

    board = subprocess.run([str(venv / "bin" / "qubench"), "leaderboard"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    said = " ".join(board.stderr.split())
    assert board.returncode == 2 and "ship with the qubench repository" in said, said
