"""`qubench grid`: specs and presets, planning, locks, kill-and-resume, failure isolation, the
process-pool and Ray executors, aggregation and the cache commands.

The grids here are micro (tiny task, 1 epoch, 2 probes): ~10 s per computed cell on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qubench import manifest, registry, results, store
from qubench.cli import main
from qubench.errors import ConfigError
from qubench.grid import aggregate as agg
from qubench.grid.plan import expand
from qubench.grid.spec import GridSpec, build_spec, default_preset, paper_preset, parse_spec

MICRO_TASK = {"name": "synth-news", "params": {"size": "micro"}}
MICRO_METHOD = {"epochs": 1, "batch_size": 4}
MICRO_QUANTS = [{"name": "rtn-4bit", "params": {"group_size": 64}}, {"name": "rtn-8bit", "params": {"group_size": 64}}]


def micro_spec(path: Path, methods: list, quants=MICRO_QUANTS, seeds=(0,)) -> Path:
    spec = {"tasks": [MICRO_TASK], "methods": methods, "quantizers": quants, "seeds": list(seeds), "eval_limit": 2}
    path.write_text(yaml.safe_dump(spec))
    return path


def grid(home: Path, *args: str, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(home))
    return CliRunner().invoke(main, ["grid", *args])


def cell_metrics(results_dir: Path) -> dict:
    out = {}
    for path in (results_dir / "cells").glob("*.json"):
        r = results.load(path)
        out[(r.spec.task.name, r.spec.method.name, r.spec.quant.name, r.spec.seed)] = (
            r.status, {k: v.model_dump() for k, v in r.metrics.items()})
    return out


# --- spec, presets, plan: no training --------------------------------------------------------------

def test_spec_accepts_names_params_labels_and_rejects_mistakes():
    spec = parse_spec({"tasks": ["synth-news"], "methods": ["ga_gdr", {"name": "ga", "label": "ga-fast",
                                                                         "params": {"lr": 1e-4}}],
                       "quantizers": ["rtn-4bit"], "seeds": [0, 1]})
    assert [m.id for m in spec.methods] == ["ga_gdr", "ga-fast"] and spec.methods[1].params == {"lr": 1e-4}
    with pytest.raises(ConfigError, match="duplicate entries"):
        parse_spec({"tasks": ["synth-news"], "methods": ["ga", "ga"], "quantizers": ["rtn-4bit"]})
    with pytest.raises(ConfigError, match="quantisers"):
        parse_spec({"tasks": ["synth-news"], "methods": ["ga"], "quantisers": ["rtn-4bit"]})
    with pytest.raises(ConfigError, match="duplicate seeds"):
        parse_spec({"tasks": ["synth-news"], "methods": ["ga"], "quantizers": ["rtn-4bit"], "seeds": [1, 1]})


def test_presets_and_flag_overrides():
    default = default_preset()
    builtin_methods = {i.name for i in registry.describe("methods") if i.package == "qubench"}
    # every built-in method and the known-answer control
    assert {m.name for m in default.methods} == builtin_methods | {"ga_gdr+inbucket"} and default.seeds == [0, 1, 2]
    assert {"rtn-4bit", "gptq-4bit", "awq-4bit", "none"} <= {q.name for q in default.quantizers}
    assert [t.name for t in default.tasks] == ["synth-news"]
    paper = paper_preset()
    assert [t.name for t in paper.tasks] == ["muse-news", "muse-books"] and "bnb-fp4" in [q.name for q in paper.quantizers]
    one = build_spec(preset="default", seeds=1, task_params={"size": "micro"}, eval_limit=2)
    assert one.seeds == [0] and one.tasks[0].params == {"size": "micro"} and one.eval_limit == 2
    assert one.methods == default.methods
    flags = build_spec(methods=("ga", "npo"), quantizers=("rtn-8bit",), method_params={"lr": 2e-5})
    assert [(m.name, m.params) for m in flags.methods] == [("ga", {"lr": 2e-5}), ("npo", {"lr": 2e-5})]


def test_plan_keeps_cells_sharing_an_unlearned_model_together():
    spec = GridSpec(tasks=[MICRO_TASK], methods=["ga", "npo"], quantizers=["rtn-4bit", "rtn-8bit", "none"],
                    seeds=[0, 1])
    groups = expand(spec)
    assert [g.id for g in groups] == ["synth-news/ga/s0", "synth-news/npo/s0", "synth-news/ga/s1", "synth-news/npo/s1"]
    assert [c.quant for c in groups[0].cells] == ["rtn-4bit", "rtn-8bit", "none"]
    assert len({c.spec.run_id() for g in groups for c in g.cells}) == 12


def test_bootstrap_is_seeded_and_verdicts_need_an_interval_on_one_side_of_the_margin():
    a = agg.bootstrap_mean([0.3, 0.5, 0.4], seed=0)
    assert a == agg.bootstrap_mean([0.3, 0.5, 0.4], seed=0)
    assert a.mean == pytest.approx(0.4) and 0.3 <= a.ci_low < a.mean < a.ci_high <= 0.5 and a.n == 3
    assert agg.verdict(a) == "recovers"  # the whole interval at or above a tenth
    assert agg.verdict(agg.bootstrap_mean([-0.1, -0.3, -0.2])) == "does not recover"
    # significantly above zero, but all of it below the margin: a negligible share comes back
    assert agg.verdict(agg.bootstrap_mean([0.02, 0.05, 0.03])) == "does not recover"
    assert agg.RECOVERY_MARGIN == 0.1
    assert agg.verdict(agg.bootstrap_mean([-0.1, 0.3, 0.2])) == "undetermined"
    single = agg.bootstrap_mean([0.5])
    assert single.ci_low is None and agg.verdict(single) == "undetermined"


# --- locks and temporaries -------------------------------------------------------------------------

def test_parallel_builders_of_one_artifact_build_it_once(tmp_path):
    calls = []

    def build(tmp):
        calls.append(1)
        time.sleep(0.5)
        (tmp / "w").write_text("x")

    threads = [threading.Thread(target=store.cached_dir, args=(tmp_path / "stage" / "a", build)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (tmp_path / "stage" / "a" / "w").read_text() == "x"


def test_lock_of_a_killed_process_does_not_block_and_its_leftovers_are_removed(tmp_path):
    artifact = tmp_path / "stage" / "a"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import tempfile, time
        from pathlib import Path
        from qubench import store
        with store.locked(Path({str(artifact)!r})):
            Path(tempfile.mkdtemp(prefix=".a." + store._temp_tag() + ".", dir={str(artifact.parent)!r}))
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with store.locked(artifact, blocking=False) as got:
            assert not got  # held by a live process
        (leftover,) = [p for p in artifact.parent.iterdir() if p.name.startswith(".a.")]
        assert not store.is_stale_temporary(leftover)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert store.is_stale_temporary(leftover)
    store.cached_dir(artifact, lambda tmp: (tmp / "w").write_text("x"))  # neither blocks nor keeps the leftover
    assert not leftover.exists() and (artifact / "w").exists()


def test_cache_ls_and_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path))
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "abc.json").write_text("{}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "unlearned" / f".ga-123.tmp-{store.stable_hash(socket.gethostname(), 8)}-{dead.stdout.strip()}.x"
    stale.mkdir(parents=True)
    (stale / "weights").write_bytes(b"0" * 1000)
    res = CliRunner().invoke(main, ["cache", "ls", "--json"])
    kinds = {k["kind"]: k for k in json.loads(res.stdout)["kinds"]}
    assert kinds["evals"]["entries"] == 1 and kinds["unlearned"]["stale_temporaries"] == 1
    res = CliRunner().invoke(main, ["cache", "clean", "--json"])
    assert json.loads(res.stdout)["removed"] == [str(stale)] and not stale.exists()
    assert (tmp_path / "evals" / "abc.json").exists()
    CliRunner().invoke(main, ["cache", "clean", "--kind", "evals"])
    assert not (tmp_path / "evals" / "abc.json").exists()


# --- micro grids that train ------------------------------------------------------------------------

RESUME_METHODS = [{"name": "ga_gdr", "params": MICRO_METHOD}]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-cell grid (1 method x 2 quantizers x 2 seeds), run in this process."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("grid_ref")
    spec = micro_spec(root / "grid.yaml", RESUME_METHODS, seeds=(0, 1))
    try:
        res = grid(root / "home", "--spec", str(spec), "--results", str(root / "results"), "--json", monkeypatch=mp)
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    (root / "stderr.txt").write_text(res.stderr)
    return root, spec, json.loads(res.stdout)


def test_a_grid_prints_no_progress_bars_of_other_libraries(reference):
    """compressed-tensors' and lm-eval's bars (drawn with an explicit disable=False, so TQDM_DISABLE cannot
    reach them) never reach a grid's stderr: it quantized and evaluated 4 cells."""
    from test_end_to_end import THIRD_PARTY_NOISE

    stderr = (reference[0] / "stderr.txt").read_text()
    assert not [noise for noise in THIRD_PARTY_NOISE if noise in stderr], stderr


