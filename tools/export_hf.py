#!/usr/bin/env python
"""Export a checkpoint to a Hugging Face LlamaForCausalLM directory. See megatron_mile/export/cli.py (or --help).

    python tools/export_hf.py --load runs/quickstart/checkpoints --output runs/quickstart/hf
"""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mile import known_warnings  # noqa: E402

known_warnings.install()  # before megatron-core is imported

from megatron_mile.export.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
