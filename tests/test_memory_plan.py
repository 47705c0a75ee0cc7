"""The memory plan (issue #13, item 4): shapes from configs on the meta device, the published
16-bytes-per-parameter rule, sharding, the activation formula against the tensors autograd really
keeps, and `qubench run --dry-run` / the refusal before any work, on a Llama-2-7B-shaped config folder
that holds nothing but config.json (so loading a weight would fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qubench.cli import main
from qubench.errors import ConfigError
from qubench.memplan.estimate import TrainSettings, _activations, unlearning
from qubench.memplan.inference import EvalSettings, QuantSettings, evaluation, quantization
from qubench.memplan.plan import Hardware, judge
from qubench.memplan.shape import config_of, parse_size, shape_of

GiB = 2**30
# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json, the architecture of MUSE's targets)
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "bos_token_id": 1, "eos_token_id": 2}
# Hand-computed: embeddings 32000 x 4096 = 131,072,000 (and the same again for lm_head);
# a block: attention 4 x 4096^2 = 67,108,864, MLP 3 x 4096 x 11008 = 135,266,304, 2 norms 8,192
# -> 202,383,360; 32 blocks 6,476,267,520; final norm 4,096.
BLOCK_7B = 67_108_864 + 135_266_304 + 8_192
PARAMS_7B = 2 * 131_072_000 + 32 * BLOCK_7B + 4_096


@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama2-7b-config")
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    return folder


@pytest.fixture(scope="module")
def shape7b(llama7b_dir):
    return shape_of(config_of(llama7b_dir))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _state(plan, phase="backward", where="device") -> int:
    items = next(p for p in plan.phases if p.name == phase).items
    return sum(getattr(i, where) for i in items if i.kind == "state")


def test_sizes_parse_in_both_unit_systems_and_bad_ones_say_how_to_write_them():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("1.5 TiB") == 3 * 2**39
    assert parse_size("512") == 512
    for bad in ("lots", "12 parsecs", "0GB"):
        with pytest.raises(ConfigError, match="24GiB|positive"):
            parse_size(bad)


def test_a_llama2_7b_config_is_read_on_the_meta_device_with_its_exact_parameter_count(shape7b):
    assert PARAMS_7B == 6_738_415_616  # the published count
    assert shape7b.params == PARAMS_7B
    assert (shape7b.layers, shape7b.layer_params, shape7b.saved_bytes) == (32, BLOCK_7B, 2)
    assert (shape7b.hidden, shape7b.intermediate, shape7b.kv_dim, shape7b.vocab, shape7b.context) == \
        (4096, 11008, 4096, 32000, 4096)
    assert len(shape7b.quantizable) == 32 * 7 and len(shape7b.layer_linears) == 7


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_state_is_16_bytes_per_parameter_and_fsdp_over_8_divides_it_by_8(shape7b, precision):
    # The published rule for AdamW with float32 master weights (ZeRO, Rajbhandari et al. 2020):
    # 4 (weights) + 4 (gradients) + 8 (two moments) bytes per parameter, plus activations.
    one = unlearning(shape7b, TrainSettings(batch_size=4, seq_len=256, precision=precision), accelerator=True)
    assert _state(one) == 16 * PARAMS_7B
    fsdp = unlearning(shape7b, TrainSettings(strategy="fsdp", processes=8, batch_size=8, seq_len=256,
                                             precision=precision), accelerator=True)
    assert _state(fsdp) == 16 * PARAMS_7B // 8
    offload = unlearning(shape7b, TrainSettings(strategy="fsdp", processes=8, cpu_offload=True, batch_size=8,
                                                seq_len=256, precision=precision), accelerator=True)
    assert _state(offload) == 0 and _state(offload, where="host") == 16 * PARAMS_7B  # every rank's shard on the host
    # The rest of a step: activations scale with the rows each process runs (8 rows / 8 ranks = 1 per rank).
    act = {p.name: sum(i.device for i in p.items if i.kind == "activations") for p in fsdp.phases}
    assert 0 < act["backward"] < sum(i.device for i in one.phases[0].items if i.kind == "activations")


def test_lora_trains_only_the_adapters_peft_adds(shape7b):
    # r x (in + out) per targeted Linear, per block: q,k,v,o 4 x 32 x 8192, gate,up 2 x 32 x 15104,
    # down 32 x 15104 -> 2,498,560; x 32 blocks = 79,953,920 (peft's count for Llama-2-7B at r=32).
    settings = TrainSettings(batch_size=4, seq_len=256, lora_rank=32,
                             lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    plan = unlearning(shape7b, settings, accelerator=True)
    adapters = 79_953_920
    assert _state(plan) == 4 * PARAMS_7B + 16 * adapters  # frozen float32 base + weights/grads/moments of adapters


def test_the_activation_formula_matches_the_tensors_autograd_keeps(tiny_model_dir):
    """The per-block count behind `_block_activation_bytes`, checked against the bytes PyTorch really
    saves for backward (saved-tensor hooks; parameters excluded) on a tiny Llama, one GA+GDR graph."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    shape = shape_of(model.config)
    rows, seq = 4, 64
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, shape.vocab, (rows, seq))
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # right padding, as the loop's batches have
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        torch.log_softmax(logits[:, :-1], dim=-1)
    measured = sum(seen.values())
    estimate, _ = _activations(shape, TrainSettings(batch_size=rows, seq_len=seq), graphs=1)
    estimate -= 2 * rows * seq * shape.vocab * 4  # the formula adds transients that are not saved tensors
    assert abs(estimate - measured) / measured < 0.05, (estimate, measured)


