#!/usr/bin/env python
"""Results table (markdown + JSON) and plots (lm loss curves, perplexity per frequency bucket) for several
training runs. See megatron_mile/evaluation/comparison.py for the flags (or run with --help)."""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mile.evaluation.comparison import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
