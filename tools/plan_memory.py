#!/usr/bin/env python
"""Per-GPU memory and time per step of a training run. See megatron_mile/planning/cli.py (or --help)."""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mile.planning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
