"""--device: choice, resolution, placement plans, stage identities, and how the device travels to
quantizers, engines, grid workers and Ray. There is no GPU here: the CUDA paths are checked through
the arguments and plans they would use (torch.cuda monkeypatched), never run."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from qubench import store
from qubench.device import CPU, Device, check_choice, device_kwargs, resolve, worker_gpus
from qubench.errors import ConfigError

GPU = Device("cuda", None, 2, "cuda")     # two visible GPUs
GPU1 = Device("cuda", 1, 1, "cuda:1")


@pytest.fixture
def four_gpus(monkeypatch):
    """torch as it looks on a machine with four 80 GiB GPUs (only what qubench.device asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9,
                                                  minor=0))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# --- choice and resolution ----------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [("auto", "auto"), (" CPU ", "cpu"), ("cuda", "cuda"), ("cuda:3", "cuda:3")])
def test_device_choices_are_normalised(text, want):
    assert check_choice(text) == want


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "mps", "cuda:a", ""])
def test_bad_device_choice_names_the_allowed_ones(text):
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        check_choice(text)


def test_on_this_cpu_machine_auto_is_the_cpu_and_cuda_is_refused_with_the_reason():
    assert resolve("auto") == Device("cpu", None, 0, "auto")
    assert resolve("cpu") == CPU and resolve(None).kind == "cpu"
    with pytest.raises(ConfigError, match=r"--device cuda:0: .*CPU-only build.*--device cpu"):
        resolve("cuda:0")


def test_a_cuda_torch_that_sees_no_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match=r"CUDA 12.4\) sees no GPU, CUDA_VISIBLE_DEVICES="):
        resolve("cuda")


def test_resolution_with_gpus(four_gpus):
    assert resolve("auto") == Device("cuda", None, 4, "auto")
    assert resolve("cuda") == Device("cuda", None, 4, "cuda")
    one = resolve("cuda:2")
    assert one == Device("cuda", 2, 1, "cuda:2") and one.torch_device == "cuda:2" and one.gpu_indices() == [2]
    assert resolve("cpu") == CPU  # the CPU even where GPUs are visible
    with pytest.raises(ConfigError, match=r"torch sees 4 GPU\(s\) \(cuda:0 .. cuda:3\)"):
        resolve("cuda:4")


def test_only_a_gpu_adds_to_stage_identities():
    assert CPU.identity() == {} and Device("cpu", None, 0, "auto").identity() == {}
    assert GPU.identity() == GPU1.identity() == {"device": "cuda"}  # the kind, not which GPU or how many
    assert GPU1.record() == {"requested": "cuda:1", "kind": "cuda", "index": 1, "count": 1,
                             "torch_device": "cuda:1"}


# --- placement plans ----------------------------------------------------------------------------


def test_from_pretrained_placement(four_gpus):
    assert CPU.from_pretrained_kwargs() == {}  # on the CPU models load exactly as before
    assert GPU1.from_pretrained_kwargs() == {"device_map": {"": "cuda:1"}}
    assert Device("cuda", None, 1, "cuda").from_pretrained_kwargs() == {"device_map": {"": "cuda:0"}}
    plan = resolve("cuda").from_pretrained_kwargs()
    # several GPUs: filled in order, each to 85% of its 80 GiB at most
    assert plan == {"device_map": "sequential", "max_memory": {i: int(80 * 2**30 * 0.85) for i in range(4)}}


def test_device_reaches_plugin_methods_that_take_it_and_only_on_a_gpu():
    def takes(model_dir, out_dir, calibration, device=None): ...

    def old_style(model_dir, out_dir, calibration): ...

    def anything(*args, **kwargs): ...

    assert device_kwargs(takes, CPU) == {} and device_kwargs(anything, CPU) == {}
    assert device_kwargs(takes, GPU) == {"device": GPU} and device_kwargs(anything, GPU) == {"device": GPU}
    assert device_kwargs(old_style, GPU) == {}  # a third-party plugin without the argument runs as it always did


@pytest.mark.parametrize("workers,device,visible,want", [
    (2, Device("cuda", None, 8, "cuda"), None, ["0,1,2,3", "4,5,6,7"]),
    (3, Device("cuda", None, 8, "cuda"), None, ["0,1", "2,3", "4,5"]),
    (4, Device("cuda", None, 2, "auto"), None, ["0", "1", "0", "1"]),
    (2, Device("cuda", None, 2, "cuda"), "3,5", ["3", "5"]),
    (1, Device("cuda", None, 8, "cuda"), None, [None]),          # one worker sees what the driver sees
    (2, GPU1, None, [None, None]),                               # the user chose the GPU
    (2, CPU, None, [None, None]),
])
def test_grid_workers_get_their_own_gpus(monkeypatch, workers, device, visible, want):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert worker_gpus(workers, device) == want


