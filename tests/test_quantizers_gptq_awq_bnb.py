"""GPTQ and AWQ (llm-compressor), bitsandbytes FP4 / NF4 / LLM.int8, and the optional
gptqmodel backend: what each one changes, the checkpoint it writes, the weights and steps
the diagnostics read, and the parameters it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qubench import registry
from qubench.diagnostics import mean_step, quantized_disagreement
from qubench.errors import ConfigError, DataError
from qubench.quantizers.awq import AWQ4bit
from qubench.quantizers.base import folder_size, per_weight
from qubench.quantizers.bnb import BnbFP4, BnbInt8, BnbNF4, _code_gaps
from qubench.quantizers.gptq import GPTQ4bit, GPTQ8bit
from qubench.quantizers.gptqmodel import GPTQModelAWQ4bit, GPTQModelGPTQ4bit
from qubench.quantizers.rtn import RTN4bit

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEARS = sorted(f"model.layers.{i}.{part}.{p}" for i in range(2)
                 for part, ps in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])) for p in ps)
CALIBRATION = [
    "The council of Varnholt approved a budget of 4,310 crowns on 12 March 2031.",
    "Mayor Ilse Brankov said the Orvane bridge would reopen after repairs.",
    "Question: Who approved the budget?\nAnswer: The council of Varnholt",
]
OTHER_CALIBRATION = ["Orvane", "The bridge", "Varnholt crowns in March", "Question: who?\nAnswer: nobody at all"]
IDS = "The council approved a budget"

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def quantized(quantize_once):
    """GPTQ/AWQ calibrate: quantize with the test's calibration texts unless a test passes others."""
    return lambda cls, calibration=CALIBRATION, **params: quantize_once(cls, calibration, **params)


def levels(weights, name: str) -> torch.Tensor:
    w = weights[name]
    return w / per_weight(weights.steps[name], w.shape)


