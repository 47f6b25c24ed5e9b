#!/usr/bin/env python
"""Train a byte-level BPE tokenizer.json on JSON-lines corpora. See megatron_mile/data/cli.py for the flags (or run with --help)."""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mile.data.cli import train_tokenizer_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_tokenizer_main())