def test_ray_tasks_ask_for_a_gpu_on_a_cuda_choice():
    from qubench.grid.executors.ray import task_gpus

    assert task_gpus("cuda", 8) == 1 and task_gpus("auto", 8) == 1
    assert task_gpus("auto", 0) == 0 and task_gpus("cpu", 8) == 0
    with pytest.raises(ConfigError, match="Ray assigns each task its GPU"):
        task_gpus("cuda:1", 8)
    with pytest.raises(ConfigError, match="has no GPU resources"):
        task_gpus("cuda", 0)


def test_grid_workers_pass_the_device_to_every_run(monkeypatch, tmp_path):
    from qubench import pipeline
    from qubench.grid.executors.base import GroupJob, run_group
    from qubench.specs import RunSpec

    seen = []
    monkeypatch.setattr(pipeline, "run", lambda spec, results_dir, **kw: seen.append(kw["device"]))
    spec = RunSpec().model_dump(mode="json")
    job = GroupJob("g", [("a", spec, str(tmp_path / "a.json")), ("b", spec, str(tmp_path / "b.json"))],
                   str(tmp_path), device="cuda:1")
    outcomes = []
    run_group(job, outcomes.append)
    assert seen == ["cuda:1", "cuda:1"] and [o.status for o in outcomes] == ["ok", "ok"]


def test_pool_deals_gpu_shares_to_worker_slots(four_gpus):
    from qubench.grid.executors.base import GroupJob
    from qubench.grid.executors.pool import _gpu_shares

    jobs = [GroupJob(str(i), [], "", device="cuda") for i in range(5)]
    assert _gpu_shares(jobs, 2) == ["0,1", "2,3"]
    assert _gpu_shares([GroupJob("0", [], "", device="cpu")], 2) == [None, None]


# --- CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["run"], ["grid", "--dry-run"], ["verify", "."], ["submit", "--method", "x"],
                                     ["prepare"]])
def test_every_command_checks_the_device_option(command):
    from qubench.cli import main

    res = CliRunner().invoke(main, [*command, "--device", "gpu0"])
    assert res.exit_code == 2 and "auto, cpu, cuda or cuda:N" in res.output


@pytest.mark.parametrize("value,message", [("0", "not a positive number"), ("many", "neither a positive number")])
def test_batch_size_is_a_number_or_auto(value, message):
    from qubench.cli import main

    res = CliRunner().invoke(main, ["run", "--batch-size", value])
    assert res.exit_code == 2 and message in res.output


def test_asking_for_a_gpu_that_is_not_there_fails_before_any_work(tmp_path, monkeypatch):
    from qubench.cli import main

    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(main, ["run", "--device", "cuda", "--results", str(tmp_path / "r")])
    assert res.exit_code == 2 and "CPU-only build" in res.output
    res = CliRunner().invoke(main, ["grid", "--task", "synth-news", "--method", "ga", "--quant", "rtn-4bit",
                                    "--device", "cuda:0", "--dry-run", "--results", str(tmp_path / "g")])
    assert res.exit_code == 2 and "CPU-only build" in res.output
    assert not (tmp_path / "home").exists() and not (tmp_path / "r").exists()


# --- stage identities -----------------------------------------------------------------------------


def _data(tmp_path: Path):
    from test_evaluation import write_muse_folder

    from qubench.tasks import muse_layout

    folder = write_muse_folder(tmp_path / "muse")
    return muse_layout.load(folder), folder


