"""The known-answer control `+inbucket`: exact bucket edges under the libraries' own arithmetic,
frozen unquantized weights, and quantized checkpoints bit-identical to the quantized target's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import quantize
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qubench import registry
from qubench.errors import ConfigError
from qubench.methods import inbucket as inbucket_module
from qubench.methods.base import UnlearnContext
from qubench.methods.inbucket import InBucketError, bucket, fit_of, scheme_quantizer
from qubench.tasks.muse_layout import TaskData

from toy_corpus import FORGET, RETAIN

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
# Large steps so that many weights reach their bucket walls within a few steps.
MOVE = {"lr": 5e-3, "batch_size": 1, "grad_accum": 1, "max_len": 32, "max_steps": 4}


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))


def unlearn(method: str, params: dict, target: Path, out: Path):
    plugin = registry.create("methods", method, params)
    data = TaskData(out.parent, list(FORGET), list(RETAIN), [], [], [], [], [], [], [], [], [])
    return plugin.unlearn(UnlearnContext(target, None, data, out, seed=0, progress=False))


def ct_levels(quantizer, weight: torch.Tensor, scale, zero) -> torch.Tensor:
    """compressed-tensors' own quantize, as its pack-quantized compressor calls it."""
    args = quantizer._args(per_channel=quantizer._is_narrow(weight.shape[-1]))
    return quantize(x=weight, scale=scale, zero_point=zero, args=args, dtype=torch.int8)


# --- bucket edges -----------------------------------------------------------------------------


def test_bucket_edges_by_hand_round_half_to_even_and_clamp():
    # One row of 8 (narrower than a group of 128: per channel). Symmetric 4-bit: absmax 7.5
    # -> scale 7.5 / 7.5 = 1 exactly, levels -8..7.
    row = torch.tensor([[7.5, 2.5, 3.0, -1.5, 7.2, 0.0, -6.0, 1.0]])
    quantizer = scheme_quantizer("rtn-4bit")
    fit = fit_of(quantizer, "layer", row)
    assert fit.scales[0].item() == 1.0
    found = bucket(fit, row)
    low, high = found.low[0].tolist(), found.high[0].tolist()
    up, down = (lambda x: torch.nextafter(torch.tensor(x), torch.tensor(9.0)).item(),
                lambda x: torch.nextafter(torch.tensor(x), torch.tensor(-9.0)).item())
    assert (low[0], high[0]) == (7.5, 7.5)          # the absmax sets the scale: pinned
    assert (low[1], high[1]) == (1.5, 2.5)          # level 2 is even: both halves round to it
    assert (low[2], high[2]) == (up(2.5), down(3.5))  # level 3 is odd: both halves round away
    assert (low[3], high[3]) == (-2.5, -1.5)        # -1.5 -> -2 (even); the bucket of -2 is [-2.5, -1.5]
    assert (low[4], high[4]) == (up(6.5), 7.5)      # level 7 is the clamp top: up to the pinned max
    assert (low[5], high[5]) == (-0.5, 0.5)
    assert (low[6], high[6]) == (-6.0, -6.0)        # the group min is pinned too (asymmetric schemes need it)
    assert (low[7], high[7]) == (up(0.5), down(1.5))
    assert found.pinned == 2 and min(low) == -6.0   # no other weight may pass the group's min or max


