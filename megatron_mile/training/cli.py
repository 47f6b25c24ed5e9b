"""Command-line entry for training: parse Megatron-LM-style flags, run pretrain(), map failures to exits.

Exit codes: 0 done; 2 invalid flags (one message listing every problem); 1 a run that had to stop (missing
files, non-finite losses, ...), with the reason on stderr.

Every rank that stops prints its reason itself: torchrun may kill the other ranks (rank 0 included) as soon
as the first one exits, so a message printed by one rank only can be lost.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from megatron_mile import device, parallel
from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from megatron_mile.training.loop import TrainingStopped, pretrain


def _error(message: str, world_size: int) -> None:
    """The reason this rank stops, on its own stderr (with its rank when there are several)."""
    where = f" (rank {os.environ.get('RANK', '0')})" if world_size > 1 else ""
    print(f"pretrain_gpt_mile.py: error{where}: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None, model_provider=None, dataset_provider=None) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = parse_args(argv, world_size=world_size, gpu_available=device.gpu_available())
    except ConfigError as error:
        _error(str(error), world_size)
        return 2

    try:
        pretrain(config, model_provider=model_provider, dataset_provider=dataset_provider)
    except (TrainingStopped, OSError, ValueError) as error:
        _error(str(error), world_size)
        return 1
    finally:
        parallel.shutdown()
    return 0
