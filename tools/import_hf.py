#!/usr/bin/env python
"""Import a Hugging Face LlamaForCausalLM directory as a checkpoint. See megatron_mile/hf_import/cli.py (or --help).

    python tools/import_hf.py --hf /models/Llama-2-7b-hf --save ckpt/llama2-7b \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
"""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mile import known_warnings  # noqa: E402

known_warnings.install()  # before megatron-core is imported

from megatron_mile.hf_import.cli import import_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(import_main())
