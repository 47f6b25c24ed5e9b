"""Megatron-LM flags that configure nothing here: those the project provides by construction, and those it
refuses at start-up. Every other Megatron-LM flag the parser knows is a field of megatron_mile.config.

A launch script written for Megatron-LM's pretrain_gpt.py passes flags of three kinds:

- flags with a meaning here (fields of megatron_mile.config: same name, default and units);
- PROVIDED: flags that ask for what this project always does (`--use-mcore-models`: the model is always
  megatron-core's); they are accepted, and the run says once in its log how each one is provided;
- REFUSED: flags whose feature the project does not have; a run that sets one stops at start-up with one line
  naming the flag, why, and what to use instead (never accepted and silently ignored).

README's "Megatron-LM flags" table is this module's content.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List


@dataclass(frozen=True)
class ProvidedFlag:
    """A Megatron-LM switch this project always acts as if set: `how` says how, for the run's log."""

    how: str
    nargs: int = 0  # values the flag takes (0: a switch)


@dataclass(frozen=True)
class RefusedFlag:
    """A Megatron-LM flag whose feature the project lacks: `why` and `instead` make the start-up message."""

    why: str
    instead: str
    nargs: object = 0  # argparse nargs of the flag's values: 0 (a switch), 1, "+"


LOSS_HOW = "the project's own loss (megatron_mile.loss, fused into the vocab-parallel cross-entropy) is used"

PROVIDED: Dict[str, ProvidedFlag] = {
    "--use-mcore-models": ProvidedFlag("the model is always megatron-core's GPTModel"),
    "--cross-entropy-loss-fusion": ProvidedFlag(LOSS_HOW + "; it computes the loss in one fused pass"),
    "--calculate-per-token-loss": ProvidedFlag(
        LOSS_HOW + "; the loss is always normalised by the number of loss tokens of the global batch"),
    "--no-check-for-nan-in-loss-and-grad": ProvidedFlag(
        "the training step always checks the loss and gradient norm and skips a non-finite update "
        "(--max-skipped-iterations bounds how many in a row)"),
}

_FSDP = "Megatron-FSDP is not part of this project"
_FSDP_INSTEAD = "use --use-distributed-optimizer (ZeRO-1 sharding of optimizer states)"

REFUSED: Dict[str, RefusedFlag] = {
    "--use-megatron-fsdp": RefusedFlag(_FSDP, _FSDP_INSTEAD),
    "--data-parallel-sharding-strategy": RefusedFlag(_FSDP, _FSDP_INSTEAD, 1),
    "--fsdp-double-buffer": RefusedFlag(_FSDP, _FSDP_INSTEAD),
    "--fsdp-manual-registration": RefusedFlag(_FSDP, _FSDP_INSTEAD),
    "--use-nccl-ub": RefusedFlag("NCCL user buffers are only used by Megatron-FSDP here", "drop it"),
    "--init-model-with-meta-device": RefusedFlag(
        "meta-device initialisation is only for Megatron-FSDP", "drop it (weights are created on the CPU or GPU)"),
    "--step-batch-size-schedule": RefusedFlag(
        "batch-size schedules are not supported (the number of micro-batches per step is fixed)",
        "train with a constant --global-batch-size", "+"),
    "--num-experts": RefusedFlag("mixture-of-experts models are not supported", "train a dense model", 1),
    "--moe-router-topk": RefusedFlag("mixture-of-experts models are not supported", "train a dense model", 1),
    "--expert-model-parallel-size": RefusedFlag(
        "mixture-of-experts models are not supported", "train a dense model", 1),
}


def dest(flag: str) -> str:
    """The argparse destination of a PROVIDED or REFUSED flag (kept apart from the config fields)."""
    return "megatron_lm__" + flag.lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The PROVIDED and REFUSED flags, each in its own help group."""
    provided = parser.add_argument_group(
        "provided by construction", "Megatron-LM flags for what this project always does; accepted.")
    for flag, info in PROVIDED.items():
        kwargs = dict(action="store_true") if info.nargs == 0 else dict(nargs=info.nargs)
        provided.add_argument(flag, dest=dest(flag), help=f"Accepted: {info.how}.", **kwargs)
    refused = parser.add_argument_group(
        "refused", "Megatron-LM flags for features this project lacks: a run that sets one stops at start-up.")
    for flag, info in REFUSED.items():
        kwargs = dict(action="store_true") if info.nargs == 0 else dict(nargs=info.nargs)
        refused.add_argument(flag, dest=dest(flag), default=None if info.nargs else False,
                             help=f"Refused: {info.why}; {info.instead}.", **kwargs)


def refusal_problems(namespace: argparse.Namespace) -> List[str]:
    """One line per REFUSED flag the command line set: the flag, why, and what to use instead."""
    return [f"{flag} is not supported: {info.why}; {info.instead}"
            for flag, info in REFUSED.items() if getattr(namespace, dest(flag), None) not in (None, False)]


def provided_notes(namespace: argparse.Namespace) -> List[str]:
    """One log line per PROVIDED flag the command line set, saying how the project provides it."""
    return [f"{flag}: {info.how}" for flag, info in PROVIDED.items()
            if getattr(namespace, dest(flag), None) not in (None, False)]
