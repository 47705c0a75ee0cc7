"""`qubench audit`: a model unlearned elsewhere, measured like a method's output (issue #15).

The acceptance tests: a model unlearned by `qubench run` and audited as an external folder gives the
run's numbers; a peft LoRA adapter audits to the numbers of its merged model; every bad input stops
with its message before anything is quantized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from qubench import results
from qubench.cli import main
from qubench.evaluation.measure import Measured
from qubench.scoring import separation

MICRO_TASK = ["--task-param", "size=micro"]
# The run options of tests/test_end_to_end.py: micro task, a short unlearning, 4 probes per set.
MICRO_RUN = [*MICRO_TASK, "--method-param", "epochs=2", "--method-param", "lr=1e-3", "--method-param",
             "batch_size=4", "--method-param", "grad_accum=1", "--limit", "4"]
# Audits of the tiny random Llama (tests/conftest.py): nothing is trained, 2 probes per set.
TINY = [*MICRO_TASK, "--limit", "2", "--quant", "rtn-4bit"]
ALLOW = ["--allow-no-separation"]  # a random model remembers nothing: its audits need this


def _cli(home: Path, args: list[str], monkeypatch) -> "click.testing.Result":
    monkeypatch.setenv("QUBENCH_HOME", str(home))
    return CliRunner().invoke(main, args)


def _audit(home: Path, results_dir: Path, *args: str, monkeypatch) -> list[dict]:
    res = _cli(home, ["audit", "--results", str(results_dir), "--json", *args], monkeypatch)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _tokenizer_to(src: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(out)


def perturbed(src: Path, out: Path, scale: float = 0.05, seed: int = 1, tokenizer: bool = True) -> Path:
    """`src` with noise on every weight: an "unlearned" model of the same network."""
    torch.manual_seed(seed)
    model = _load(src)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(out)
    if tokenizer:
        _tokenizer_to(src, out)
    return out


def llama_variant(src: Path, out: Path, **changes) -> Path:
    """A randomly initialised Llama like `src` with some config fields changed, with `src`'s tokenizer."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(src)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(2)
    LlamaForCausalLM(config).save_pretrained(out)
    _tokenizer_to(src, out)
    return out


def gpt2_like(src: Path, out: Path) -> Path:
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

    vocab = AutoConfig.from_pretrained(src).vocab_size
    torch.manual_seed(3)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)).save_pretrained(out)
    _tokenizer_to(src, out)
    return out


def swapped_vocab(src: Path, out: Path) -> Path:
    """`src`'s network (perturbed) with a tokenizer that gives two tokens each other's IDs."""
    perturbed(src, out)
    path = out / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = [t for t in vocab if t.isalpha() and len(t) > 2][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))
    return out


def resharded(src: Path, out: Path) -> Path:
    """The same weights saved as several safetensors shards: other files, identical tensors."""
    _load(src).save_pretrained(out, max_shard_size="100KB")
    _tokenizer_to(src, out)
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


