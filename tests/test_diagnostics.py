"""The mechanism diagnostics on known perturbations of the tiny model: an update far
below the quantization step rounds back onto the target, one far above it does not."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qubench import diagnostics
from qubench.quantizers.base import QuantizedWeights, per_weight, quantizable_linears
from qubench.quantizers.none import NoQuantization
from qubench.quantizers.rtn import RTN4bit

# 2 layers x (4 attention projections 64x64 + 3 MLP projections 64x128)
QUANTIZED_COUNT = 2 * (4 * 64 * 64 + 3 * 64 * 128)
QUANT = RTN4bit.from_params({"group_size": 32})


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def perturbed(target, steps: float, seed: int = 0):
    """A copy of `target` whose quantized weights each move by `steps` quantization steps,
    with random sign."""
    model = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in QUANT.quantized_modules(model).values():
            w = module.weight
            sign = torch.randint(0, 2, w.shape, generator=gen).float() * 2 - 1
            w += sign * steps * per_weight(QUANT.step_size(w), w.shape)
    return model


@pytest.fixture(scope="module")
def quantize_model(tiny_model_dir, tmp_path_factory):
    """Save a model beside the tiny tokenizer, quantize it, return its dequantized weights."""

    def run(model) -> QuantizedWeights:
        folder = tmp_path_factory.mktemp("model")
        model.save_pretrained(folder / "full")
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder / "full")
        QUANT.quantize(folder / "full", folder / "q", calibration=[])
        return QUANT.dequantized_weights(folder / "q")

    return run


@pytest.fixture(scope="module")
def q_target(target, quantize_model):
    return quantize_model(target)


def test_identical_models_have_zero_delta_and_zero_disagreement(target, q_target, quantize_model):
    deltas = diagnostics.weight_deltas(target, copy.deepcopy(target))
    assert deltas["mean_abs_delta"] == deltas["max_abs_delta"] == 0.0
    assert deltas["overall_mean_abs_delta"] == deltas["overall_max_abs_delta"] == 0.0
    # quantizing the same weights twice gives the same checkpoint
    assert diagnostics.quantized_disagreement(q_target, quantize_model(target)) == 0.0


def test_weight_deltas_by_hand(target):
    unlearned = copy.deepcopy(target)
    with torch.no_grad():
        unlearned.model.layers[0].self_attn.q_proj.weight += 0.001  # 4096 quantized weights
        unlearned.lm_head.weight[0, 0] += 0.5  # not quantized: only in the overall numbers
    deltas = diagnostics.weight_deltas(target, unlearned)
    total = sum(p.numel() for p in target.parameters())
    assert deltas["quantized_weight_count"] == QUANTIZED_COUNT and deltas["overall_weight_count"] == total
    assert deltas["mean_abs_delta"] == pytest.approx(0.001 * 4096 / QUANTIZED_COUNT, rel=1e-5)
    assert deltas["max_abs_delta"] == pytest.approx(0.001, rel=1e-4)
    assert deltas["overall_mean_abs_delta"] == pytest.approx((0.001 * 4096 + 0.5) / total, rel=1e-5)
    assert deltas["overall_max_abs_delta"] == pytest.approx(0.5, rel=1e-6)
    # with lm_head quantized too, its change moves into the quantized numbers
    everything = quantizable_linears(target, [])
    assert diagnostics.weight_deltas(target, unlearned, everything)["max_abs_delta"] == pytest.approx(0.5, rel=1e-6)


def test_mean_step_is_the_average_group_scale(target):
    expected_sum = 0.0
    for module in QUANT.quantized_modules(target).values():
        w = module.weight.detach()
        scales = w.reshape(w.shape[0], -1, 32).abs().amax(-1) / 7.5  # symmetric INT4
        expected_sum += scales.double().sum().item() * 32
    assert diagnostics.mean_step(QUANT, target) == pytest.approx(expected_sum / QUANTIZED_COUNT, rel=1e-6)
    assert diagnostics.mean_step(NoQuantization(), target) == 0.0


def test_an_update_far_below_the_step_rounds_back_to_the_target(target, q_target, quantize_model):
    unlearned = perturbed(target, steps=0.02)
    deltas = diagnostics.weight_deltas(target, unlearned)
    assert deltas["mean_abs_delta"] / diagnostics.mean_step(QUANT, target) == pytest.approx(0.02, rel=0.05)
    q_unlearned = quantize_model(unlearned)
    assert diagnostics.quantized_disagreement(q_target, q_unlearned) < 0.05
    # The raw dequantized values still differ almost everywhere: the update moved each
    # group's largest weight, hence its scale. That is why levels, not values, are compared.
    assert diagnostics.quantized_disagreement(dict(q_target), dict(q_unlearned)) > 0.5


def test_an_update_far_above_the_step_survives_quantization(target, q_target, quantize_model):
    unlearned = perturbed(target, steps=3.0)
    assert diagnostics.quantized_disagreement(q_target, quantize_model(unlearned)) > 0.8


def test_disagreement_compares_grid_levels_when_steps_are_known():
    levels = torch.tensor([[3.0, -2.0, 0.0, 7.0], [1.0, 1.0, -8.0, 5.0]])
    steps = torch.tensor([[0.1, 0.2], [0.3, 0.4]])  # two groups of two per row
    target = QuantizedWeights({"m": levels * per_weight(steps, levels.shape)}, {"m": steps})
    rescaled = steps * 1.01
    same_levels = QuantizedWeights({"m": levels * per_weight(rescaled, levels.shape)}, {"m": rescaled})
    assert diagnostics.quantized_disagreement(target, same_levels) == 0.0
    moved = levels.clone()
    moved[1, 3] += 1
    one_moved = QuantizedWeights({"m": moved * per_weight(steps, levels.shape)}, {"m": steps})
    assert diagnostics.quantized_disagreement(target, one_moved) == pytest.approx(1 / 8)
    # full precision: no steps, so values are compared as they are
    assert diagnostics.quantized_disagreement({"m": levels}, {"m": moved}) == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="different modules"):
        diagnostics.quantized_disagreement({"m": levels}, {"n": levels})


def test_diagnostics_describe_the_weights_the_quantizer_rounds(target, tiny_model_dir, tmp_path):
    """With q_proj left in full precision (`ignore`), a change there is no part of the update measured
    against the quantization step: update and step describe one weight set."""
    from qubench.scoring import diagnostics_for

    quant = RTN4bit.from_params({"group_size": 32, "ignore": ["lm_head", "re:.*q_proj$"]})
    unlearned = copy.deepcopy(target)
    with torch.no_grad():
        unlearned.model.layers[0].self_attn.q_proj.weight += 0.25   # ignored by the quantizer
        unlearned.model.layers[0].self_attn.k_proj.weight += 0.001  # quantized
    folders = {}
    for name, model in (("target", target), ("unlearned", unlearned)):
        model.save_pretrained(tmp_path / name)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / name)
        quant.quantize(tmp_path / name, tmp_path / f"q_{name}", calibration=[])
        folders[name] = tmp_path / name
    d = diagnostics_for(quant, folders["target"], folders["unlearned"], tmp_path / "q_target",
                        tmp_path / "q_unlearned")
    counted = QUANTIZED_COUNT - 2 * 64 * 64  # both layers' q_proj are out
    assert d.extra["quantized_weight_count"] == counted
    assert d.max_abs_delta == pytest.approx(0.001, rel=1e-3)
    assert d.mean_abs_delta == pytest.approx(0.001 * 64 * 64 / counted, rel=1e-3)
    assert d.extra["overall_max_abs_delta"] == pytest.approx(0.25, rel=1e-4)