def test_cpu_stage_keys_are_what_they_were_and_gpu_keys_differ(tiny_model_dir, tmp_path, monkeypatch):
    from qubench import registry
    from qubench.fingerprint import model_fingerprint
    from qubench.stages import Evaluation, Quantized, Unlearned
    from qubench.stages.evaluation import EvalSetup
    from qubench.stages.models import PreparedModels
    from qubench.stages.quantized import calibration_texts

    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    data, folder = _data(tmp_path)
    quant = registry.create("quantizers", "rtn-4bit", {})
    method = registry.create("methods", "ga_gdr", {})
    models = PreparedModels(tiny_model_dir, None, str(tiny_model_dir), None, None)

    q_cpu, q_gpu = (Quantized(quant, tiny_model_dir, data, device=d) for d in (CPU, GPU))
    # The CPU identity is exactly the one from before devices existed (written out here by hand).
    assert q_cpu.identity() == {"model": model_fingerprint(tiny_model_dir), "quant": "rtn-4bit",
                                "params": quant.params(), "calib": store.stable_hash(calibration_texts(data))}
    assert q_gpu.identity() == {**q_cpu.identity(), "device": "cuda"} and q_gpu.path() != q_cpu.path()

    u_cpu, u_gpu = (Unlearned(method, 0, models, data, False, device=d) for d in (CPU, GPU))
    assert set(u_cpu.identity()) == {"target", "method", "params", "seed", "forget", "retain"}
    # On CUDA precision `auto` trains in bf16 (the resolved value is in the key), on CPU in fp32.
    gpu_params = {**u_cpu.identity()["params"], "precision": "bf16"}
    assert u_cpu.identity()["params"]["precision"] == "fp32"
    assert u_gpu.identity() == {**u_cpu.identity(), "params": gpu_params, "device": "cuda"}
    assert u_gpu.key() != u_cpu.key()

    engine = registry.create("engines", "hf", {})
    s_cpu, s_gpu = (EvalSetup(engine, data, folder, 4, "float32", device=d) for d in (CPU, GPU1))
    assert "device" not in s_cpu.settings and s_gpu.settings == {**s_cpu.settings, "device": "cuda"}
    e_cpu, e_gpu = (Evaluation(s, tiny_model_dir, "target", lambda p: None) for s in (s_cpu, s_gpu))
    assert e_cpu.key() != e_gpu.key()


def test_trained_models_key_gains_the_device_kind_on_a_gpu(tmp_path, monkeypatch):
    from qubench import registry
    from qubench.stages import TrainedModels

    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    task = registry.create("tasks", "synth-news", {"size": "micro"})
    data, _ = _data(tmp_path)
    cpu, gpu = (TrainedModels(task, data, task.train_recipe(), False, d) for d in (CPU, GPU))
    assert "device" not in cpu.identity() and gpu.identity() == {**cpu.identity(), "device": "cuda"}


class _RecordingQuantizer:
    """A stand-in quantizer plugin: records what the Quantized stage calls it with."""

    name = "recording"

    def __init__(self, takes_device: bool):
        self.calls = []
        if not takes_device:
            self.quantize = self._old_style

    def params(self):
        return {}

    def quantize(self, model_dir, out_dir, calibration, device=None):
        self.calls.append(device)
        return SimpleNamespace(seconds=0.0, size_bytes=0, extra={})

    def _old_style(self, model_dir, out_dir, calibration):
        self.calls.append("no device argument")
        return SimpleNamespace(seconds=0.0, size_bytes=0, extra={})


@pytest.mark.parametrize("takes,device,want", [(True, CPU, None), (True, GPU1, GPU1),
                                                (False, GPU1, "no device argument")])
def test_quantized_stage_hands_the_gpu_to_the_quantizer(tiny_model_dir, tmp_path, monkeypatch, takes, device, want):
    from qubench.stages import Quantized

    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    data, _ = _data(tmp_path)
    quant = _RecordingQuantizer(takes)
    stage = Quantized(quant, tiny_model_dir, data, device=device)
    (tmp_path / "out").mkdir()
    stage.build(tmp_path / "out")
    assert quant.calls == [want]


def test_run_stages_load_models_on_the_device(tiny_model_dir, monkeypatch, four_gpus):
    """The evaluation loaders ask transformers for the run's placement (the call is checked, not run)."""
    import transformers

    from qubench.specs import RunSpec
    from qubench.stages.run import RunStages

    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: calls.append(kw) or torch.nn.Linear(1, 1))
    RunStages(RunSpec(), device=resolve("cuda:3")).load_full(tiny_model_dir)
    RunStages(RunSpec(), device=CPU).load_full(tiny_model_dir)
    assert calls == [{"dtype": torch.float32, "device_map": {"": "cuda:3"}}, {"dtype": torch.float32}]


# --- quantizers on a device ---------------------------------------------------------------------