def test_grid_writes_one_result_per_cell_an_aggregate_and_seeds_vary_the_target(reference):
    root, _, summary = reference
    assert summary["cells"] == 4 and summary["ok"] == 4 and summary["failed"] == 0
    assert summary["built"]["models"] == 2 and summary["built"]["unlearned"] == 2  # one target, one model per seed
    cells = {(o["cell_id"]) for o in summary["outcomes"]}
    assert len(cells) == 4 and len(list((root / "results" / "cells").glob("*.json"))) == 4
    aggregate = agg.load(root / "results" / "aggregate.json")
    assert {(r.method, r.quant) for r in aggregate.rows} == {("ga_gdr", "rtn-4bit"), ("ga_gdr", "rtn-8bit")}
    row = aggregate.rows[0]
    assert row.seeds == [0, 1] and row.metrics["verbmem_f"].values["pre"].n == 2
    by_seed = {r.spec.seed: r for r in map(results.load, (root / "results" / "cells").glob("*rtn-4bit*"))}
    assert by_seed[0].resolved["seed"]["target_training"] != by_seed[1].resolved["seed"]["target_training"]
    assert by_seed[0].resolved["models"]["target"] != by_seed[1].resolved["models"]["target"]


def test_warm_plan_finds_every_stage_cached(reference, tmp_path, monkeypatch):
    root, spec, _ = reference
    # A fresh results folder: every cell has to be scored again, but every stage is in the cache.
    res = grid(root / "home", "--spec", str(spec), "--results", str(tmp_path / "r"), "--dry-run", "--json",
               monkeypatch=monkeypatch)
    plan = json.loads(res.stdout)
    assert plan["cells_to_run"] == 4 and plan["exact"]
    assert all(s["to_run"] == 0 and s["needed"] > 0 for s in plan["stages"].values()), plan
    # per seed: target, retrain, 2 quantized targets, 2 quantized retrains, the unlearned model, 2 quantized
    # unlearned
    assert plan["stages"]["evaluations"]["needed"] == 2 * 9
    assert plan["stages"]["quantized checkpoints"]["needed"] == 2 * 6
    done = grid(root / "home", "--spec", str(spec), "--results", str(root / "results"), "--dry-run", "--json",
                monkeypatch=monkeypatch)
    assert json.loads(done.stdout)["cells_done"] == 4