@pytest.mark.parametrize("name, params", [
    ("rtn-4bit", {}), ("rtn-4bit", {"symmetric": False}), ("rtn-2bit", {"group_size": 32}),
    ("rtn-3bit", {"symmetric": False, "group_size": 64}), ("rtn-8bit", {}), ("rtn-8bit", {"symmetric": False}),
])
@pytest.mark.parametrize("shape", [(6, 128), (6, 64), (3, 384)])  # one group, narrow (per channel), 3 groups
def test_rtn_bucket_edges_are_exact_under_compressed_tensors(name, params, shape):
    torch.manual_seed(len(shape) + shape[1])
    weight = torch.randn(shape) * 0.05
    quantizer = scheme_quantizer(name, params)
    fit = fit_of(quantizer, "layer", weight)
    found = bucket(fit, weight)
    scale, zero = fit.scales
    target = ct_levels(quantizer, weight, scale, zero)
    assert torch.equal(ct_levels(quantizer, found.low, scale, zero), target)
    assert torch.equal(ct_levels(quantizer, found.high, scale, zero), target)
    # maximal: one float further out is another level, unless the group's range stopped the bound
    free = found.low != found.high
    outside_low = torch.nextafter(found.low, torch.tensor(float("-inf")))
    outside_high = torch.nextafter(found.high, torch.tensor(float("inf")))
    at_edge_low = free & (found.low > fit.range_low)
    at_edge_high = free & (found.high < fit.range_high)
    assert at_edge_low.sum() > weight.numel() // 2 and at_edge_high.sum() > weight.numel() // 2
    assert (ct_levels(quantizer, outside_low, scale, zero) != target)[at_edge_low].all()
    assert (ct_levels(quantizer, outside_high, scale, zero) != target)[at_edge_high].all()
    # any value inside keeps the level, and the observer's scale and zero point with it
    inside = found.low + torch.rand(shape) * (found.high - found.low)
    again = fit_of(quantizer, "layer", inside)
    assert torch.equal(again.scales[0], scale) and torch.equal(again.scales[1], zero)
    assert torch.equal(ct_levels(quantizer, inside, scale, zero), target)


def test_bf16_buckets_hold_under_both_the_cpu_and_the_float32_gpu_arithmetic():
    torch.manual_seed(3)
    weight = (torch.randn(4, 128) * 0.05).to(torch.bfloat16)
    quantizer = scheme_quantizer("rtn-4bit")
    fit = fit_of(quantizer, "layer", weight)
    found = bucket(fit, weight)
    assert len(fit.level_fns) == 2  # the checkpoint's dtype and float32 (compressed-tensors' Triton kernel)
    for level_of, levels in zip(fit.level_fns, found.levels):
        for bound in (found.low, found.high):
            assert torch.equal(bound.to(torch.bfloat16).float(), bound)  # representable: survives the save cast
            assert torch.equal(level_of(bound.to(torch.bfloat16)), levels)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("name", ["bnb-nf4", "bnb-fp4"])
def test_bnb_bucket_edges_keep_bitsandbytes_codes(name):
    from bitsandbytes.functional import quantize_4bit

    torch.manual_seed(5)
    weight = torch.randn(8, 128) * 0.05
    fit = fit_of(scheme_quantizer(name), "layer", weight)
    found = bucket(fit, weight)

    def packed(x):
        codes, state = quantize_4bit(x.contiguous(), blocksize=64, compress_statistics=False, quant_type=name[4:])
        return codes, state.absmax

    target_codes, target_absmax = packed(weight)
    for bound in (found.low, found.high, found.low + torch.rand_like(weight) * (found.high - found.low)):
        codes, absmax = packed(bound)
        assert torch.equal(codes, target_codes) and torch.equal(absmax, target_absmax)
    assert found.pinned == 8 * 128 // 64  # one absmax per block
    assert ((found.high - found.low) / fit.step).mean() > 0.5  # real room, not a pin


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("params, message", [
    ({"inbucket_scheme": "gptq-4bit"}, r"only the RTN schemes .* GPTQ and AWQ choose levels"),
    ({"inbucket_scheme": "bnb-int8"}, r"only the RTN schemes"),
    ({"inbucket_scheme": "none"}, r"only the RTN schemes"),
    ({"inbucket_scheme": "rtn-5bit"}, r"unknown quantizer 'rtn-5bit'"),
    ({"inbucket_scheme_params": {"group_sise": 64}}, r"(?s)group_sise: Extra inputs.*allowed parameters: group_size"),
])
def test_schemes_without_fixed_buckets_are_refused_before_any_work(params, message):
    with pytest.raises(ConfigError, match=message):
        registry.create("methods", "ga_gdr+inbucket", params)