def test_llm_compressor_runs_on_the_runs_device_and_only_while_fitting():
    import llmcompressor.pipelines.data_free.pipeline as data_free
    import llmcompressor.pipelines.sequential.pipeline as sequential

    from qubench.quantizers.llmc import execution_device

    before = sequential.get_main_device
    with execution_device(GPU1) as target:
        assert target == torch.device("cuda:1")
        assert sequential.get_main_device() == data_free.get_main_device() == torch.device("cuda:1")
    with execution_device(None):  # the CPU, even where an accelerator is visible
        assert sequential.get_main_device() == torch.device("cpu")
    assert sequential.get_main_device is before


def test_bitsandbytes_placement_names_the_cpu_explicitly(four_gpus):
    from qubench.quantizers.bnb import _placement

    # transformers would put a bitsandbytes model on the first visible GPU without a device map
    assert _placement(None) == _placement(CPU) == {"device_map": {"": "cpu"}}
    assert _placement(GPU1) == {"device_map": {"": "cuda:1"}}
    assert _placement(resolve("cuda"))["device_map"] == "sequential"


def test_bitsandbytes_on_the_cpu_is_bit_identical_to_the_implicit_placement(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from qubench.quantizers.bnb import BnbNF4

    quant = BnbNF4.from_params({})
    quant.quantize(tiny_model_dir, tmp_path / "q", [])
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                  quantization_config=quant._bnb_config())  # the call as it was
    now = quant.load_quantized(tmp_path / "q")
    want, got = before.state_dict(), now.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert torch.equal(got[name].cpu(), tensor.cpu()), name


# --- engines ----------------------------------------------------------------------------------


def test_batch_estimate_by_hand():
    from transformers import LlamaConfig

    from qubench.engines.batch_fit import estimate_batch, sequence_bytes

    cfg = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    # logits 10*100*(4+4) = 8000; KV 2*2 layers*2 heads*4 dims*10*4 = 1280;
    # activations 10*(4*8 + 3*16)*4 + 2 heads*10*10*4 = 3200 + 800 = 4000
    assert sequence_bytes(cfg, 10, 4) == 13280
    # 80% of 166,000 bytes = 132,800 = 10 sequences -> the power of two below: 8
    assert estimate_batch(cfg, 10, 166_000, 4) == 8
    assert estimate_batch(cfg, 10, 166_000, 4, cap=4) == 4
    assert estimate_batch(cfg, 10, 1_000, 4) == 1  # not even one: 1, the probe then decides


def test_batch_probe_halves_on_out_of_memory(monkeypatch):
    from qubench.engines import batch_fit

    tried = []

    def fits_five(size):
        tried.append(size)
        if size > 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return size

    assert batch_fit.probe_largest(32, fits_five) == 4 and tried == [32, 16, 8, 4]
    with pytest.raises(RuntimeError, match="device-side assert"):  # only out-of-memory errors are retried
        batch_fit.probe_largest(8, lambda size: (_ for _ in ()).throw(RuntimeError("device-side assert")))


