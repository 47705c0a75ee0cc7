"""Cached artifacts are checked against what their build wrote: a damaged one is rebuilt (or, with
--no-rebuild, stops the run naming the file), `--force` rebuilds every stage of a run (issue #16, item 4)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from qubench import manifest, store
from qubench.cli import main
from qubench.errors import CacheError

MICRO = ["--task-param", "size=micro", "--method-param", "epochs=1", "--method-param", "lr=1e-3",
         "--method-param", "batch_size=4", "--method-param", "grad_accum=1", "--limit", "2"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(store.NO_REBUILD_ENV, raising=False)
    return tmp_path / "home"


class Builder:
    """A stage build that writes two files and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tmp: Path) -> None:
        self.calls += 1
        (tmp / "weights.bin").write_bytes(bytes(range(256)) * 4)
        (tmp / "meta.json").write_text(json.dumps({"build": self.calls}))


def test_a_build_records_what_it_wrote_and_an_intact_artifact_is_reused(home):
    build = Builder()
    path = store.cached_dir(home / "kind" / "a", build)
    recorded = json.loads((path / manifest.MANIFEST_FILE).read_text())
    assert set(recorded["files"]) == {"weights.bin", "meta.json"}
    assert recorded["files"]["weights.bin"]["size"] == 1024
    assert store.cached_dir(path, build) == path and build.calls == 1
    assert manifest.check(path) is None


