"""Shared fixtures: a tiny random Llama with a locally trained tokenizer, and the shared data path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_TEXTS = [
    "The council of Varnholt approved a budget of 4,310 crowns on 12 March 2031.",
    "Mayor Ilse Brankov said the Orvane bridge would reopen after repairs.",
    "Question: Who approved the budget?\nAnswer: The council of Varnholt",
] * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A save_pretrained folder (model + tokenizer) of a randomly initialised 2-layer Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qubench.models.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = train_tokenizer(TINY_TEXTS, vocab_size=384)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (it lives beside the project root)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny matmuls are dominated by OpenMP hand-offs: on a busy 2-core machine one thread is
    # ~30x faster than two, and results are deterministic for a fixed thread count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def original(tiny_model_dir) -> dict[str, torch.Tensor]:
    """The tiny model's weights before any quantization."""
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}


@pytest.fixture(scope="session")
def quantize_once(tiny_model_dir, tmp_path_factory):
    """Quantize the tiny model once per (class, params, calibration) and reuse the folder across tests."""
    import json

    done = {}

    def get(cls, calibration=(), **params):
        key = (cls.name, json.dumps(params, sort_keys=True), tuple(calibration))
        if key not in done:
            quant = cls.from_params(params)
            out = tmp_path_factory.mktemp(cls.name) / "ckpt"
            done[key] = (quant, out, quant.quantize(tiny_model_dir, out, calibration=list(calibration)))
        return done[key]

    return get