def test_gptq_keeps_one_block_of_hessians_and_the_kv_cache_is_batch_times_length(shape7b):
    gptq = quantization(shape7b, QuantSettings(name="gptq-4bit", family="gptq", calibration_tokens=128 * 512),
                        accelerator=True)
    work = next(i for i in gptq.phases[0].items if i.what.startswith("GPTQ Hessians"))
    # q, k, v, o, gate, up read 4096 inputs, down 11008: 4 bytes x (6 x 4096^2 + 11008^2)
    hessians = 4 * (6 * 4096**2 + 11008**2)
    assert work.device == hessians + 3 * 4 * 11008**2 + 3 * 4 * 4096 * 11008
    model = next(i for i in gptq.phases[0].items if i.what.startswith("model in its saved dtype"))
    assert model.host == 2 * PARAMS_7B and model.device == 0  # sequential onloading keeps the model on the host
    ev = evaluation(shape7b, EvalSettings(dtype_bytes=2, batch_size=16, prompt_tokens=1000, new_tokens=128,
                                          document_tokens=2000),
                    QuantSettings(name="bnb-nf4", family="bnb", eval_float32=False), accelerator=True)
    kv = next(i for i in ev.phases[0].items if i.what == "KV cache")
    assert kv.device == 16 * (1000 + 128) * 32 * 2 * 4096 * 2


def test_quail_cache_is_unknown_without_the_forget_set_and_twice_its_size_while_built(shape7b):
    base = dict(batch_size=4, seq_len=256, retain_term="gdr", hinge=True)
    unknown = unlearning(shape7b, TrainSettings(**base), accelerator=True)
    assert unknown.unknown == ["target-logit cache (list + concatenation)"]
    known = unlearning(shape7b, TrainSettings(**base, forget_tokens=1000), accelerator=True)
    cache = next(p for p in known.phases if p.name == "QUAIL cache build").items[-1]
    assert cache.host == 2 * 1000 * 32000 * 4  # all vocabulary logits, float32, list + torch.cat
    top = unlearning(shape7b, TrainSettings(**base, forget_tokens=1000, hinge_top_k=64), accelerator=True)
    assert next(p for p in top.phases if p.name == "QUAIL cache build").items[-1].host == 2 * 1000 * 64 * 8


def test_a_cpu_run_adds_every_process_and_the_host_items_into_one_ram(shape7b):
    plan = unlearning(shape7b, TrainSettings(strategy="fsdp", processes=2, batch_size=4, seq_len=256), accelerator=False)
    per_process = max(p.device for p in plan.phases)
    roomy = Hardware(kind="cpu", device_bytes=2 * per_process, host_bytes=2 * per_process, source="test")
    tight = roomy.model_copy(update={"device_bytes": 2 * per_process - 1, "host_bytes": 2 * per_process - 1})
    assert judge(plan, roomy).fits and not judge(plan, tight).fits
    assert judge(plan, roomy).tight  # nothing to spare: allocator overhead may tip it over
    spacious = roomy.model_copy(update={"device_bytes": 3 * per_process, "host_bytes": 3 * per_process})
    assert judge(plan, spacious).fits and not judge(plan, spacious).tight