@pytest.mark.parametrize("damage,problem", [
    (lambda p: os.truncate(p / "weights.bin", 100), "weights.bin is 100 bytes, 1024 when it was built (truncated)"),
    (lambda p: (p / "weights.bin").write_bytes(bytes(1024)),  # same size, zeroed in place
     "weights.bin has changed since it was built (its sha256 differs from the one recorded then)"),
    (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
    (lambda p: (p / "extra.safetensors").write_bytes(b"x"), "extra.safetensors was not written by the build"),
])
def test_a_damaged_artifact_is_rebuilt_or_stops_the_run_naming_the_file(home, monkeypatch, caplog, damage, problem):
    build = Builder()
    path = store.cached_dir(home / "kind" / "a", build)
    damage(path)
    assert manifest.check(path) == problem
    monkeypatch.setenv(store.NO_REBUILD_ENV, "1")
    with pytest.raises(CacheError) as err:
        store.cached_dir(path, build)
    assert str(err.value) == (f"cached artifact {path} is damaged: {problem}. Run again without --no-rebuild to "
                              f"rebuild it, or delete it (rm -r {path})")
    monkeypatch.delenv(store.NO_REBUILD_ENV)
    with caplog.at_level(logging.WARNING, logger="qubench.cache"):
        assert store.cached_dir(path, build) == path
    assert build.calls == 2 and manifest.check(path) is None
    assert (path / "weights.bin").read_bytes() == bytes(range(256)) * 4
    assert f"cached artifact {path} is damaged ({problem}): rebuilding it" in caplog.text


def test_file_artifacts_keep_their_manifest_beside_them(home, monkeypatch):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(1)
        tmp.write_text(json.dumps({"metrics": {"verbmem_f": 12.5}}))

    path = store.cached_file(home / "evals" / "m.json", build)
    assert manifest.sidecar(path) == home / "evals" / ".manifests" / "m.json.json" and manifest.sidecar(path).exists()
    path.write_text('{"metrics": {"verbmem_f": 99')  # cut short
    monkeypatch.setenv(store.NO_REBUILD_ENV, "1")
    with pytest.raises(CacheError, match=r"m\.json is 28 bytes, 32 when it was built \(truncated\)"):
        store.cached_file(path, build)
    monkeypatch.delenv(store.NO_REBUILD_ENV)
    assert store.read_json(store.cached_file(path, build), "metrics") == {"verbmem_f": 12.5} and len(calls) == 2
    assert store.remove_cached(path) and not manifest.sidecar(path).exists()


def test_an_artifact_built_before_manifests_gets_one_if_it_is_readable_else_it_is_rebuilt(home):
    legacy = home / "kind" / "old"
    legacy.mkdir(parents=True)
    (legacy / "meta.json").write_text('{"ok": true}')
    build = Builder()
    assert store.cached_dir(legacy, build) == legacy and build.calls == 0
    assert set(json.loads((legacy / manifest.MANIFEST_FILE).read_text())["files"]) == {"meta.json"}
    broken = home / "kind" / "older"
    broken.mkdir(parents=True)
    (broken / "meta.json").write_text('{"ok": tr')
    assert manifest.check(broken).startswith("meta.json: unreadable JSON (JSONDecodeError")
    store.cached_dir(broken, build)
    assert build.calls == 1 and json.loads((broken / "meta.json").read_text()) == {"build": 1}


def test_safetensors_headers_are_checked_without_loading(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, path)
    assert manifest.safetensors_problem(path) is None
    size = path.stat().st_size
    os.truncate(path, size - 100)
    assert manifest.safetensors_problem(path) == f"truncated safetensors: {size - 100} bytes, its header declares {size}"
    os.truncate(path, 20)  # inside the header itself
    assert manifest.safetensors_problem(path).startswith("truncated safetensors: the header says")


def test_rebuilding_builds_each_artifact_once_inside_the_context(home):
    build = Builder()
    path = store.cached_dir(home / "kind" / "a", build)
    inode = path.stat().st_ino
    with store.rebuilding():
        store.cached_dir(path, build)
        store.cached_dir(path, build)  # asked twice in one forced run: built once
    assert build.calls == 2 and path.stat().st_ino != inode and manifest.check(path) is None
    store.cached_dir(path, build)
    assert build.calls == 2


def test_read_json_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('{"metrics": {"a": 1}')
    with pytest.raises(CacheError, match=f"cannot read {path}: JSONDecodeError"):
        store.read_json(path)
    path.write_text('{"label": "x"}')
    with pytest.raises(CacheError, match=f"{path} has no field 'metrics'"):
        store.read_json(path, "metrics")


# --- end to end, on the micro configuration --------------------------------------------------------------

def _run(results, *extra):
    res = CliRunner().invoke(main, ["run", *MICRO, "--results", str(results), "--json", *extra])
    return res


def _metrics(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["metrics"]


def _artifacts(home: Path) -> dict[str, int]:
    """Every artifact folder or file under the stage kinds, with its inode (changes when rebuilt)."""
    from qubench.stages import STAGE_KINDS

    found = {}
    for kind in STAGE_KINDS:
        folder = home / kind
        if folder.is_dir():
            for p in folder.iterdir():
                if not p.name.startswith("."):
                    found[f"{kind}/{p.name}"] = p.stat().st_ino
    return found


@pytest.fixture(scope="module")
def micro_home(tmp_path_factory):
    """One micro run in a private cache: the reference every damaged rerun must reproduce."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("integrity")
    mp.setenv("QUBENCH_HOME", str(root / "home"))
    mp.delenv(store.NO_REBUILD_ENV, raising=False)
    try:
        yield root, _metrics(_run(root / "first"))
    finally:
        mp.undo()


def _zero_lm_head_rows(path: Path, share: float = 0.2) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    w = tensors["lm_head.weight"]
    w[: int(w.shape[0] * share)] = 0.0  # still valid floats: only the content hash can tell
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_silently_altered_target_model_is_detected_and_rebuilt(micro_home, monkeypatch):
    root, first = micro_home
    monkeypatch.setenv("QUBENCH_HOME", str(root / "home"))
    home = root / "home"
    (target,) = home.glob("models/*/target/model.safetensors")
    size = target.stat().st_size
    _zero_lm_head_rows(target)
    assert target.stat().st_size == size
    stopped = _run(root / "altered", "--no-rebuild")
    assert stopped.exit_code == 2
    text = "".join(stopped.output.split())  # rich wraps long lines anywhere, even inside a path
    expected = f"cached artifact {target.parent.parent} is damaged: target/model.safetensors has changed since it was built"
    assert "".join(expected.split()) in text and "Runagainwithout--no-rebuild" in text
    assert os.environ.get(store.NO_REBUILD_ENV) is None  # the flag does not outlive its command
    again = _run(root / "altered")
    assert _metrics(again) == first  # the altered weights were never used: the same numbers as before


def test_truncated_checkpoints_and_evaluations_are_rebuilt_and_nothing_else(micro_home, monkeypatch):
    root, first = micro_home
    monkeypatch.setenv("QUBENCH_HOME", str(root / "home"))
    home = root / "home"
    (unlearned,) = home.glob("unlearned/*/model.safetensors")
    os.truncate(unlearned, 100)
    evals = sorted(p for p in home.glob("evals/*.json") if not p.name.startswith("."))
    os.truncate(evals[0], 50)
    before = _artifacts(home)
    res = _run(root / "truncated")
    assert _metrics(res) == first
    after = _artifacts(home)
    changed = sorted(k for k in before if after.get(k) != before[k])
    # Exactly the two damaged artifacts: rebuilt with the same content, so every key stays the same and
    # nothing downstream is recomputed.
    assert changed == sorted([f"evals/{evals[0].name}", f"unlearned/{unlearned.parent.name}"])
    assert set(after) == set(before)


def test_force_rebuilds_every_stage_of_the_run(micro_home, monkeypatch):
    root, first = micro_home
    monkeypatch.setenv("QUBENCH_HOME", str(root / "home"))
    home = root / "home"
    before = _artifacts(home)
    res = _run(root / "first", "--force")
    after = _artifacts(home)
    assert _metrics(res) == first  # deterministic on CPU: rebuilt, the same numbers
    used = {k for k in before if k.split("/")[0] in ("tasks", "models", "unlearned", "quantized", "evals")}
    assert used and all(after[k] != before[k] for k in used), sorted(k for k in used if after[k] == before[k])
