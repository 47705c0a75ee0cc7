"""Silence the per-call chatter of the libraries qubench drives, keeping qubench's own progress
(`qubench.progress`): loading bars for tiny checkpoints, llm-compressor's INFO lines, and the progress
bars that compressed-tensors, llm-compressor and lm-eval draw on every quantization and evaluation.

How each library draws them, and so where they are silenced:
- transformers and datasets: their own switches (verbosity, disable_progress_bar, an environment variable).
- llm-compressor and compressed-tensors log through loguru: disabled per library.
- compressed-tensors' "Applying quantization config", "Dispatching model" bars: `tqdm(..., disable=not
  show_progress)` with `show_progress` defaulting to True and never passed by their callers
  (transformers' compressed-tensors quantizer, llm-compressor); its "Compressing model" /
  "Decompressing model" bars: plain `tqdm(...)`.
- lm-eval's unlabeled `0/N` bars (`Task.build_all_requests`: plain `tqdm(docs)`) and "Running
  generate_until / loglikelihood requests" (`tqdm(disable=disable_tqdm)`, which its evaluator never sets).
  TQDM_DISABLE=1 only changes tqdm's *default* for `disable`, which an explicit `disable=` overrides, so
  it cannot reach these. No setting of those libraries does either: the one level that reaches all of
  them is tqdm's constructor, so `silence_library_bars` disables every bar created by code of
  QUIET_TQDM_PACKAGES (and no other: hub download bars stay, controlled by huggingface_hub).
- lm-eval's `git describe` of the working directory ("fatal: not a git repository" outside a checkout):
  `qubench.evaluation.evaluate._quiet_lm_eval`, around the one call into lm-eval.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

#: Packages whose tqdm progress bars are switched off (matched on the top-level module of the code that
#: creates the bar).
QUIET_TQDM_PACKAGES = ("compressed_tensors", "llmcompressor", "lm_eval")
#: tqdm's `disable` parameter, when given positionally.
_DISABLE_POSITION = 10


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
    # bitsandbytes warns on every CPU load that an optional kernel package is not installed.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    silence_library_bars()


def silence_library_bars() -> None:
    """Make every tqdm bar that code of QUIET_TQDM_PACKAGES creates a disabled one, whatever `disable`
    it passes. Idempotent; tqdm's subclasses (tqdm.auto, tqdm.asyncio) construct through it too."""
    try:
        from tqdm import std
    except ImportError:  # no library that draws tqdm bars is installed either
        return
    original = std.tqdm.__init__
    if getattr(original, "_qubench_quiet", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if _created_by(QUIET_TQDM_PACKAGES):
            if len(args) > _DISABLE_POSITION:
                args = (*args[:_DISABLE_POSITION], True, *args[_DISABLE_POSITION + 1:])
            else:
                kwargs["disable"] = True
        original(self, *args, **kwargs)

    __init__._qubench_quiet = True
    std.tqdm.__init__ = __init__


def _created_by(packages: tuple[str, ...]) -> bool:
    """Whether the code constructing a tqdm bar (the first caller outside tqdm itself) is in `packages`."""
    frame = sys._getframe(2)  # skip this function and the wrapped __init__
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != "tqdm" and not module.startswith("tqdm."):
            return module.split(".")[0] in packages
        frame = frame.f_back
    return False
