"""A stand-in for `python -m vllm.entrypoints.openai.api_server`, for tests on machines without vLLM.

Speaks the part of vLLM's OpenAI-compatible API that qubench uses: GET /health, and
POST /v1/completions with token-ID prompts (batched), greedy generation with `stop`
strings and `max_tokens`, and `echo` + `logprobs` prompt scoring (also with
`max_tokens: 0`), rejecting prompts longer than --max-model-len as vLLM does. The
numbers are real: the checkpoint is run with transformers in float32.

Test-only flags: --fake-mode hang (listen, never healthy), crash (exit 3 at once) or
empty (healthy at once, no model: for tests of the process handling alone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--fake-mode", choices=["serve", "hang", "crash", "empty"], default="serve")
    args, rest = parser.parse_known_args()
    print(f"fake vllm server: {args} (ignored: {rest})", flush=True)
    if args.fake_mode == "crash":
        print("RuntimeError: the fake engine failed to start on purpose", flush=True)
        sys.exit(3)

    # As vLLM: no --max-model-len past the model's own positions unless explicitly allowed.
    positions = json.loads((Path(args.model) / "config.json").read_text()).get("max_position_embeddings")
    if positions and args.max_model_len > positions and os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1":
        print(f"ValueError: User-specified max_model_len ({args.max_model_len}) is greater than the derived "
              f"max_model_len ({positions})", flush=True)
        sys.exit(1)
    state = {"ready": args.fake_mode == "empty"}
    if args.fake_mode == "serve":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        state.update(model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval(),
                     tok=AutoTokenizer.from_pretrained(args.model), ready=True)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            print("fake vllm server:", fmt % a, flush=True)

        def _send(self, code: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._send(200 if state["ready"] else 503, {})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):
            if self.path != "/v1/completions":
                return self._send(404, {"error": "not found"})
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if "model" not in state:  # empty mode: fail as vLLM does when its engine dies
                print("RuntimeError: Unsupported CPU attention configuration (the fake has no model)", flush=True)
                return self._send(500, {"error": {"message": "EngineCore encountered an issue. See stack trace "
                                                             "(above) for the root cause.", "code": 500}})
            if req.get("model") != args.served_model_name:
                return self._send(404, {"error": {"message": f"The model `{req.get('model')}` does not exist."}})
            try:
                choices = [complete(state, args.max_model_len, ids, req) for ids in prompts(state["tok"], req["prompt"])]
            except ValueError as exc:
                return self._send(400, {"error": {"message": str(exc), "type": "BadRequestError"}})
            for i, c in enumerate(choices):
                c["index"] = i
            self._send(200, {"object": "text_completion", "model": args.served_model_name, "choices": choices})

    HTTPServer((args.host, args.port), Handler).serve_forever()


def prompts(tok, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tok(prompt)["input_ids"]]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return [p if isinstance(p, list) else tok(p)["input_ids"] for p in prompt]


def complete(state, max_model_len: int, ids: list[int], req: dict) -> dict:
    import torch

    model, tok = state["model"], state["tok"]
    max_tokens = int(req.get("max_tokens") if req.get("max_tokens") is not None else 16)
    # vLLM samples one token even for echo with max_tokens 0, and checks the length with it.
    if len(ids) + max(max_tokens, 1) > max_model_len:
        raise ValueError(f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens "
                         f"(at least 1) is longer than the maximum model length of {max_model_len}.")
    stops = req.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    generated: list[int] = []
    text = ""
    with torch.no_grad():
        for _ in range(max_tokens):  # greedy, one token at a time: slow but obviously right
            logits = model(torch.tensor([ids + generated])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            generated.append(nxt)
            text = tok.decode(generated, skip_special_tokens=True)
            hit = [text.index(s) for s in stops if s and s in text]
            if hit:
                text = text[:min(hit)]
                break
    choice = {"text": text, "finish_reason": "stop" if len(generated) < max_tokens else "length", "logprobs": None}
    if req.get("echo") and req.get("logprobs") is not None:
        full = ids + generated
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1].float(), dim=-1)
        values = [None] + [lp[i, full[i + 1]].item() for i in range(len(full) - 1)]
        choice["logprobs"] = {"tokens": [tok.decode([t]) for t in full], "token_logprobs": values,
                              "top_logprobs": [None] + [{tok.decode([t]): v} for t, v in zip(full[1:], values[1:])]}
        choice["text"] = tok.decode(ids) + text
    return choice


if __name__ == "__main__":
    main()