def _dry_run(home, *args):
    return CliRunner().invoke(main, ["run", "--task", "muse-news", "--dry-run", *args])


def test_dry_run_prints_the_7b_plan_from_a_config_only_folder_without_task_data(home, llama7b_dir):
    # Without the task data, prompts are bounded by the model's context: batch 8 fits an 80 GB device.
    fsdp8 = ["--model", str(llama7b_dir), "--method", "ga_gdr", "--strategy", "fsdp", "--num-processes", "8",
             "--max-memory", "8x80GB", "--batch-size", "8"]
    res = _dry_run(home, *fsdp8)
    assert res.exit_code == 0, res.output
    for text in ("6,738,415,616 parameters", "unlearn: fsdp x 8", "quantize: rtn-4bit", "evaluate: hf, batch 8",
                 "task data is not prepared", "no weights loaded"):
        assert text in res.output
    assert not (home / "tasks").exists()  # muse-news reads hub data: the dry run neither fetched nor built it
    res = _dry_run(home, *fsdp8, "--json")
    plan = json.loads(res.output)
    assert plan["fits"] is True and plan["shape"]["params"] == PARAMS_7B
    assert plan["peaks"]["unlearn"]["processes"] == 8


def test_a_7b_run_on_one_80gb_device_is_refused_with_the_options_that_fit(home, llama7b_dir):
    res = _dry_run(home, "--model", str(llama7b_dir), "--method", "npo_klr", "--max-memory", "1x80GB")
    assert res.exit_code == 2
    message = " ".join(res.output[res.output.index("error:"):].split())  # the console wraps long lines
    # On an accelerator training is bf16 mixed precision (precision=auto): 16 bytes/param of float32 state
    # (100.4 GiB), the bf16 frozen reference (12.55), autocast's bf16 copies of the Linear weights (12.31),
    # the CUDA context (1) and the activations (13.11): 139.4 GiB at backward.
    assert "does not fit" in message and "unlearn: its backward phase needs 139.4 GiB per device" in message
    assert "--strategy fsdp --num-processes 2 (needs 2 devices, 1 visible here)" in message
    assert "--strategy fsdp --cpu-offload" in message
    assert "--method-param batch_size=1 --method-param grad_accum=32" not in message  # alone it does not fit


def test_a_run_that_cannot_fit_stops_before_building_any_model(home, tmp_path):
    res = CliRunner().invoke(main, ["run", "--task-param", "size=micro", "--max-memory", "1MiB",
                                    "--results", str(tmp_path / "results")])
    assert res.exit_code == 2
    assert "the memory plan says this run does not fit (--max-memory 1MiB per device)" in " ".join(res.output.split())
    # After the run's other checks (the results folder is writable) and before any model is built or loaded.
    assert not (home / "models").exists() and not any((tmp_path / "results").iterdir())


def test_the_task_data_the_plan_prepares_is_reported_as_built_not_as_cached(home, tmp_path):
    res = CliRunner().invoke(main, ["run", "--task-param", "size=micro", "--max-memory", "1MiB",
                                    "--results", str(tmp_path / "results")])
    assert res.exit_code == 2
    lines = res.output.splitlines()
    assert "preparing task data (synth-news) ..." in lines
    assert any(line.startswith("preparing task data (synth-news): done in ") for line in lines), res.output


def test_a_hub_model_whose_config_is_out_of_reach_gets_a_plan_error_that_says_what_to_do(home, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # read at import: a child process
    done = subprocess.run([sys.executable, "-m", "qubench", "run", "--task", "muse-news", "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2, said
    assert "the memory plan needs the config of model 'muse-bench/MUSE-News_target'" in said
    assert "huggingface-cli download muse-bench/MUSE-News_target config.json" in said


def test_cpu_offload_without_a_sharded_strategy_is_refused_before_planning(home):
    res = CliRunner().invoke(main, ["run", "--cpu-offload", "--dry-run"])
    assert res.exit_code == 2 and "cpu_offload needs a sharded strategy" in res.output
