"""Known, harmless warnings: hidden and counted, so that a launch shows one line about them, not forty.

On a machine without Transformer Engine or Apex (every CPU run, and some GPU images) megatron-core warns once
per module and rank that it falls back to torch's implementations, warns about CUDA settings that mean nothing
on a CPU, about a deprecated default of a setting this project never sets, and logs that a mock or blended
dataset has no cache path. None of these asks the user to do anything. `install()` hides exactly those
(matched by message) and counts them; every other warning still shows as Python would show it.
`summary_line()` is the one line a run prints about them at start-up. MILE_SHOW_ALL_WARNINGS=1 turns the
hiding off.

Install it before megatron-core is imported: most of these are emitted at import time.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Optional

# (what it is about, regular expression matched against the warning or log message)
KNOWN = (
    ("Transformer Engine / Apex not installed", r"(Transformer Engine and Apex are|Apex is) not installed"),
    ("CUDA-only settings on a machine without CUDA", r"CUDA_DEVICE_MAX_CONNECTIONS"),
    ("a megatron-core deprecation of a setting this project leaves unset",
     r"full scope is deprecated\. Use empty cuda_graph_(scope|modules)"),  # 0.16.1 | 0.19.2 wording
    # megatron-core 0.19 warns when anything imports its package of MIMO models (none is built here).
    ("megatron-core 0.19's notice that its MIMO model config is experimental", r"MimoModelConfig is experimental"),
    ("dataset index caches of mock/blended datasets", r"(Unable|Cannot) to save \w+ indexes because path_to_cache is None"),
    ("torch's ShardedTensor deprecation inside megatron's checkpointing", r"ShardedTensor.*deprecated|Please use DTensor"),
    # The torch wheel with CUDA libraries (Python 3.12 environments: megatron-core 0.19 imports the triton it
    # brings) logs this when megatron imports torch.utils.cpp_extension on a machine without a GPU.
    ("a CUDA build of torch on a machine without a GPU", r"No CUDA runtime is found, using CUDA_HOME="),
    # megatron-core 0.19 logs it at every model build; docs/hybrid-model.md says what moving would take.
    ("megatron-core 0.19's deprecation of GPTModel in favour of HybridModel", r"GPTModel IS DEPRECATED"),
)
_PATTERN = re.compile("|".join(f"(?:{pattern})" for _, pattern in KNOWN))
# megatron-core's dataset modules log the cache messages through these loggers (log_single_rank), its GPT
# model the deprecation; torch's extension builder logs the CUDA_HOME one.
_LOGGERS = ("megatron.core.datasets.gpt_dataset", "megatron.core.datasets.blended_dataset",
            "megatron.core.datasets.blended_megatron_dataset_builder", "megatron.core.datasets.megatron_dataset",
            "torch.utils.cpp_extension", "megatron.core.models.gpt.gpt_model")

_hidden = 0
_original_showwarning = None


def is_known(message: str) -> bool:
    """Whether a warning or log message is one of the KNOWN harmless ones."""
    return _PATTERN.search(message) is not None


def _showwarning(message, category, filename, lineno, file=None, line=None):
    global _hidden
    if is_known(str(message)):
        _hidden += 1
        return
    _original_showwarning(message, category, filename, lineno, file, line)


class _KnownLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        global _hidden
        if is_known(record.getMessage()):
            _hidden += 1
            return False
        return True


def install(environ: Optional[dict] = None) -> bool:
    """Hide and count the KNOWN warnings in this process (idempotent). False when MILE_SHOW_ALL_WARNINGS=1."""
    global _original_showwarning
    environ = os.environ if environ is None else environ
    if environ.get("MILE_SHOW_ALL_WARNINGS") == "1":
        return False
    if _original_showwarning is None:
        _original_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning
        for name in _LOGGERS:
            logging.getLogger(name).addFilter(_KnownLogFilter())
    return True


def hidden_count() -> int:
    """How many warnings and log messages install() has hidden in this process so far."""
    return _hidden


def summary_line() -> Optional[str]:
    """The start-up line about hidden warnings, or None when none was hidden."""
    if _hidden == 0:
        return None
    return (f" > {_hidden} known harmless warnings hidden on this rank (Transformer Engine / Apex not installed, "
            "CUDA-only settings, megatron-core notices that ask nothing of you); MILE_SHOW_ALL_WARNINGS=1 shows them")