def test_killed_grid_resumes_to_the_same_results(reference, tmp_path):
    root, spec, _ = reference
    home, out = tmp_path / "home", tmp_path / "results"
    env = {**os.environ, "QUBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "qubench", "grid", "--spec", str(spec), "--results", str(out), "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((out / "cells").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (first,) = list((out / "cells").glob("*.json"))  # killed right after its first cell, mid-way through the next
    first_created = results.load(first).created

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["reused"] == 1 and summary["ok"] == 4
    assert results.load(first).created == first_created  # the finished cell was not redone
    assert cell_metrics(out) == cell_metrics(root / "results")  # nothing lost, nothing different
    # No half-written artifact anywhere: only complete entries, the lock folders and the manifests of
    # file artifacts are left.
    for folder in [out / "cells", *(p for p in home.iterdir() if p.is_dir())]:
        hidden = [p.name for p in folder.iterdir()
                  if p.name.startswith(".") and p.name not in (store.LOCK_DIR, manifest.MANIFEST_DIR)]
        assert hidden == [], folder


def test_failing_cells_are_recorded_and_the_rest_complete(reference, tmp_path, monkeypatch):
    root, _, _ = reference
    spec = micro_spec(tmp_path / "grid.yaml", [
        {"name": "ga_gdr", "params": MICRO_METHOD},
        # the second step sees a non-finite loss (the first one blows the weights up)
        {"name": "ga", "label": "ga-diverges", "params": {**MICRO_METHOD, "epochs": 2, "lr": 1e30}},
    ])
    res = grid(root / "home", "--spec", str(spec), "--results", str(tmp_path / "r"), "--json",
               monkeypatch=monkeypatch)
    assert res.exit_code == 1
    summary = json.loads(res.stdout)
    assert summary["ok"] == 2 and summary["failed"] == 2
    failed = [o for o in summary["outcomes"] if o["status"] == "failed"]
    assert {o["cell_id"] for o in failed} == {"synth-news/ga-diverges/rtn-4bit/s0", "synth-news/ga-diverges/rtn-8bit/s0"}
    assert all(o["error"]["stage"] == "unlearn" and o["error"]["type"] == "TrainingError" for o in failed), failed
    assert "not attempted" in failed[1]["error"]["message"]  # the shared unlearning was not repeated
    for o in failed:
        stored = results.load(Path(o["result_file"]))
        assert stored.status == "failed" and "Traceback" in stored.error.traceback
    aggregate = agg.load(tmp_path / "r" / "aggregate.json")
    assert len(aggregate.failures) == 2
    assert {r.method: r.seeds for r in aggregate.rows} == {"ga_gdr": [0], "ga-diverges": []}
    text = grid(root / "home", "--spec", str(spec), "--results", str(tmp_path / "r"), monkeypatch=monkeypatch)
    assert text.exit_code == 1 and "failed cells" in text.output and "TrainingError" in text.output


@pytest.fixture
def oom_plugin(tmp_path, monkeypatch):
    """A method whose worker process is SIGKILLed mid-unlearning, as the kernel's OOM killer does."""
    (tmp_path / "oomplug.py").write_text(textwrap.dedent('''
        import os, signal
        from qubench.methods.reference import Target
        class OOM(Target):
            name = "oom"
            description = "Dies like a process the out-of-memory killer picked."
            def unlearn(self, ctx):
                os.kill(os.getpid(), signal.SIGKILL)
    '''))
    info = tmp_path / "oomplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: oomplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qubench.methods]\noom = oomplug:OOM\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield


def test_process_pool_survives_a_killed_worker_and_prunes_checkpoints(reference, oom_plugin, tmp_path, monkeypatch):
    root, _, _ = reference
    home = root / "home"
    visible = lambda: {p for p in (home / "unlearned").iterdir() if not p.name.startswith(".")}
    before = visible()
    spec = micro_spec(tmp_path / "grid.yaml", ["oom", {"name": "ga_gdr", "label": "ga-lr2",
                                                        "params": {**MICRO_METHOD, "lr": 2e-5}}],
                      quants=MICRO_QUANTS[:1])
    res = grid(home, "--spec", str(spec), "--results", str(tmp_path / "r"), "--workers", "2", "--keep", "results",
               "--json", monkeypatch=monkeypatch)
    assert res.exit_code == 1, res.output
    summary = json.loads(res.stdout)
    by_cell = {o["cell_id"]: o for o in summary["outcomes"]}
    assert by_cell["synth-news/ga-lr2/rtn-4bit/s0"]["status"] == "ok"
    died = by_cell["synth-news/oom/rtn-4bit/s0"]
    assert died["status"] == "failed" and died["error"]["type"] == "WorkerDied" and "SIGKILL" in died["error"]["message"]
    assert results.load(Path(died["result_file"])).status == "failed"
    # --keep results: the new unlearned model and its quantized checkpoint are gone, older artifacts stay.
    assert visible() == before and summary["pruned"] == 2
    # the killed worker's half-built model is hidden and known as stale (`qubench cache clean` removes it)
    (leftover,) = [p for p in (home / "unlearned").glob(".oom-*")]
    assert store.is_stale_temporary(leftover)
    assert summary["built"]["unlearned"] == 0 and summary["built"]["evals"] > 0


def test_ray_executor_runs_a_grid_on_a_local_ray_instance(reference, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    root, _, _ = reference
    spec = micro_spec(tmp_path / "grid.yaml", [{"name": "ga_gdr", "params": MICRO_METHOD}, "target"],
                      quants=MICRO_QUANTS[:1])
    monkeypatch.setenv("QUBENCH_HOME", str(root / "home"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = grid(root / "home", "--spec", str(spec), "--results", str(tmp_path / "r"), "--executor", "ray",
                   "--json", monkeypatch=monkeypatch)
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["ok"] == 2 and summary["failed"] == 0
    expected = cell_metrics(root / "results")[("synth-news", "ga_gdr", "rtn-4bit", 0)]
    assert cell_metrics(tmp_path / "r")[("synth-news", "ga_gdr", "rtn-4bit", 0)] == expected
