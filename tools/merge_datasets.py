#!/usr/bin/env python
"""Merge Megatron indexed datasets into one. See megatron_mile/data/cli.py for the flags (or run with --help)."""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mile.data.cli import merge_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(merge_main())
