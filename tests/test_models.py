"""Target/retrain model resolution (--model) and the offline training recipe."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qubench.cli import main
from qubench.errors import ConfigError
from qubench.models.prepare import resolve_model
from qubench.tasks.synth_news import SynthNews


def test_local_folder_resolves(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not a save_pretrained model folder"):
        resolve_model(str(tmp_path))


def test_malformed_reference_is_rejected():
    with pytest.raises(ConfigError, match="neither an existing folder nor a hub ID"):
        resolve_model("./no/such/folder")


def test_hub_id_without_hub_access_fails_with_advice(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="pass a local save_pretrained folder instead"):
        resolve_model("muse-bench/MUSE-News_target")


def test_recipe_overrides_are_validated_before_any_work():
    with pytest.raises(ConfigError, match="recipe.hidden"):
        SynthNews.from_params({"recipe": {"hidden": 64}})
    assert SynthNews.from_params({"size": "micro", "recipe": {"lr": 1e-4}}).train_recipe().lr == 1e-4


def test_run_with_an_existing_local_model(tiny_model_dir, tmp_path, monkeypatch):
    """--model/--retrain-model use existing folders: nothing is trained, results name them."""
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(main, [
        "run", "--task-param", "size=micro", "--model", str(tiny_model_dir), "--retrain-model", str(tiny_model_dir),
        "--method", "ga", "--method-param", "epochs=1", "--method-param", "batch_size=4", "--quant-param",
        "group_size=64", "--limit", "2", "--results", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["resolved"]["models"]["target"]["id"] == str(tiny_model_dir)
    assert out["resolved"]["models"]["recipe"] is None
    assert not (tmp_path / "home" / "models").exists()
    # retrain == target here, so PrivLeak of the target against its own AUC is exactly 0
    assert out["metrics"]["privleak"]["target_pre"] == pytest.approx(0.0)
