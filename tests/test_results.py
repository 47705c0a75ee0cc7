"""Result schema, scoring arithmetic, atomic writes and the stage cache."""

from __future__ import annotations

import json

import pytest

from qubench import results, store
from qubench.specs import PluginRef, RunSpec


def test_recovery_is_share_of_forgotten_brought_back():
    row = results.metric_row(pre=20.0, post=50.0, target_pre=80.0, target_post=78.0, retrain=10.0)
    assert row.gap == pytest.approx(30.0)
    assert row.recovery == pytest.approx(30.0 / 60.0)
    assert row.recovery_note is None


def test_recovery_negative_when_quantization_deepens_forgetting():
    row = results.metric_row(pre=40.0, post=30.0, target_pre=60.0)
    assert row.recovery == pytest.approx(-0.5)


def test_recovery_undefined_when_nothing_was_forgotten():
    row = results.metric_row(pre=55.0, post=57.0, target_pre=55.0)
    assert row.gap == pytest.approx(2.0)
    assert row.recovery is None and "changed nothing" in row.recovery_note


def test_recovery_undefined_when_forgetting_is_below_the_noise_floor():
    row = results.metric_row(pre=0.2, post=0.5, target_pre=0.6)
    assert row.recovery is None and "below 1" in row.recovery_note
    assert results.metric_row(pre=0.2, post=0.5, target_pre=0.6, min_forgetting=0.1).recovery == pytest.approx(0.75)


def test_result_round_trips_and_rejects_unknown_fields(tmp_path):
    spec = RunSpec(method=PluginRef(name="npo_klr", params={"lr": 1e-5}), seed=3)
    res = results.RunResult(run_id=spec.run_id(), status="ok", spec=spec,
                            metrics={"verbmem_f": results.metric_row(10, 20, 30)})
    path = tmp_path / "r.json"
    results.save(res, path)
    back = results.load(path)
    assert back == res
    raw = json.loads(path.read_text())
    raw["metrics"]["verbmem_f"]["bogus"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(Exception, match="bogus"):
        results.load(path)


def test_run_id_depends_on_every_spec_field():
    base = RunSpec()
    assert base.run_id() == RunSpec().run_id()
    for changed in (RunSpec(seed=1), RunSpec(batch_size=8), RunSpec(quant=PluginRef(name="rtn-8bit")),
                    RunSpec(method=PluginRef(name="ga_gdr", params={"alpha": 2}))):
        assert changed.run_id() != base.run_id()


def test_cached_dir_never_exposes_half_built_folder(tmp_path):
    target = tmp_path / "stage" / "abc"

    def broken(tmp):
        (tmp / "weights.bin").write_text("partial")
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        store.cached_dir(target, broken)
    assert not target.exists()
    # the temporary folder is cleaned up too (only the lock folder stays)
    assert [p.name for p in (tmp_path / "stage").iterdir()] == [store.LOCK_DIR]
    calls = []
    store.cached_dir(target, lambda tmp: calls.append((tmp / "ok").write_text("1")))
    store.cached_dir(target, lambda tmp: calls.append("rebuilt"))
    assert (target / "ok").read_text() == "1" and len(calls) == 1


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    store.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        store.write_json_atomic(path, {"a": object.__new__(type("Unserialisable", (), {"__str__": None}))})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_write_json_atomic_gives_the_permissions_open_would(tmp_path):
    import os
    import stat

    from qubench.store import write_json_atomic

    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "r.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o640  # not mkstemp's 0600