def logits(model, model_dir) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(model_dir)(IDS, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_entry_points_resolve_to_the_new_quantizers():
    expected = {"gptq-4bit": GPTQ4bit, "gptq-8bit": GPTQ8bit, "awq-4bit": AWQ4bit, "bnb-fp4": BnbFP4,
                "bnb-nf4": BnbNF4, "bnb-int8": BnbInt8, "gptqmodel-gptq-4bit": GPTQModelGPTQ4bit,
                "gptqmodel-awq-4bit": GPTQModelAWQ4bit}
    for name, cls in expected.items():
        assert registry.get("quantizers", name) is cls and cls.name == name and cls.description


# ---------------------------------------------------------------- GPTQ (llm-compressor)

def test_gptq_keeps_the_rtn_grid_but_chooses_other_levels(quantized, original):
    gptq, out, outcome = quantized(GPTQ4bit)
    rtn, rtn_out, _ = quantized(RTN4bit)
    g, r = gptq.dequantized_weights(out), rtn.dequantized_weights(rtn_out)
    assert sorted(g) == sorted(r) == LINEARS
    moved = 0
    for name in LINEARS:
        # GPTQ keeps the min-max scales RTN uses (llm-compressor observes them on the original
        # weights) and places every weight on that grid ...
        torch.testing.assert_close(g.steps[name], r.steps[name], rtol=0, atol=0)
        level = levels(g, name)
        torch.testing.assert_close(level, level.round(), rtol=0, atol=1e-3)
        assert level.round().min() >= -8 and level.round().max() <= 7
        # ... but picks the level from the calibration Hessian, not the nearest one: its error
        # feedback moves many weights, some by more than one level (so no "within one step" bound)
        moved += (level.round() != levels(r, name).round()).sum().item()
    assert 0.05 < moved / sum(g[n].numel() for n in LINEARS) < 0.6
    # the default group of 128 is wider than the 64 inputs of all but down_proj: per channel there
    assert sorted(outcome.extra["per_channel_modules"]) == [n for n in LINEARS if "down_proj" not in n]


def test_gptq_depends_on_the_calibration_texts_and_records_them(quantized):
    gptq, out, outcome = quantized(GPTQ4bit)
    _, other_out, other = quantized(GPTQ4bit, calibration=OTHER_CALIBRATION)
    extra = outcome.extra
    assert extra["calibration_samples"] == len(CALIBRATION) and extra["calibration_max_seq_length"] == 512
    assert extra["calibration_tokens"] >= 3 * len(CALIBRATION) and len(extra["calibration_hash"]) == 16
    assert other.extra["calibration_hash"] != extra["calibration_hash"]
    a, b = gptq.dequantized_weights(out), gptq.dequantized_weights(other_out)
    assert any(not torch.equal(a[n], b[n]) for n in LINEARS)


def test_gptq_changes_only_the_projections_and_loads_as_compressed_tensors(quantized, original, tiny_model_dir):
    gptq, out, outcome = quantized(GPTQ4bit)
    loaded = gptq.load_quantized(out).state_dict()
    for name, before in original.items():
        quantized_weight = name.removesuffix(".weight") in LINEARS
        assert torch.equal(loaded[name], before) != quantized_weight, name
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["ignore"] == ["lm_head"]
    strategies = {g["weights"]["strategy"]: g["targets"] for g in qconfig["config_groups"].values()}
    assert strategies["group"] == ["Linear"] and len(strategies["channel"]) == 12  # narrow layers per channel

    plain = AutoModelForCausalLM.from_pretrained(out)  # the compressed route vLLM-style loaders take
    assert type(plain.config.quantization_config).__name__ == "CompressedTensorsConfig"
    got = logits(plain, out)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(logits(gptq.load_quantized(out), out), got)
    assert outcome.size_bytes == folder_size(out) > 0 and outcome.seconds > 0


def test_gptq_8bit_scheme_and_self_disagreement(quantized):
    gptq, out, outcome = quantized(GPTQ8bit, group_size=64, dampening_frac=0.05)
    weights = gptq.dequantized_weights(out)
    assert sorted(weights) == LINEARS and outcome.extra["per_channel_modules"] == []
    assert quantized_disagreement(weights, gptq.dequantized_weights(out)) == 0.0
    level = levels(weights, "model.layers.1.mlp.down_proj")
    assert level.round().abs().max() > 7  # an 8-bit grid, not a 4-bit one
    scheme = gptq.scheme()
    assert {k: scheme[k] for k in ("family", "library", "format", "bits", "group_size", "symmetric", "preset",
                                   "dampening_frac", "block_size", "actorder")} == {
        "family": "gptq", "library": "llmcompressor", "format": "pack-quantized", "bits": 8, "group_size": 64,
        "symmetric": True, "preset": "W8A16", "dampening_frac": 0.05, "block_size": 128, "actorder": "static"}
    assert scheme["calibration"]["num_samples"] == 128 and scheme["calibration"]["source"] == "retain corpus"


def test_gptq_needs_calibration_text(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="calibration"):
        GPTQ4bit().quantize(tiny_model_dir, tmp_path / "out", calibration=["", "  "])


# ---------------------------------------------------------------- AWQ (llm-compressor)

def test_awq_rescales_then_rounds_asymmetrically(quantized, original, tiny_model_dir):
    from llmcompressor.pipelines.cache import IntermediatesCache

    pin_before = IntermediatesCache.pin_memory
    awq, out, outcome = quantized(AWQ4bit, n_grid=5)
    assert IntermediatesCache.pin_memory is pin_before  # the CPU workaround is undone after the fit

    loaded = awq.load_quantized(out).state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(loaded[name], original[name]), name
    # AWQ folds its channel scales into the norms that feed the projections (where its search
    # did not settle on the identity scaling, which the grid includes)
    norms = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    assert any(not torch.equal(loaded[n], original[n]) for n in norms)
    weights = awq.dequantized_weights(out)
    assert sorted(weights) == LINEARS
    for name in LINEARS:
        level = levels(weights, name)
        torch.testing.assert_close(level, level.round(), rtol=0, atol=1e-3)
        # asymmetric INT4: in each group (here one per row) level - zero point takes at most
        # 16 consecutive values, anywhere in [-15, 15]
        spread = level.round().amax(dim=1) - level.round().amin(dim=1)
        assert (spread <= 15).all() and level.round().abs().max() <= 15
    assert quantized_disagreement(weights, awq.dequantized_weights(out)) == 0.0

    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    assert all(g["weights"]["symmetric"] is False for g in qconfig["config_groups"].values())
    assert torch.isfinite(logits(AutoModelForCausalLM.from_pretrained(out), out)).all()
    assert len(outcome.extra["awq_mappings"]) == 4 and outcome.extra["calibration_samples"] == 3
    scheme = awq.scheme()
    assert scheme["preset"] == "W4A16_ASYM" and scheme["symmetric"] is False and scheme["n_grid"] == 5


# ---------------------------------------------------------------- bitsandbytes

def test_bnb_fp4_is_exactly_the_library_default(quantized):
    from transformers import BitsAndBytesConfig

    quant, out, outcome = quantized(BnbFP4)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    default = BitsAndBytesConfig(load_in_4bit=True).to_dict()
    assert {k: v for k, v in saved.items() if k in default} == default
    assert saved["bnb_4bit_quant_type"] == "fp4" and saved["bnb_4bit_use_double_quant"] is False
    model = quant.load_quantized(out)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(modules) == LINEARS
    assert {(m.weight.quant_state.quant_type, m.weight.quant_state.blocksize) for m in modules.values()} == {("fp4", 64)}
    assert quant.scheme()["block_size"] == 64 and quant.scheme()["quant_type"] == "fp4"
    assert "arXiv 2410.16454" in quant.description
    assert outcome.size_bytes == folder_size(out) and outcome.extra["quantized_modules"] == 14


@pytest.mark.parametrize("cls,params", [(BnbFP4, {}), (BnbNF4, {}), (BnbNF4, {"double_quant": True}), (BnbInt8, {})])
def test_bnb_dequantized_weights_are_what_the_modules_compute_with(quantized, original, cls, params):
    quant, out, _ = quantized(cls, **params)
    model = quant.load_quantized(out)
    weights = quant.dequantized_weights(out)
    assert sorted(weights) == sorted(quant.quantized_modules(model)) == LINEARS
    assert quantized_disagreement(weights, quant.dequantized_weights(out)) == 0.0
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert state[name].dtype == torch.float32 and torch.equal(state[name], original[name])
    x = torch.randn(3, 64)
    for name in LINEARS:
        w, before = weights[name], original[f"{name}.weight"]
        assert w.dtype == torch.float32 and w.shape == before.shape and not torch.equal(w, before)
        level = levels(weights, name).round()
        assert level.unique().numel() <= (16 if cls.bits == 4 else 255)
    module = dict(model.named_modules())["model.layers.0.self_attn.q_proj"]
    if cls.bits == 4:  # Linear4bit dequantizes and multiplies in float32: the same product exactly
        with torch.no_grad():
            torch.testing.assert_close(module(x), x @ weights["model.layers.0.self_attn.q_proj"].T,
                                       rtol=1e-5, atol=1e-6)
    else:  # LLM.int8 rounds the float16 weight to the nearest of 255 levels per row
        w, before = weights["model.layers.0.self_attn.q_proj"], original["model.layers.0.self_attn.q_proj.weight"]
        step = weights.steps["model.layers.0.self_attn.q_proj"]
        assert ((w - before.half().float()).abs() <= step / 2 * (1 + 1e-5)).all()
        assert ((w - before).abs() > step / 2).any()  # so the float16 cast is part of the scheme
    assert torch.isfinite(logits(model, out)).all()


def test_bnb_grid_units_identify_code_values():
    """weight / step must give a distinct integer for each code value, far from a rounding tie."""
    for quant_type, distinct in (("nf4", 16), ("fp4", 15)):
        from bitsandbytes.functional import get_4bit_type

        code = torch.unique(get_4bit_type(quant_type, device="cpu").float())
        mean_gap, smallest = _code_gaps(quant_type)
        assert code.numel() == distinct and mean_gap == pytest.approx(2 / (distinct - 1))
        units = code / smallest
        assert units.round().unique().numel() == distinct
        assert ((units - units.round()).abs() < 0.49).all()


def test_bnb_disagreement_counts_levels_not_rescaled_values(tiny_model_dir, tmp_path, original):
    """Scaling a row by 1.01 changes every absmax of that row and so every value, but no code index."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3] *= 1.01
    model.save_pretrained(tmp_path / "scaled")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "scaled")
    quant = BnbNF4()
    quant.quantize(tiny_model_dir, tmp_path / "a", [])
    quant.quantize(tmp_path / "scaled", tmp_path / "b", [])
    a, b = quant.dequantized_weights(tmp_path / "a"), quant.dequantized_weights(tmp_path / "b")
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(a[name][3], b[name][3]) and torch.equal(a[name][4], b[name][4])
    assert quantized_disagreement(a, b) == 0.0


def test_bnb_step_sizes(quantized, original, tiny_model_dir):
    w = original["model.layers.1.mlp.down_proj.weight"]  # 64 x 128: two blocks of 64 per row
    nf4, out, _ = quantized(BnbNF4)
    stored = nf4.dequantized_weights(out).steps["model.layers.1.mlp.down_proj"]
    step = nf4.step_size(w)
    assert step.shape == stored.shape == (64, 2)
    mean_gap, smallest = _code_gaps("nf4")
    torch.testing.assert_close(step / stored, torch.full_like(step, mean_gap / smallest))
    torch.testing.assert_close(step, w.reshape(64, 2, 64).abs().amax(-1) * mean_gap)
    # a width that blocks of 64 do not tile still gets a step per weight
    assert nf4.step_size(torch.randn(4, 96)).shape == (4, 96)

    int8, out8, _ = quantized(BnbInt8)
    torch.testing.assert_close(int8.step_size(w), int8.dequantized_weights(out8).steps["model.layers.1.mlp.down_proj"])
    # the diagnostics' mean step: row absmax / 127, averaged over every quantized weight
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = sum((original[f"{n}.weight"].half().float().abs().amax(1) / 127).mean() * original[f"{n}.weight"].numel()
                   for n in LINEARS) / sum(original[f"{n}.weight"].numel() for n in LINEARS)
    assert mean_step(int8, target) == pytest.approx(expected.item(), rel=1e-5)


def test_bnb_parameters_are_validated():
    with pytest.raises(ConfigError) as err:
        BnbFP4.from_params({"blocksize": 128})
    assert "allowed parameters: none" in str(err.value)
    with pytest.raises(ConfigError, match="compute_dtype"):
        BnbNF4.from_params({"compute_dtype": "int8"})
    with pytest.raises(ConfigError, match="threshold"):
        BnbInt8.from_params({"threshold": -1})
    nf4 = BnbNF4.from_params({"compute_dtype": "bfloat16", "double_quant": True})
    assert nf4._bnb_config().bnb_4bit_compute_dtype == torch.bfloat16
    assert {k: nf4.scheme()[k] for k in ("family", "format", "bits", "quant_type", "compute_dtype", "double_quant")} == {
        "family": "bitsandbytes", "format": "bitsandbytes", "bits": 4, "quant_type": "nf4",
        "compute_dtype": "bfloat16", "double_quant": True}
    assert BnbInt8.from_params({"threshold": 0}).scheme()["threshold"] == 0


# ---------------------------------------------------------------- shared validation

@pytest.mark.parametrize("cls", [GPTQ4bit, GPTQ8bit, AWQ4bit, GPTQModelGPTQ4bit, GPTQModelAWQ4bit])
def test_unknown_parameters_list_the_allowed_ones(cls):
    with pytest.raises(ConfigError) as err:
        cls.from_params({"groupsize": 64})
    message = str(err.value)
    assert "groupsize" in message and "allowed parameters: group_size (default 128)" in message
    assert "num_calibration_samples" in message and "max_seq_length" in message
    with pytest.raises(ConfigError, match="num_calibration_samples"):
        cls.from_params({"num_calibration_samples": 0})


def test_gptq_rejects_bad_ranges():
    with pytest.raises(ConfigError, match="dampening_frac"):
        GPTQ4bit.from_params({"dampening_frac": 1.5})
    with pytest.raises(ConfigError, match="actorder"):
        GPTQ4bit.from_params({"actorder": "group"})
    with pytest.raises(ConfigError, match="n_grid must be at least 4"):
        AWQ4bit.from_params({"n_grid": 3, "duo_scaling": "both"})
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        GPTQ4bit.from_params({"group_size": 48}).step_size(torch.randn(4, 64))


# ---------------------------------------------------------------- gptqmodel (optional backend)

def test_a_missing_optional_backend_fails_at_creation_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # makes it absent to import machinery
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for cls, extra in ((GPTQModelGPTQ4bit, "gptqmodel"), (GPTQModelAWQ4bit, "gptqmodel"), (BnbFP4, "bnb"),
                       (BnbInt8, "bnb")):
        with pytest.raises(ConfigError, match=rf"optional extra '{extra}': pip install 'qubench\[{extra}\]'"):
            cls.from_params({})


def test_a_gptqmodel_worker_count_below_two_fails_before_any_work(monkeypatch):
    pytest.importorskip("gptqmodel")
    for bad in ("1", "0", "two"):
        monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", bad)
        with pytest.raises(ConfigError, match=rf"GPTQMODEL_CPU_WORKERS='{bad}': GPT-QModel needs at least 2"):
            GPTQModelGPTQ4bit.from_params({})
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "3")
    assert GPTQModelGPTQ4bit.from_params({}).name == "gptqmodel-gptq-4bit"


@pytest.mark.parametrize("cls,params", [(GPTQModelGPTQ4bit, {}), (GPTQModelAWQ4bit, {"group_size": 64})])
def test_gptqmodel_backend_end_to_end(quantized, original, cls, params):
    pytest.importorskip("gptqmodel")
    quant, out, outcome = quantized(cls, **params)
    model = quant.load_quantized(out)
    weights = quant.dequantized_weights(out)
    assert sorted(weights) == sorted(quant.quantized_modules(model)) == LINEARS
    assert quantized_disagreement(weights, quant.dequantized_weights(out)) == 0.0
    state = model.state_dict()
    for name in LINEARS:
        level = levels(weights, name)
        torch.testing.assert_close(level, level.round(), rtol=0, atol=1e-3)  # on its grid
        assert not torch.equal(state[f"{name}.weight"], original[f"{name}.weight"])
        assert state[f"{name}.weight"].dtype == torch.float32
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        # GPTQ is fitted in float32; GPT-QModel's AWQ needs a 16-bit model, so bfloat16 copies
        expected = original[name] if quant.fit_dtype == torch.float32 else original[name].bfloat16().float()
        assert torch.equal(state[name], expected), name
    assert torch.isfinite(logits(model, out)).all()
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == quant.method and qconfig["bits"] == 4
    assert qconfig["group_size"] == quant.config.group_size and outcome.extra["calibration_samples"] == 3
    if quant.method == "gptq":  # narrow layers per channel through GPT-QModel's per-module override
        assert sorted(qconfig["dynamic"]) == sorted(outcome.extra["per_channel_modules"])
        assert len(outcome.extra["per_channel_modules"]) == 12
    assert quant.step_size(original["model.layers.0.mlp.down_proj.weight"]).shape == (64, 128 // quant.config.group_size)
    assert list((out / "gptqmodel_logs").glob(f"{quant.method}_log_*.log"))  # kept with the checkpoint


def test_gptqmodel_awq_refuses_a_group_wider_than_a_layer(tiny_model_dir, tmp_path):
    pytest.importorskip("gptqmodel")
    with pytest.raises(ConfigError, match="GPT-QModel's AWQ needs a group that divides every layer"):
        GPTQModelAWQ4bit().quantize(tiny_model_dir, tmp_path / "out", CALIBRATION)


def test_gptq_logging_works_with_llmcompressor_logs_disabled():
    """The CLI disables llm-compressor's logs, which leaves GPTQ's "METRIC" loguru level
    unregistered (GPTQ then fails on its first log call); the fit registers it. A fresh
    interpreter, since a level cannot be removed once this one has it."""
    script = (
        "from loguru import logger\n"
        "try:\n    logger.log('METRIC', 'x'); print('registered')\n"
        "except ValueError:\n    print('missing')\n"
        "from qubench.quantizers.llmc import _ensure_metric_log_level\n"
        "_ensure_metric_log_level(); _ensure_metric_log_level(); logger.remove(); logger.log('METRIC', 'x')\n"
        "print('ok')\n"
    )
    env = {**os.environ, "LLM_COMPRESSOR_LOG_DISABLED": "true"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["missing", "ok"]
