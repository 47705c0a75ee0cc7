"""Quantization-robust unlearning: the QUAIL hinge, the SURE mask, LoRA, and method composition."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from qubench import registry
from qubench.errors import ConfigError
from qubench.methods.base import UnlearnContext
from qubench.methods.compose import compose
from qubench.methods.data import chunk_documents, collate
from qubench.methods.ga import GA_GDR
from qubench.methods.hinge import LogitCache, _select, derive_delta_q, hinge_loss, write_logit_cache
from qubench.stages import HingeLogits
from qubench.methods.lora import add_adapters
from qubench.methods.losses import gradient_ascent_loss, logits_of
from qubench.methods.saliency import exclude_rows_from_decay
from qubench.tasks.muse_layout import TaskData

from toy_corpus import FAST, FORGET, RETAIN



@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Each test gets its own QUBENCH_HOME, so logit caches never leak between tests."""
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(method: str, params: dict, target: Path, out: Path):
    plugin = registry.create("methods", method, params)
    data = TaskData(out.parent, list(FORGET), list(RETAIN), [], [], [], [], [], [], [], [], [])
    return plugin.unlearn(UnlearnContext(target, None, data, out, seed=0, progress=False))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def load(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def forget_batch(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = chunk_documents(FORGET, tokenizer, 32)
    return windows, collate(windows, tokenizer.pad_token_id), tokenizer.pad_token_id


# --- the hinge -------------------------------------------------------------


def test_hinge_matches_hand_values():
    target = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    model = torch.tensor([[[0.2, -0.6, 0.5], [1.0, 1.0, 3.0]]])
    # gaps |z' - z| = [.2 .6 .5] [0 0 2]; margin delta/2 = .5 -> hinge [.3 0 0] [.5 .5 0]
    loss, met = hinge_loss(model, target, None, torch.tensor([[1, 1]]), delta_q=1.0)
    assert loss.item() == pytest.approx(1.3 / 6)
    assert met.item() == pytest.approx(3 / 6)  # .6, .5 (exactly on the margin counts as met) and 2
    loss, met = hinge_loss(model, target, None, torch.tensor([[1, 0]]), delta_q=1.0)  # second position is padding
    assert loss.item() == pytest.approx(0.3 / 3) and met.item() == pytest.approx(2 / 3)
    loss, _ = hinge_loss(model, target, None, torch.tensor([[1, 1]]), delta_q=0.5)  # margin .25
    assert loss.item() == pytest.approx((0.05 + 0.25 + 0.25) / 6)


def test_hinge_is_zero_with_no_gradient_once_every_margin_is_met():
    target = torch.zeros(1, 2, 3)
    model = torch.tensor([[[0.5, -0.7, 2.0], [-3.0, 0.9, 0.6]]], requires_grad=True)
    loss, met = hinge_loss(model, target, None, torch.ones(1, 2), delta_q=1.0)
    assert loss.item() == 0.0 and met.item() == 1.0
    loss.backward()
    assert torch.count_nonzero(model.grad) == 0


def test_hinge_top_k_considers_only_the_targets_largest_logits():
    full = torch.tensor([[[5.0, 1.0, 4.0, 0.0]]])
    values, ids = _select(full[0], top_k=2)
    assert ids.tolist() == [[0, 2]] and values.tolist() == [[5.0, 4.0]]
    # The model moved logits 1 and 3 far away but left the top two (0 and 2) in place: full hinge.
    model = torch.tensor([[[5.0, 9.0, 4.0, -9.0]]])
    loss, met = hinge_loss(model, values.unsqueeze(0), ids.unsqueeze(0), torch.ones(1, 1), delta_q=1.0)
    assert loss.item() == pytest.approx(0.5) and met.item() == 0.0
    loss, met = hinge_loss(model, full, None, torch.ones(1, 1), delta_q=1.0)  # all vocabulary: half are met
    assert loss.item() == pytest.approx(0.25) and met.item() == 0.5


def test_cached_target_logits_are_exact_and_gradient_reaches_only_the_model(tiny_model_dir, tmp_path):
    target = load(tiny_model_dir)
    windows, batch, pad_id = forget_batch(tiny_model_dir)
    path = tmp_path / "cache.safetensors"
    write_logit_cache(path, target, windows, pad_id, top_k=None)
    cached, ids = LogitCache(path, windows).batch(batch)
    assert ids is None and not cached.requires_grad
    with torch.no_grad():
        expected = logits_of(target, batch)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(cached[real], expected[real])

    model = copy.deepcopy(target).train()
    with torch.no_grad():
        model.lm_head.weight.add_(0.01 * torch.randn_like(model.lm_head.weight))  # z' != z, so the hinge has a slope
    loss, _ = hinge_loss(logits_of(model, batch), cached, None, batch.attention_mask, delta_q=1.0)
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())


def test_logit_cache_is_built_once_and_reused_from_disk(tiny_model_dir, tmp_path, monkeypatch, private_home):
    builds = []
    real_build = HingeLogits.build
    monkeypatch.setattr(HingeLogits, "build", lambda self, tmp: builds.append(1) or real_build(self, tmp))
    first = run("quail", FAST, tiny_model_dir, tmp_path / "a")
    [cache_file] = (private_home / HingeLogits.kind).glob("*.safetensors")
    stamp = cache_file.stat().st_mtime_ns
    second = run("quail", FAST, tiny_model_dir, tmp_path / "b")
    assert len(builds) == 1 and cache_file.stat().st_mtime_ns == stamp
    assert (first.extra["hinge"]["cache_reused"], second.extra["hinge"]["cache_reused"]) == (False, True)
    assert first.log == second.log  # same logits from disk as freshly computed
    run("quail", {**FAST, "hinge_top_k": 4}, tiny_model_dir, tmp_path / "c")  # K is part of the key
    assert len(builds) == 2


def test_quail_logs_hinge_terms_and_adds_gamma_times_hinge(tiny_model_dir, tmp_path):
    outcome = run("quail", {**FAST, "hinge_gamma": 3.0, "hinge_top_k": 8}, tiny_model_dir, tmp_path / "out")
    for entry in outcome.log:
        assert 0.0 <= entry["hinge_margin_met"] <= 1.0 and 0.0 < entry["hinge"] <= 0.5
        assert entry["loss"] == pytest.approx(entry["forget"] + entry["retain"] + 3.0 * entry["hinge"], rel=1e-5)
    # Step 1: model == target, every gap is 0, so the hinge is exactly delta_q / 2 and no margin is met.
    assert outcome.log[0]["hinge"] == pytest.approx(0.5) and outcome.log[0]["hinge_margin_met"] == 0.0
    extra = outcome.extra["hinge"]
    assert extra["delta_q"] == 1.0 and extra["gamma"] == 3.0 and extra["top_k"] == 8
    assert extra["final_hinge"] == pytest.approx(outcome.log[-1]["hinge"])


def test_delta_q_derived_from_a_quantizer(tiny_model_dir):
    windows, _, pad_id = forget_batch(tiny_model_dir)
    four = derive_delta_q(registry.create("quantizers", "rtn-4bit"), tiny_model_dir, windows, pad_id, top_k=None)
    eight = derive_delta_q(registry.create("quantizers", "rtn-8bit"), tiny_model_dir, windows, pad_id, top_k=None)
    # Rounding error scales with the step: 16x finer grid at 8 bits (2^4 more levels), up to noise.
    assert four > 0 and 8 < four / eight < 32
    with pytest.raises(ConfigError, match="no rounding grid"):
        run("quail", {**FAST, "hinge_delta_q": "none"}, tiny_model_dir, tiny_model_dir.parent / "none_out")


# --- SURE -------------------------------------------------------------------


def test_sure_trains_only_the_salient_modules(tiny_model_dir, tmp_path):
    outcome = run("sure", FAST, tiny_model_dir, tmp_path / "out")
    salient = outcome.extra["sure"]["salient_modules"]
    # 15 Linear modules; the 90th percentile of 15 norms lies between the 2nd and 3rd largest.
    assert outcome.extra["sure"]["linear_modules"] == 15 and len(salient) == 2
    before, after = weights(tiny_model_dir), weights(tmp_path / "out")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.weight" for name in salient}


def test_sure_picks_the_modules_with_the_largest_forget_gradients(tiny_model_dir, tmp_path):
    outcome = run("sure", {**FAST, "sure_percentile": 75}, tiny_model_dir, tmp_path / "out")
    model = load(tiny_model_dir)
    windows, _, pad_id = forget_batch(tiny_model_dir)
    for window in windows:  # batch_size 1: the mean over batches
        (gradient_ascent_loss(model, collate([window], pad_id)) / len(windows)).backward()
    norms = {n: m.weight.grad.norm().item() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    cut = np.percentile(list(norms.values()), 75)
    assert outcome.extra["sure"]["salient_modules"] == sorted(n for n, v in norms.items() if v >= cut)
    assert len(outcome.extra["sure"]["salient_modules"]) == 4  # ceil(15 * 0.25)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sure_row_mask_leaves_other_rows_bit_identical(tiny_model_dir, tmp_path, weight_decay):
    params = {**FAST, "max_steps": 3, "sure_granularity": "row", "weight_decay": weight_decay}
    stats = run("ga_gdr+sure", params, tiny_model_dir, tmp_path / "out").extra["sure"]
    before, after = weights(tiny_model_dir), weights(tmp_path / "out")
    changed_rows = 0
    for key in before:
        rows_differ = (before[key] != after[key]).reshape(before[key].shape[0], -1).any(dim=1)
        if key.removesuffix(".weight") not in stats["modules_touched"]:
            assert not rows_differ.any(), key  # frozen modules (and embeddings, norms) untouched
        changed_rows += int(rows_differ.sum())
    # Exactly the salient rows moved: weight decay did not shrink the masked ones.
    assert changed_rows == stats["salient_rows"] and 0 < stats["salient_rows"] < stats["total_rows"]


def test_row_decay_matches_adamw_on_salient_rows_and_spares_the_rest():
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    mask = torch.tensor([True, False, True, False])
    grads = [torch.randn(4, 3) * mask.view(-1, 1) for _ in range(3)]

    ours = torch.nn.Parameter(start.clone())
    opt = torch.optim.AdamW([ours], lr=0.1, weight_decay=0.5)
    exclude_rows_from_decay(opt, {ours: mask}, weight_decay=0.5)
    plain = torch.nn.Parameter(start.clone())
    reference = torch.optim.AdamW([plain], lr=0.1, weight_decay=0.5)
    for g in grads:
        ours.grad, plain.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    assert torch.equal(ours.detach()[~mask], start[~mask])  # zero gradients from the start: never moved
    torch.testing.assert_close(ours.detach()[mask], plain.detach()[mask])  # same AdamW update where trained
    assert not torch.equal(plain.detach()[~mask], start[~mask])  # what plain AdamW decay would have done


# --- LoRA -------------------------------------------------------------------


def test_lora_merge_gives_the_adapter_models_outputs(tiny_model_dir):
    _, batch, _ = forget_batch(tiny_model_dir)
    model = add_adapters(load(tiny_model_dir), r=4, alpha=8, dropout=0.0, targets=["q_proj", "down_proj"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at 0; make the adapters matter
        adapted = logits_of(model.eval(), batch)
        merged = model.merge_and_unload()
        assert type(merged) is LlamaForCausalLM
        torch.testing.assert_close(logits_of(merged, batch), adapted, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(logits_of(load(tiny_model_dir), batch), adapted, atol=1e-3)


def test_lora_saves_a_plain_merged_model(tiny_model_dir, tmp_path):
    outcome = run("lora", {**FAST, "lora_r": 4}, tiny_model_dir, tmp_path / "out")
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert type(AutoModelForCausalLM.from_pretrained(out)) is LlamaForCausalLM
    before, after = weights(tiny_model_dir), weights(out)
    assert before.keys() == after.keys()  # no lora_A / lora_B tensors, no renamed base_layer keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed == {k for k in before if k.split(".")[-2] in targets}  # embeddings, norms, lm_head untouched
    assert outcome.extra["lora"]["r"] == 4 and outcome.extra["lora"]["trainable_parameters"] > 0


def test_lora_unknown_target_module_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no Linear module.*q_proj"):
        run("lora", {**FAST, "lora_target_modules": ["q_proj", "qkv"]}, tiny_model_dir, tmp_path / "out")


# --- composition ------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ga_gdr+hing", r"unknown modifier 'hing'.*Did you mean 'hinge'"),
        ("ga_gdr+hinge+hinge", r"'hinge' twice"),
        ("ga_gdr+sure+lora", r"combines 'lora' and 'sure'.*both decide which weights move"),
        ("ga+npo", r"'npo' is a method: a composition has one base"),
        ("hinge+ga_gdr", r"base loss comes first"),
        ("ga_gdr++hinge", r"empty part"),
        ("quail+lora", r"already a composition \(ga_gdr\+hinge\).*ga_gdr\+hinge\+lora"),
        ("target+hinge", r"not a loss-based method"),
        ("ga_gdx+hinge", r"unknown method 'ga_gdx'.*Did you mean 'ga_gdr'"),
    ],
)
def test_invalid_compositions_explain_themselves(spec, message):
    with pytest.raises(ConfigError, match=message):
        registry.get("methods", spec)


def test_composition_merges_configs_and_records_itself():
    method = registry.create("methods", "npo_klr+hinge+sure", {"beta": 0.2, "hinge_gamma": 2, "sure_percentile": 50})
    assert method.name == "npo_klr+sure+hinge"  # canonical order: one method, one cache entry
    assert registry.get("methods", "npo_klr+hinge+sure") is registry.get("methods", "npo_klr+sure+hinge")
    params = method.params()
    assert params["composition"] == {"base": "npo_klr", "modifiers": ["sure", "hinge"]}
    assert (params["beta"], params["hinge_gamma"], params["sure_percentile"], params["lr"]) == (0.2, 2, 50, 1e-4)
    assert registry.create("methods", "npo_klr+hinge").params()["lr"] == 1e-5  # hinge keeps the base's lr
    with pytest.raises(ConfigError, match=r"(?s)gamma: Extra inputs.*allowed parameters: .*hinge_gamma"):
        registry.create("methods", "ga+hinge", {"gamma": 1.0})
    with pytest.raises(ConfigError, match="alpha"):
        registry.create("methods", "ga+hinge", {"alpha": 1.0})  # plain GA still has no retain weight
    with pytest.raises(ConfigError, match="hinge_delta_q.*neither a number nor a quantizer"):
        registry.create("methods", "quail", {"hinge_delta_q": "rtn-5bit"})
    assert registry.get("methods", "ga_gdr") is GA_GDR  # names without '+' resolve as before


def test_presets_are_their_papers_compositions():
    expected = {"quail": ("ga_gdr", ["hinge"]), "sure": ("ga_gdr", ["sure"]), "lora": ("ga_gdr", ["lora"])}
    for name, (base, modifiers) in expected.items():
        params = registry.create("methods", name).params()
        assert params["composition"] == {"base": base, "modifiers": modifiers}
        assert issubclass(registry.get("methods", name), compose(f"{base}+{modifiers[0]}"))
    quail, sure, lora = (registry.create("methods", n).config for n in ("quail", "sure", "lora"))
    assert (quail.hinge_gamma, quail.hinge_delta_q, quail.hinge_top_k, quail.lr) == (8.0, 1.0, None, 1e-5)
    assert (sure.sure_percentile, sure.sure_granularity, sure.lr) == (90.0, "module", 1e-4)
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lr) == (32, 32.0, 0.05, 1e-4)
    assert lora.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("method", ["quail", "sure", "lora", "npo_klr+hinge", "ga_gdr+lora", "ga_gdr+sure+hinge"])
def test_robust_method_writes_a_changed_loadable_model(method, tiny_model_dir, tmp_path):
    outcome = run(method, {**FAST, "max_steps": 3}, tiny_model_dir, tmp_path / "out")
    assert outcome.steps == 3 and all(math.isfinite(e["loss"]) for e in outcome.log)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) is LlamaForCausalLM
    before, after = weights(tiny_model_dir), weights(tmp_path / "out")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    for modifier in registry.create("methods", method).params()["composition"]["modifiers"]:
        assert outcome.extra[modifier], modifier  # each modifier reports what it did
