"""Silence the per-call chatter of the libraries qubench drives (loading bars for
tiny checkpoints, llm-compressor's INFO lines), keeping qubench's own progress."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from loguru import logger

        for lib in ("llmcompressor", "compressed_tensors"):
            logger.disable(lib)
    except ImportError:
        pass
