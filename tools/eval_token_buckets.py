#!/usr/bin/env python
"""Perplexity per token-frequency bucket (high / medium / low) and validation loss per domain of a checkpoint.
See megatron_mile/evaluation/cli.py for the flags (or run with --help); launch with torchrun for TP/PP."""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mile import known_warnings  # noqa: E402

known_warnings.install()  # before megatron-core is imported

from megatron_mile.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
