"""RTN quantizers (llm-compressor) checked against a hand-written round-to-nearest,
the checkpoint they write, and the full-precision control."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qubench import registry
from qubench.errors import ConfigError
from qubench.quantizers.base import folder_size
from qubench.quantizers.none import NoQuantization
from qubench.quantizers.rtn import RTN2bit, RTN3bit, RTN4bit, RTN8bit

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def direct_rtn(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: symmetric min-max round-to-nearest per group, written out by hand."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True) / ((2**bits - 1) / 2)
    levels = torch.clamp(torch.round(groups / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (levels * scale).reshape(rows, cols), scale.squeeze(-1)


def is_quantized(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in QUANTIZED


@pytest.fixture(scope="module")
def quantized(quantize_once):
    """RTN is data-free: quantize without calibration texts."""
    return lambda cls, **params: quantize_once(cls, (), **params)


def test_entry_points_resolve_to_the_quantizers():
    for name, cls, bits in [("rtn-2bit", RTN2bit, 2), ("rtn-3bit", RTN3bit, 3), ("rtn-4bit", RTN4bit, 4),
                            ("rtn-8bit", RTN8bit, 8)]:
        assert registry.get("quantizers", name) is cls
        assert cls.bits == bits and cls.name == name and f"INT{bits}" in cls.description
    assert registry.get("quantizers", "none") is NoQuantization


@pytest.mark.parametrize("cls,bits,group_size", [(RTN4bit, 4, 32), (RTN4bit, 4, 64), (RTN8bit, 8, 32),
                                                 (RTN8bit, 8, 64)])
def test_llmcompressor_rtn_equals_direct_round_to_nearest(quantized, original, cls, bits, group_size):
    quant, out, _ = quantized(cls, group_size=group_size)
    deq = quant.dequantized_weights(out)
    assert len(deq) == 14  # the seven projections of both layers, no lm_head
    for module, got in deq.items():
        weight = original[f"{module}.weight"]
        expected, scale = direct_rtn(weight, bits, group_size)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(deq.steps[module], scale, rtol=1e-6, atol=0)
        # and rounding really happened, by at most half a step
        assert not torch.equal(got, weight)
        error = (got - weight).abs().reshape(scale.shape[0], scale.shape[1], group_size)
        assert (error <= scale.unsqueeze(-1) / 2 + 1e-7).all()


def test_step_size_is_the_scale_the_checkpoint_uses(quantized, original):
    quant, out, _ = quantized(RTN4bit, group_size=32)
    deq = quant.dequantized_weights(out)
    weight = original["model.layers.1.mlp.down_proj.weight"]
    step = quant.step_size(weight)
    assert step.shape == (64, 128 // 32)
    torch.testing.assert_close(step, deq.steps["model.layers.1.mlp.down_proj"], rtol=0, atol=0)
    # symmetric INT4: max |w| over the group / 7.5
    expected = weight.reshape(64, 4, 32).abs().amax(-1) / 7.5
    torch.testing.assert_close(step, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", [RTN2bit, RTN3bit, RTN4bit, RTN8bit])
def test_quantizes_the_projections_and_leaves_the_rest_bit_identical(quantized, original, cls):
    quant, out, _ = quantized(cls, group_size=32)
    loaded = quant.load_quantized(out).state_dict()
    changed = []
    for name, before in original.items():
        after = loaded[name]
        assert after.dtype == torch.float32
        if is_quantized(name):
            assert not torch.equal(after, before), name
            changed.append(name)
            # each group of 32 holds at most 2**bits distinct values
            for row in after.reshape(-1, 32)[:16]:
                assert torch.unique(row).numel() <= 2**cls.bits
        else:
            assert torch.equal(after, before), f"{name} should stay untouched"
    assert len(changed) == 14
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(original)


def test_checkpoint_is_compressed_tensors_and_loads_in_transformers(quantized, tiny_model_dir):
    quant, out, outcome = quantized(RTN4bit, group_size=32)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    assert qconfig["format"] == "pack-quantized" == quant.scheme()["format"] == outcome.extra["format"]
    assert qconfig["ignore"] == ["lm_head"]
    (group,) = qconfig["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}

    ids = AutoTokenizer.from_pretrained(out)("The council approved a budget", return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(out)  # the compressed route: decompresses on first forward
    with torch.no_grad():
        logits = plain(ids).logits
        ours = quant.load_quantized(out)(ids).logits
        full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(ours, logits)
    assert not torch.allclose(logits, full)  # the quantized weights are what runs

    assert outcome.size_bytes == folder_size(out) > 0
    assert outcome.seconds > 0


def test_scheme_records_the_exact_setup():
    quant = RTN8bit.from_params({"group_size": 64, "symmetric": False, "ignore": ["lm_head", "re:.*down_proj"]})
    scheme = quant.scheme()
    assert scheme == {
        "family": "rtn", "library": "llmcompressor", "library_version": version("llmcompressor"),
        "compressed_tensors_version": version("compressed-tensors"), "format": "pack-quantized", "bits": 8,
        "group_size": 64, "symmetric": False, "strategy": "group", "narrow_layer_strategy": "channel",
        "observer": "memoryless_minmax", "weight_only": True, "ignore": ["lm_head", "re:.*down_proj"],
    }


def test_ignore_patterns_leave_those_layers_in_full_precision(quantized, original):
    quant, out, _ = quantized(RTN4bit, group_size=32, ignore=["lm_head", "re:.*down_proj"])
    deq = quant.dequantized_weights(out)
    assert len(deq) == 12 and not any("down_proj" in k for k in deq)
    loaded = quant.load_quantized(out).state_dict()
    assert torch.equal(loaded["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"])


def test_layers_narrower_than_the_group_fall_back_to_per_channel(quantized, original):
    # default group 128: the 64-wide inputs (q/k/v/o/gate/up) cannot hold a group
    quant, out, outcome = quantized(RTN4bit)
    narrow = outcome.extra["per_channel_modules"]
    assert len(narrow) == 12 and not any("down_proj" in n for n in narrow)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    by_strategy = {g["weights"]["strategy"]: g["targets"] for g in groups}
    assert sorted(by_strategy["channel"]) == sorted(narrow) and by_strategy["group"] == ["Linear"]

    deq = quant.dequantized_weights(out)
    q_proj = original["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(deq["model.layers.0.self_attn.q_proj"], direct_rtn(q_proj, 4, 64)[0])  # one group per row
    down = original["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(deq["model.layers.0.mlp.down_proj"], direct_rtn(down, 4, 128)[0])
    assert quant.step_size(q_proj).shape == (64, 1)


def test_a_group_that_does_not_divide_a_layer_is_a_clear_error(tiny_model_dir, tmp_path):
    quant = RTN4bit.from_params({"group_size": 48})
    with pytest.raises(ConfigError, match=r"group_size 48 does not divide the 64 input columns of model\.layers\.0"):
        quant.quantize(tiny_model_dir, tmp_path / "out", calibration=[])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="does not divide"):
        quant.step_size(torch.randn(8, 64))


def test_unknown_and_invalid_parameters_are_config_errors():
    with pytest.raises(ConfigError) as err:
        RTN4bit.from_params({"group": 7})
    assert "group" in str(err.value) and "allowed parameters: group_size (default 128)" in str(err.value)
    assert "symmetric" in str(err.value) and "ignore" in str(err.value)
    with pytest.raises(ConfigError, match="group_size"):
        RTN4bit.from_params({"group_size": 0})
    with pytest.raises(ConfigError, match="bits"):  # the bit width is the plugin's identity, not a knob
        RTN4bit.from_params({"bits": 3})
    with pytest.raises(ConfigError, match="bits"):
        NoQuantization.from_params({"bits": 8})
    assert RTN4bit.from_params({}).params() == {"group_size": 128, "symmetric": True, "ignore": ["lm_head"]}


def test_no_quantization_is_an_exact_control(tiny_model_dir, tmp_path, original):
    quant = NoQuantization()
    outcome = quant.quantize(tiny_model_dir, tmp_path / "fp", calibration=["ignored"])
    assert outcome.size_bytes == folder_size(tmp_path / "fp")
    assert quant.scheme() == {"family": "none", "bits": 32, "dtype": "float32"}
    loaded = quant.load_quantized(tmp_path / "fp").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in original.items())
    weights = quant.dequantized_weights(tmp_path / "fp")
    assert len(weights) == 14 and weights.steps == {}
    assert torch.equal(weights["model.layers.1.mlp.up_proj"], original["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(quant.step_size(original["lm_head.weight"]), torch.zeros(original["lm_head.weight"].shape[0], 1))
    AutoTokenizer.from_pretrained(tmp_path / "fp")


def test_no_quantization_16_bit_stores_bfloat16(tiny_model_dir, tmp_path, original):
    quant = NoQuantization.from_params({"bits": 16})
    quant.quantize(tiny_model_dir, tmp_path / "bf16", calibration=[])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = quant.load_quantized(tmp_path / "bf16").state_dict()
    w = original["model.layers.0.self_attn.q_proj.weight"]
    assert loaded["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], w.to(torch.bfloat16).float())