def lora_adapter(base: Path, out: Path, targets=("q_proj", "v_proj"), seed: int = 0):
    """A peft LoRA adapter on `base` with non-zero A and B (so merging changes the weights); returns the
    peft model it was saved from."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load(base), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                   init_lora_weights=False))
    model.save_pretrained(out)
    return model


def _set_adapter_base(adapter: Path, base: str) -> Path:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config))
    return adapter


# --- the separation check ---------------------------------------------------------------------------

def _measured(target: dict, retrain: dict | None = None) -> Measured:
    by_model = {"target_pre": target, **({"retrain": retrain} if retrain is not None else {})}
    return Measured(by_model, {})


def test_an_audit_stops_on_no_or_unchecked_separation_unless_allowed_and_goes_on_when_partly_separated():
    """The check itself is qubench.scoring.separation (tests/test_separation.py): an audit refuses a target
    that does not remember the forget set, since its recovery figures would carry no information."""
    from qubench.errors import ConfigError
    from qubench.specs import AuditInput
    from qubench.stages.external import ExternalUnlearned

    def audit(allow: bool) -> ExternalUnlearned:
        return ExternalUnlearned(AuditInput(unlearned="x", allow_no_separation=allow), None, None, lambda m: None)

    apart = separation(_measured({"verbmem_f": 15.0}, {"verbmem_f": 10.0}))
    partly = separation(_measured({"verbmem_f": 15.0, "knowmem_f": 3.0}, {"verbmem_f": 10.0, "knowmem_f": 2.0}))
    close = separation(_measured({"verbmem_f": 14.9}, {"verbmem_f": 10.0}))
    unchecked = separation(_measured({"knowmem_r": 3.0}))
    assert (apart.status, partly.status, close.status, unchecked.status) == (
        "separated", "partly separated", "not separated", "unchecked")
    audit(False).check_separation(apart)
    audit(False).check_separation(partly)
    for sep in (close, unchecked):
        with pytest.raises(ConfigError, match="separation check failed: .*--allow-no-separation"):
            audit(False).check_separation(sep)
        audit(True).check_separation(sep)


# --- bad input: each stops with its message before any quantization ------------------------------------

@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit_models")
    out = {"target": tiny_model_dir, "unlearned": perturbed(tiny_model_dir, root / "unlearned")}
    out["other_base"] = perturbed(tiny_model_dir, root / "other_base", seed=7)
    out["arch"] = gpt2_like(tiny_model_dir, root / "gpt2")
    out["vocab"] = llama_variant(tiny_model_dir, root / "vocab", vocab_size=400)
    out["shapes"] = llama_variant(tiny_model_dir, root / "shapes", intermediate_size=96)
    out["tokenizer"] = swapped_vocab(tiny_model_dir, root / "tokenizer")
    out["no_tokenizer"] = perturbed(tiny_model_dir, root / "no_tokenizer", tokenizer=False)
    out["copy"] = Path(shutil.copytree(tiny_model_dir, root / "copy"))
    out["resharded"] = resharded(tiny_model_dir, root / "resharded")
    lora_adapter(out["shapes"], root / "adapter_misfit", targets=("up_proj",))
    # An adapter whose recorded base is a name from another machine: only its shapes can tell.
    out["adapter_misfit"] = _set_adapter_base(root / "adapter_misfit", "some-org/some-model")
    lora_adapter(out["other_base"], root / "adapter_other_base")
    out["adapter_other_base"] = root / "adapter_other_base"
    return out


# case -> (the step it fails in, its message). Adapters are checked before they are merged (step prepare).
BAD_INPUTS = {
    "arch": ("check", "target and unlearned models have different architectures: the target is LlamaForCausalLM "
                      "(model_type llama), the unlearned model is GPT2LMHeadModel (model_type gpt2)"),
    "vocab": ("check", "target and unlearned models have different vocabularies: vocab_size 369 in the target, "
                       "400 in the unlearned model"),  # the tiny Llama's tokenizer has 369 tokens
    "shapes": ("check", "target and unlearned models have different shapes (target vs unlearned): "
                        "model.layers.0.mlp.down_proj.weight [64, 128] vs [64, 96]"),
    "tokenizer": ("check", "the unlearned model's tokenizer differs from the target's: its vocabulary differs "
                           "(2 with other IDs"),
    "no_tokenizer": ("check", "no_tokenizer has no tokenizer (none of tokenizer.json, tokenizer_config.json"),
    "copy": ("check", "has exactly the target's weights: nothing was unlearned"),
    "resharded": ("check", "has exactly the target's weights: nothing was unlearned"),
    "adapter_misfit": ("prepare", "does not fit the target"),
    "adapter_other_base": ("prepare", "whose weights differ from the target"),
}


@pytest.fixture(scope="module")
def bad_home(tmp_path_factory):
    return tmp_path_factory.mktemp("audit_bad")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_its_message_before_any_quantization(case, models, bad_home, monkeypatch):
    res = _cli(bad_home / "home", ["audit", *TINY, "--target", str(models["target"]), "--unlearned",
                                   str(models[case]), "--results", str(bad_home / "results")], monkeypatch)
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split())  # rich wraps long lines
    step, expected = BAD_INPUTS[case]
    assert f"run failed in stage {step}: ConfigError: " in message and expected in message, message
    assert not (bad_home / "home" / "quantized").exists()  # refused before any quantizer ran
    if case in ("copy", "resharded"):
        assert "--allow-identical" in message


def test_a_target_that_never_saw_the_task_fails_the_separation_check_before_quantization(models, bad_home,
                                                                                          monkeypatch):
    res = _cli(bad_home / "home", ["audit", *TINY, "--target", str(models["target"]), "--unlearned",
                                   str(models["unlearned"]), "--results", str(bad_home / "results")], monkeypatch)
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split())
    assert "separation check failed: the target does not remember the forget set measurably more" in message
    assert "verbmem_holdout" in message and "cannot show forgetting or recovery" in message
    assert "--allow-no-separation" in message
    assert not (bad_home / "home" / "quantized").exists()


def test_missing_checkpoints_and_plugin_names_are_refused(models, bad_home, monkeypatch):
    res = _cli(bad_home / "home", ["audit", *TINY, "--target", str(models["target"]), "--unlearned",
                                   "/nowhere/unlearned", "--results", str(bad_home / "r2")], monkeypatch)
    assert res.exit_code == 2 and "neither an existing folder nor a hub ID" in " ".join(res.output.split())
    res = _cli(bad_home / "home", ["run", *MICRO_TASK, "--method", "external:mine"], monkeypatch)
    assert res.exit_code == 2 and "names an audited checkpoint, not a plugin" in " ".join(res.output.split())


def test_adapter_naming_another_hub_model_as_its_base_is_refused(models):
    from qubench.audit import check_adapter_base
    from qubench.errors import ConfigError

    adapter = models["adapter_misfit"]  # records some-org/some-model as its base
    with pytest.raises(ConfigError, match="names some-org/some-model as its base model, but the target is "
                                          "muse-bench/MUSE-News_target"):
        check_adapter_base(adapter, models["shapes"], "muse-bench/MUSE-News_target")


def test_a_checkpoint_stored_in_another_dtype_is_noted(models, tmp_path):
    from qubench.audit import dtype_note

    _load(models["target"]).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert "stored in bfloat16, the target in float32" in dtype_note(models["target"], tmp_path / "bf16")
    assert dtype_note(models["target"], models["unlearned"]) is None


def test_an_identical_checkpoint_is_still_audited_when_asked(models, tmp_path, monkeypatch):
    (out,) = _audit(tmp_path / "home", tmp_path / "r", *TINY, *ALLOW, "--allow-identical", "--target",
                    str(models["target"]), "--unlearned", str(models["resharded"]), monkeypatch=monkeypatch)
    result = results.RunResult.model_validate(out)
    assert result.status == "ok" and result.resolved["audit"]["identical_to_target"] is True
    assert "nothing was unlearned" in " ".join(result.resolved["audit"]["notes"])
    assert result.diagnostics.mean_abs_delta == 0 and result.diagnostics.quantized_disagreement == 0
    for name, row in result.metrics.items():  # same weights, same measurements: no forgetting to recover
        assert row.pre == row.target_pre and row.recovery is None, name
    assert result.separation.status == "not separated"


# --- where a checkpoint comes from, and what it says about itself ---------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CARD = "---\nlicense: mit\nbase_model: someone/target\ntags: [unlearning]\n---\n# Unlearned\nForgot the news."


@pytest.fixture
def hub_cache(tiny_model_dir, tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding someone/unlearned at COMMIT (as a download leaves it), used offline."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--unlearned"
    snapshot = Path(shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT))
    (snapshot / "README.md").write_text(CARD)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    return snapshot


def test_a_hub_checkpoint_is_found_in_the_cache_with_its_revision_and_model_card(hub_cache, monkeypatch):
    import huggingface_hub

    from qubench.audit import locate, provenance, resolve

    for ref in ("someone/unlearned", f"someone/unlearned@{COMMIT}"):
        found = locate(ref)
        assert (found.path, found.hub_id, found.revision) == (hub_cache, "someone/unlearned", COMMIT), ref
    assert locate("someone/elsewhere") is None  # not downloaded: not here, and nothing is fetched
    asked = {}

    def download(repo_id, revision=None, **kwargs):  # the network call; everything around it is ours
        asked.update(repo_id=repo_id, revision=revision)
        return str(hub_cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    checkpoint = resolve("someone/unlearned@v1.0")
    assert asked == {"repo_id": "someone/unlearned", "revision": "v1.0"}
    record = provenance(checkpoint)
    assert (record["hub_id"], record["revision"], record["kind"]) == ("someone/unlearned", COMMIT, "model")
    assert record["model_card"]["metadata"] == {"license": "mit", "base_model": "someone/target",
                                                "tags": ["unlearning"]}
    assert record["model_card"]["excerpt"] == "# Unlearned\nForgot the news."
    assert len(record["model_card"]["sha256"]) == 64 and record["fingerprint"]


# --- acceptance: `qubench run`, then the same model audited as an external folder -----------------------

@pytest.fixture(scope="module")
def run_then_audit(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("run_audit")
    try:
        mp.setenv("QUBENCH_HOME", str(root / "run_home"))
        res = CliRunner().invoke(main, ["run", *MICRO_RUN, "--method", "ga_gdr", "--results", str(root / "run"),
                                        "--json"])
        assert res.exit_code == 0, res.output
        ran = results.RunResult.model_validate_json(res.stdout)
        (unlearned,) = (root / "run_home" / "unlearned").glob("ga_gdr-*")
        external = Path(shutil.copytree(unlearned, root / "elsewhere" / "my-unlearned"))
        models = ran.resolved["models"]
        # A fresh cache: the audit quantizes and measures everything again, through its own path.
        (audited,) = _audit(root / "audit_home", root / "audit", *MICRO_TASK, "--limit", "4", "--quant", "rtn-4bit",
                            *ALLOW, "--target", models["target"]["id"], "--retrain", models["retrain"]["id"],
                            "--unlearned", str(external), monkeypatch=mp)
        yield root, ran, results.RunResult.model_validate(audited), external
    finally:
        mp.undo()


def test_audit_of_a_run_unlearned_model_gives_the_runs_metrics_recoveries_and_diagnostics(run_then_audit):
    _, ran, audited, external = run_then_audit
    assert audited.status == "ok" and audited.spec.method.name == "external:my-unlearned"
    assert audited.metrics == ran.metrics          # every value, gap, recovery and recovery note
    assert audited.diagnostics == ran.diagnostics  # weight deltas against the quantization step
    for model in ("target", "retrain", "unlearned"):
        assert audited.resolved["models"][model]["fingerprint"] == ran.resolved["models"][model]["fingerprint"]
    assert audited.separation == ran.separation
    assert audited.timings.get("unlearn") is None and "prepare_unlearned" in audited.timings


def test_audit_records_the_checkpoints_identity_and_provenance(run_then_audit):
    root, ran, audited, external = run_then_audit
    checkpoint = audited.resolved["method"]["external"]
    assert checkpoint["ref"] == str(external) and checkpoint["kind"] == "model"
    assert checkpoint["fingerprint"] == ran.resolved["models"]["unlearned"]["fingerprint"]
    assert checkpoint["architectures"] == ["LlamaForCausalLM"] and checkpoint["hub_id"] is None
    assert checkpoint["qubench_unlearning"]["steps"] == ran.unlearning["steps"]  # the log it carries
    assert audited.resolved["audit"] == {"identical_to_target": False, "notes": []}
    assert audited.resolved["seed"]["unlearning"] is None
    assert audited.environment["plugins"].get("method") is None  # no plugin made it
    # the file is a valid result whose run_id is its spec's hash, named after the checkpoint
    (saved,) = (root / "audit").glob("*.json")
    assert saved.name.startswith("synth-news__external_my-unlearned__rtn-4bit__")
    assert results.load(saved).run_id == audited.spec.run_id()


def test_audit_prints_the_separation_check_and_reuses_its_result_until_the_checkpoint_changes(run_then_audit,
                                                                                                 monkeypatch):
    from qubench.specs import AuditInput
    from qubench.stages.external import changed_since

    root, ran, audited, external = run_then_audit
    models = ran.resolved["models"]
    res = _cli(root / "audit_home", ["audit", *MICRO_TASK, "--limit", "4", "--quant", "rtn-4bit", *ALLOW,
                                     "--target", models["target"]["id"], "--retrain", models["retrain"]["id"],
                                     "--unlearned", str(external), "--results", str(root / "audit")], monkeypatch)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "reusing stored result" in text and "audited checkpoint: " in text
    assert "NO SEPARATION" in text and "cannot show forgetting or recovery" in text
    check = AuditInput(unlearned=str(external))
    assert changed_since(check, audited) is None
    stale = SimpleNamespace(resolved={"method": {"external": {"fingerprint": "0" * 16}}})
    assert "changed since it was audited" in changed_since(check, stale)


# --- acceptance: a LoRA adapter audits to the numbers of its merged model ------------------------------

@pytest.fixture(scope="module")
def lora_audits(tiny_model_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("lora")
    try:
        peft_model = lora_adapter(tiny_model_dir, root / "adapter")
        merged = root / "merged"
        peft_model.merge_and_unload().save_pretrained(merged)
        _tokenizer_to(tiny_model_dir, merged)
        common = [*TINY, *ALLOW, "--target", str(tiny_model_dir)]
        (from_adapter,) = _audit(root / "home", root / "r", *common, "--unlearned", str(root / "adapter"),
                                 monkeypatch=mp)
        (from_merged,) = _audit(root / "home", root / "r", *common, "--unlearned", str(merged), monkeypatch=mp)
        yield root, results.RunResult.model_validate(from_adapter), results.RunResult.model_validate(from_merged)
    finally:
        mp.undo()


def test_lora_adapter_audits_to_the_same_numbers_as_its_merged_model(lora_audits):
    root, adapter, merged = lora_audits
    assert adapter.status == merged.status == "ok"
    assert adapter.metrics == merged.metrics and adapter.diagnostics == merged.diagnostics
    assert adapter.diagnostics.mean_abs_delta > 0  # the adapter did change the weights
    # the merged stage (kind `merged`) holds exactly the weights peft's own merge gives
    (merged_dir,) = (root / "home" / "merged").glob("lora-*")
    ours, theirs = _load(merged_dir).state_dict(), _load(root / "merged").state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    record = adapter.resolved["method"]["external"]
    assert record["kind"] == "lora_adapter" and record["adapter_config"]["peft_type"] == "LORA"
    assert adapter.resolved["audit"]["merged"]["path"] == str(merged_dir)
    assert adapter.resolved["models"]["unlearned"]["fingerprint"] == adapter.resolved["audit"]["merged"]["fingerprint"]


def test_a_grid_spec_audits_the_same_inputs(lora_audits, tiny_model_dir, monkeypatch):
    root, adapter, _ = lora_audits
    spec = root / "grid.yaml"
    spec.write_text(json.dumps({
        "tasks": [{"name": "synth-news", "params": {"size": "micro"}}], "quantizers": ["rtn-4bit"],
        "seeds": [0, 1], "model": str(tiny_model_dir), "eval_limit": 2,
        "audits": [{"unlearned": str(root / "adapter"), "name": "my-lora", "allow_no_separation": True}],
    }))
    dry = _cli(root / "home", ["grid", "--spec", str(spec), "--results", str(root / "grid"), "--dry-run", "--json"],
               monkeypatch)
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["cells"] == 1  # an audit unlearns nothing a seed could vary: the first seed only
    assert plan["stages"]["merged LoRA adapters (audits)"] == {"needed": 1, "cached": 1, "to_run": 0}
    res = _cli(root / "home", ["grid", "--spec", str(spec), "--results", str(root / "grid"), "--keep", "results",
                               "--json"], monkeypatch)
    assert res.exit_code == 0, res.output
    (cell,) = (root / "grid" / "cells").glob("*.json")
    result = results.load(cell)
    assert result.spec.method.name == "external:my-lora" and result.metrics == adapter.metrics


def test_grid_spec_audits_need_a_target_and_never_prune_the_checkpoint(models, tmp_path, monkeypatch):
    from qubench.errors import ConfigError
    from qubench.grid.keep import Pruner
    from qubench.grid.plan import Need, StageWalker, expand
    from qubench.grid.spec import parse_spec

    with pytest.raises(ConfigError, match="audits need their target: set `model:`"):
        parse_spec({"tasks": ["synth-news"], "quantizers": ["rtn-4bit"], "audits": [str(models["unlearned"])]})
    with pytest.raises(ConfigError, match="at least one method"):
        parse_spec({"tasks": ["synth-news"], "quantizers": ["rtn-4bit"]})
    with pytest.raises(ConfigError, match="duplicate methods or audits"):
        parse_spec({"tasks": ["synth-news"], "quantizers": ["rtn-4bit"], "model": "x",
                    "audits": [{"unlearned": "a/b", "name": "m"}, {"unlearned": "c/d", "name": "m"}]})
    grid = parse_spec({"tasks": [{"name": "synth-news", "params": {"size": "micro"}}], "methods": ["ga"],
                       "quantizers": ["rtn-4bit", "rtn-8bit"], "seeds": [3, 4], "model": str(models["target"]),
                       "audits": [str(models["unlearned"])]})
    groups = expand(grid)
    audits = [g for g in groups if g.method == "external:unlearned"]
    assert len(groups) == 3 and len(audits) == 1 and audits[0].seed == 3
    assert all(c.spec.audit.unlearned == str(models["unlearned"]) for c in audits[0].cells)
    # keep=results deletes what a group built, never the checkpoint the user asked to audit
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    needs = StageWalker().walk(audits[0].cells[0].spec)
    assert needs["unlearned"] == Need("external", models["unlearned"], True)  # there, and named by its path
    Pruner("results", groups).group_done(audits[0])
    assert (models["unlearned"] / "model.safetensors").exists()


# --- the leaderboard ----------------------------------------------------------------------------------

TARGET = "/models/target"


def _with(result, **spec_changes):
    spec = result.spec.model_copy(update=spec_changes)
    return result.model_copy(update={"spec": spec, "run_id": spec.run_id()})


def _audit_result(name: str, post: float):
    from leaderboard_data import make_result

    from qubench.specs import AuditInput, PluginRef

    return _with(make_result("ga", forget=(40.0, 10.0, post)), model=TARGET,
                 method=PluginRef(name=f"external:{name}"), audit=AuditInput(unlearned=f"/models/{name}"))


def test_leaderboard_lists_audited_checkpoints_apart_unless_submitted(tmp_path):
    from leaderboard_data import make_result, write

    from qubench.leaderboard import ranking, table
    from qubench.leaderboard.data import load_board
    from qubench.leaderboard.rows import build_rows

    for method, forget in (("target", (40.0, 40.0, 41.0)), ("npo", (40.0, 8.0, 12.0)), ("ga", (40.0, 10.0, 20.0))):
        write(_with(make_result(method, forget=forget), model=TARGET), tmp_path / "grid")
    write(_audit_result("theirs", post=11.0), tmp_path / "grid")  # forgets better than every ranked method
    board = load_board([tmp_path / "grid"])
    assert not board.rejected and len(board.runs) == 4  # its run_id is its spec's hash
    rows = ranking.rank(build_rows(board))
    assert [(r.method, r.rank) for r in rows] == [("target", None), ("npo", 1), ("ga", 2), ("external:theirs", None)]
    audited = rows[-1]
    assert audited.audited and audited.standing.startswith("audited checkpoint: listed apart, not ranked")
    assert audited.plugin == "external checkpoint (audited)" and audited.model == TARGET
    frame = table.to_frame(rows)
    assert frame[frame["audited_flag"]]["method"].tolist() == ["external:theirs"]
    assert "external:NAME" in ranking.RULE


def test_leaderboard_page_shows_audited_checkpoints_in_their_own_table(tmp_path, monkeypatch):
    pytest.importorskip("streamlit", reason="the leaderboard extra is not installed")
    from leaderboard_data import make_result, write
    from streamlit.testing.v1 import AppTest

    write(_with(make_result("ga"), model=TARGET), tmp_path / "grid")
    write(_audit_result("theirs", post=11.0), tmp_path / "grid")
    monkeypatch.setenv("QUBENCH_LEADERBOARD_RESULTS", str(tmp_path / "grid"))
    monkeypatch.setenv("QUBENCH_LEADERBOARD_SUBMISSIONS", str(tmp_path / "none"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "leaderboard" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert list(at.dataframe[0].value["method"]) == ["ga"]
    assert any(h.value.startswith("Audited checkpoints (1 rows)") for h in at.subheader)
    audits = next(d.value for d in at.dataframe if "method" in d.value.columns and "external:theirs" in
                  set(d.value["method"]))
    assert list(audits["standing"]) == ["audited checkpoint: listed apart, not ranked (submit it to rank it)"]


def test_a_submitted_audit_is_ranked_with_the_methods(tmp_path):
    from leaderboard_data import make_result, write

    from qubench.leaderboard.rows import _row
    from qubench.leaderboard.data import Run, Source
    from qubench.leaderboard import ranking

    submission = Source(name="theirs", kind="submission", folder=str(tmp_path), badge="not verified")
    runs = {m: _with(make_result(m, forget=(40.0, 10.0, post)), model=TARGET) for m, post in (("ga", 20.0),)}
    runs["audit"] = _audit_result("theirs", post=11.0)
    rows = [_row(submission, [Run(key=k, source="theirs", path=k, sha256="0", text="", result=r, badge="submitted")])
            for k, r in runs.items()]
    ranked = ranking.rank(rows)
    assert [(r.method, r.rank) for r in ranked] == [("external:theirs", 1), ("ga", 2)]
    assert not any(r.audited for r in ranked)


def test_reproduce_command_of_an_audit_recreates_its_spec(monkeypatch):
    import shlex

    from qubench import pipeline
    from qubench.leaderboard import detail
    from qubench.specs import AuditInput

    result = _with(_audit_result("theirs", post=11.0), retrain_model="/models/retrain",
                   audit=AuditInput(unlearned="/models/theirs", allow_identical=True))
    captured = {}

    def fake_run(spec, *args, **kwargs):
        captured["spec"] = spec
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "run", fake_run)
    args = shlex.split(detail.reproduce_command(result).splitlines()[-1])
    assert args[:2] == ["qubench", "audit"] and "--allow-identical" in args
    CliRunner().invoke(main, args[1:])
    assert captured["spec"].run_id() == result.run_id