def test_inbucket_composes_with_sure_and_hinge_but_not_lora():
    method = registry.create("methods", "npo_klr+inbucket+hinge+sure",
                             {"inbucket_scheme": "rtn-3bit", "inbucket_scheme_params": {"group_size": 32}})
    assert method.name == "npo_klr+sure+hinge+inbucket"  # inbucket last: it freezes after sure chose
    params = method.params()
    assert params["composition"]["modifiers"] == ["sure", "hinge", "inbucket"]
    assert (params["inbucket_scheme"], params["inbucket_scheme_params"]) == ("rtn-3bit", {"group_size": 32})
    control = registry.create("methods", "ga_gdr+inbucket").params()
    assert (control["inbucket_scheme"], control["lr"], control["alpha"]) == ("rtn-4bit", 1e-4, 3.0)
    plain = registry.create("methods", "ga+inbucket").params()  # no retain term: only lr changes
    assert plain["lr"] == 1e-4 and "alpha" not in plain
    assert registry.create("methods", "ga_gdr+sure+inbucket").params()["lr"] == 1e-4  # sure agrees
    with pytest.raises(ConfigError, match=r"combines 'inbucket' and 'lora'.*low-rank product"):
        registry.get("methods", "ga_gdr+lora+inbucket")


# --- training: the quantized unlearned model is the quantized target --------------------------