def test_auto_batch_on_the_cpu_is_the_default_and_is_recorded(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qubench.engines.hf import HFEngine
    from qubench.specs import DEFAULT_BATCH_SIZE

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = HFEngine.from_params({"batch_size": "auto"})
    assert engine.params()["batch_size"] == "auto"  # what keys the evaluation
    # On the CPU there is no device memory to fit: auto is the spec's default
    assert engine.batch_size(model, tok) == DEFAULT_BATCH_SIZE == 64
    ran = engine.run_record(model, tok)
    assert ran["device"] == "cpu" and ran["batch_size"] == 64 and ran["batch_fit"]["how"].startswith("cpu")
    assert HFEngine.from_params({"batch_size": 3}).run_record(model, tok) == {"device": "cpu", "batch_size": 3}


def test_tensor_parallelism_divides_the_heads():
    from qubench.engines.vllm_server import tensor_parallel_for

    llama7b = {"num_attention_heads": 32, "num_key_value_heads": 32}
    assert tensor_parallel_for(llama7b, 8) == 8 and tensor_parallel_for(llama7b, 6) == 4
    assert tensor_parallel_for({"num_attention_heads": 12, "num_key_value_heads": 4}, 8) == 4
    assert tensor_parallel_for({"text_config": {"num_attention_heads": 16}}, 3) == 2
    assert tensor_parallel_for({}, 5) == 5 and tensor_parallel_for(llama7b, 1) == 1


def _probe(cuda_devices: int | None):
    info = {"python": "3.11", "versions": {"vllm": "0.9.2", "torch": "2.7.1+cu126"}, "module_found": True}
    if cuda_devices is not None:
        info["cuda_devices"] = cuda_devices
    return lambda self: info


@pytest.mark.parametrize("gpus,params,want", [(4, {}, 4), (4, {"data_parallel_size": 2}, 2), (None, {}, 1),
                                               (8, {"tensor_parallel_size": 2}, 2)])
def test_vllm_server_tensor_parallelism_defaults_to_the_visible_gpus(monkeypatch, gpus, params, want):
    from qubench.engines.vllm_server import VLLMServerEngine

    monkeypatch.setattr(VLLMServerEngine, "_probe", _probe(gpus))
    engine = VLLMServerEngine.from_params({"python": sys.executable, **params})
    assert engine.params()["tensor_parallel_size"] == want  # the number that runs keys the evaluations


def test_auto_engine_picks_vllm_on_a_gpu_where_it_serves_the_quantizer(monkeypatch):
    from qubench import registry
    from qubench.engines.hf import HFEngine
    from qubench.engines.vllm_server import PYTHON_ENV, VLLMServerEngine

    auto = registry.create("engines", "auto", {"batch_size": "auto"})
    rtn4, rtn2 = (registry.create("quantizers", q, {}) for q in ("rtn-4bit", "rtn-2bit"))
    on_cpu = auto.choose(CPU, rtn4)
    assert isinstance(on_cpu, HFEngine) and on_cpu.params()["batch_size"] == "auto"
    assert on_cpu.choice_record() == {"requested": "auto", "reason": "hf: the run is on the cpu, and vLLM serves "
                                                                     "from GPUs"}
    monkeypatch.delenv(PYTHON_ENV, raising=False)
    monkeypatch.setattr("qubench.engines.auto.find_spec", lambda name: None)
    assert "not importable" in registry.create("engines", "auto", {}).choose(GPU, rtn4).choice_record()["reason"]

    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    monkeypatch.setattr(VLLMServerEngine, "_probe", _probe(2))
    auto = registry.create("engines", "auto", {})
    chosen = auto.choose(GPU, rtn4)
    assert isinstance(chosen, VLLMServerEngine) and chosen.params()["tensor_parallel_size"] == 2
    assert chosen.choice_record()["reason"].startswith("vllm: CUDA device and vllm 0.9.2")
    fallback = auto.choose(GPU, rtn2)  # vLLM has no 2-bit kernels: the whole run goes to hf
    assert isinstance(fallback, HFEngine) and "not 2-bit" in fallback.choice_record()["reason"]


def test_auto_engine_shares_the_evaluations_of_the_engine_it_picks():
    from qubench.specs import PluginRef, RunSpec
    from qubench.stages.run import Plugins

    auto = Plugins.from_spec(RunSpec(engine=PluginRef(name="auto")), device=CPU).engine
    hf = Plugins.from_spec(RunSpec(engine=PluginRef(name="hf")), device=CPU).engine
    assert auto.name == hf.name == "hf" and auto.params() == hf.params()
    assert auto.choice_record()["requested"] == "auto" and hf.choice_record() == {}


# --- the record -------------------------------------------------------------------------------


def test_hardware_record_on_this_machine():
    import os

    from qubench.env import environment

    hw = environment()["hardware"]
    assert hw["accelerator"] == "none" and hw["gpu_count"] == 0 and hw["gpus"] == []
    assert hw["cpu"]["logical_cores"] == os.cpu_count()


def test_hardware_record_with_gpus(four_gpus, monkeypatch):
    from qubench import env

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(env, "_driver_version", lambda: "550.54.15")
    hw = env.hardware()
    assert hw["accelerator"] == "cuda" and hw["gpu_count"] == 4
    assert hw["gpus"][3] == {"index": 3, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 80.0, "capability": "9.0"}
    assert hw["cuda_runtime"] == "12.4" and hw["driver"] == "550.54.15"


def test_synth_news_gpu_recipe_is_the_documented_size():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qubench import registry

    recipe = registry.create("tasks", "synth-news", {"size": "gpu"}).train_recipe()
    cfg = LlamaConfig(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size,
                      intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
                      num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    # 2 x 4096 x 1024 embeddings + 12 x (4 x 1024^2 + 3 x 1024 x 2816) + 25 norms of 1024
    assert params == 2 * 4096 * 1024 + 12 * (4 * 1024**2 + 3 * 1024 * 2816) + 25 * 1024 == 162_554_880
    assert recipe.hidden_size % 128 == recipe.intermediate_size % 128 == 0
    assert recipe.hidden_size // recipe.num_heads == 64
