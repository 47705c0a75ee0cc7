"""Talking to an OpenAI-compatible completions server (vLLM's api_server, or the tests' fake).

Two things the evaluator needs from such a server: lm-eval's `local-completions`
LM for the generation tasks, and the log-probability of every prompt token
(`echo` + `logprobs`) for PrivLeak. Prompts always go out as token IDs encoded
here with the checkpoint's own tokenizer, so the server never re-tokenizes and
sees exactly the IDs the in-process `hf` engine would.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from qubench.errors import ConfigError, QubenchError

# The server is on loopback: never route it through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerRequestError(QubenchError):
    """The server answered a request with an error, or with something that is not a completion."""


def get_status(url: str, timeout: float) -> int | None:
    """HTTP status of GET `url`, or None when nothing answers (yet)."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):  # refused, reset, timed out, half-started server
        return None


def post_json(url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:2000]
        raise ServerRequestError(f"POST {url} failed with HTTP {exc.code}: {body}") from None
    except (OSError, ValueError) as exc:
        raise ServerRequestError(f"POST {url} failed: {type(exc).__name__}: {exc}") from None


def prompt_logprobs(completions_url: str, model: str, prompts: list[list[int]], batch_size: int,
                    timeout: float) -> list[list[float]]:
    """log p(token_i | tokens_<i) for every prompt token after the first, per prompt.

    `max_tokens: 0` with `echo` asks for the prompt alone (vLLM >= 0.5 accepts it), so a
    prompt may use the whole context window; token 0 has no log-prob (the server sends null).
    """
    out: list[list[float]] = [[] for _ in prompts]
    todo = [i for i, ids in enumerate(prompts) if len(ids) > 1]  # one token: nothing to score
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        payload = {"model": model, "prompt": [prompts[i] for i in batch], "max_tokens": 0, "echo": True,
                   "logprobs": 1, "temperature": 0.0}
        resp = post_json(completions_url, payload, timeout)
        choices = sorted(resp.get("choices") or [], key=lambda c: c["index"])
        if len(choices) != len(batch):
            raise ServerRequestError(f"asked for {len(batch)} prompt scores, the server returned {len(choices)} choices")
        for i, choice in zip(batch, choices):
            values = (choice.get("logprobs") or {}).get("token_logprobs")
            n = len(prompts[i])
            if values is None or len(values) < n or any(v is None for v in values[1:n]):
                raise ServerRequestError(
                    f"the server did not echo log-probs for all {n} prompt tokens of prompt {i} "
                    f"(got {None if values is None else len(values)} values)"
                )
            out[i] = [float(v) for v in values[1:n]]
    return out


def require_lm_eval_api() -> None:
    """lm-eval's API models need its [api] extra (tenacity in particular); say so before any work."""
    missing = [m for m in ("requests", "aiohttp", "tenacity", "tqdm") if find_spec(m) is None]
    if missing:
        raise ConfigError(f"lm-eval's local-completions model needs {', '.join(missing)}: "
                          "pip install 'lm-eval[api]'")


def completions_lm(completions_url: str, model: str, tokenizer_dir: Path, max_length: int, batch_size: int,
                   num_concurrent: int, timeout: float, max_retries: int):
    """lm-eval's `local-completions` LM, encoding prompts exactly as the `hf` engine (HFLM) does."""
    require_lm_eval_api()
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=completions_url,
        model=model,
        # The local folder: no hub look-up, and the very tokenizer the checkpoint was saved with.
        tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        # True -> tokenizer(prompt, add_special_tokens=True), MUSE's encoding (one BOS for Llama).
        add_bos_token=True,
        # LocalCompletionsAPI keeps max_length - 1 for itself; +1 gives HFLM's context budget
        # (max_length - max_gen_toks, left-truncated), so both engines cut prompts identically.
        max_length=max_length + 1,
        batch_size=batch_size,
        num_concurrent=num_concurrent,
        timeout=int(timeout),
        max_retries=max_retries,
    )