def quantized_tensors(quantizer_name: str, params: dict, model_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    registry.create("quantizers", quantizer_name, params).quantize(model_dir, out, calibration=[])
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("scheme, params", [
    ("rtn-4bit", {}),
    ("rtn-3bit", {"symmetric": False, "group_size": 32}),
    ("rtn-8bit", {}),
    pytest.param("bnb-nf4", {}, marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")),
])
def test_quantized_checkpoint_is_bit_identical_to_the_quantized_target(scheme, params, tiny_model_dir, tmp_path):
    out = tmp_path / "unlearned"
    outcome = unlearn("ga_gdr+inbucket", {**MOVE, "inbucket_scheme": scheme, "inbucket_scheme_params": params},
                      tiny_model_dir, out)
    summary = outcome.extra["inbucket"]
    assert summary["verified"] and summary["share_at_bucket_wall"] > 0.05  # the walls really constrained it

    target, unlearned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    hidden = {f"{name}.weight" for name in inbucket_module.quantized_weights(
        scheme_quantizer(scheme, params), AutoModelForCausalLM.from_pretrained(tiny_model_dir))}
    assert hidden and all(not torch.equal(target[k], unlearned[k]) for k in hidden)  # every quantized layer moved
    assert all(torch.equal(target[k], unlearned[k]) for k in target if k not in hidden)  # embeddings, norms, head

    q_target = quantized_tensors(scheme, params, tiny_model_dir, tmp_path / "q_target")
    q_unlearned = quantized_tensors(scheme, params, out, tmp_path / "q_unlearned")
    assert q_target.keys() == q_unlearned.keys()
    packed = [k for k in q_target if k.endswith(("weight_packed", ".weight"))]
    assert len(packed) > len(hidden)
    assert all(torch.equal(q_target[k], q_unlearned[k]) for k in q_target), \
        [k for k in q_target if not torch.equal(q_target[k], q_unlearned[k])]


def test_bf16_checkpoint_quantizes_to_the_bf16_target(tiny_model_dir, tmp_path):
    bf16 = tmp_path / "bf16_target"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16)
    unlearn("ga_gdr+inbucket", MOVE, bf16, tmp_path / "unlearned")
    q_target = quantized_tensors("rtn-4bit", {}, bf16, tmp_path / "q_target")
    q_unlearned = quantized_tensors("rtn-4bit", {}, tmp_path / "unlearned", tmp_path / "q_unlearned")
    assert all(torch.equal(q_target[k], q_unlearned[k]) for k in q_target)
    assert not torch.equal(load_file(bf16 / "model.safetensors")["model.layers.0.mlp.up_proj.weight"],
                           load_file(tmp_path / "unlearned" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"])


def test_with_sure_rows_and_weight_decay_the_head_stays_frozen(tiny_model_dir, tmp_path):
    # sure's row mask may pick lm_head rows and decay them in its own pre-step hook; lm_head is
    # unquantized, so inbucket puts it back after every step.
    out = tmp_path / "unlearned"
    outcome = unlearn("ga_gdr+sure+inbucket", {**MOVE, "sure_granularity": "row", "sure_percentile": 10,
                                               "weight_decay": 0.5}, tiny_model_dir, out)
    assert "lm_head" in outcome.extra["sure"]["modules_touched"] and outcome.extra["inbucket"]["verified"]
    target, unlearned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(target["lm_head.weight"], unlearned["lm_head.weight"])
    assert not torch.equal(target["model.layers.1.self_attn.o_proj.weight"],
                           unlearned["model.layers.1.self_attn.o_proj.weight"])


def test_npo_with_the_hinge_stays_hidden_too(tiny_model_dir, tmp_path):
    # the hinge pushes forget logits away from the target's; the buckets still decide what rtn-4bit sees
    outcome = unlearn("npo_klr+hinge+inbucket", MOVE, tiny_model_dir, tmp_path / "unlearned")
    assert outcome.extra["inbucket"]["verified"] and outcome.extra["hinge"]["final_hinge"] is not None
    q_target = quantized_tensors("rtn-4bit", {}, tiny_model_dir, tmp_path / "q_target")
    q_unlearned = quantized_tensors("rtn-4bit", {}, tmp_path / "unlearned", tmp_path / "q_unlearned")
    assert all(torch.equal(q_target[k], q_unlearned[k]) for k in q_target)


def test_the_final_check_catches_a_weight_outside_its_bucket(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(inbucket_module.InBucket, "_project", lambda self, *args: None)  # a broken projection
    with pytest.raises(InBucketError, match="please report this bug"):
        unlearn("ga_gdr+inbucket", MOVE, tiny_model_dir, tmp_path / "unlearned")


def test_the_same_training_without_buckets_changes_the_quantized_checkpoint(tiny_model_dir, tmp_path):
    # the contrast that makes the identity above a finding: the plain base moves weights across levels
    unlearn("ga_gdr", MOVE, tiny_model_dir, tmp_path / "plain")
    q_target = quantized_tensors("rtn-4bit", {}, tiny_model_dir, tmp_path / "q_target")
    q_plain = quantized_tensors("rtn-4bit", {}, tmp_path / "plain", tmp_path / "q_plain")
    assert any(not torch.equal(q_target[k], q_plain[k]) for k in q_target if k.endswith("weight_packed"))


# --- end to end: the control reads 100% recovery by construction -----------------------------

MICRO = ["--task-param", "size=micro", "--method-param", "epochs=2", "--method-param", "lr=1e-3",
         "--method-param", "batch_size=4", "--method-param", "grad_accum=1", "--limit", "4"]


def test_micro_run_quantized_control_equals_quantized_target(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from qubench import results
    from qubench.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("QUBENCH_HOME", str(home))
    res = CliRunner().invoke(main, ["run", *MICRO, "--method", "ga_gdr+inbucket", "--quant", "rtn-4bit",
                                    "--results", str(tmp_path / "results"), "--json"])
    assert res.exit_code == 0, res.output
    result = results.RunResult.model_validate(json.loads(res.stdout))
    assert result.unlearning["extra"]["inbucket"]["verified"]
    assert result.diagnostics.quantized_disagreement == 0.0 and result.diagnostics.mean_abs_delta > 0
    moved = [name for name, row in result.metrics.items() if row.pre != row.target_pre]
    assert moved  # the unlearned model differs from the target at full precision ...
    for name, row in result.metrics.items():
        assert row.post == row.target_post, name  # ... and is the target once quantized
    folders = sorted((home / "quantized").glob("rtn-4bit-*"))
    assert len(folders) == 3  # the quantized target, retrain and control
    packed = [{k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()} for d in folders]
    assert all(p.keys() == packed[0].keys() for p in packed) and any(k.endswith("weight_packed") for k in packed[0])
    same = [(i, j) for i in range(3) for j in range(i + 1, 3)
            if all(torch.equal(packed[i][k], packed[j][k]) for k in packed[i])]
    assert len(same) == 1  # the control's packed checkpoint is the target's, bit for bit; the retrain's is not


def test_inbucket_compositions_are_known_answer_controls_and_plain_methods_are_not():
    from qubench import registry

    assert registry.get("methods", "ga_gdr+inbucket").is_control
    assert registry.get("methods", "npo_klr+hinge+inbucket").is_control
    assert not registry.get("methods", "ga_gdr+hinge").is_control and not registry.get("methods", "quail").is_control
