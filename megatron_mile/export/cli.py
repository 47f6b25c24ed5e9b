"""Command line of tools/export_hf.py: a checkpoint directory -> a Hugging Face LlamaForCausalLM directory.

Exit codes: 0 exported; 1 the checkpoint or output cannot be used (the reason on stderr, nothing
written); 2 invalid flags (argparse).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="export_hf.py",
        description="Convert a megatron_mile checkpoint (any TP/PP layout) to a Hugging Face LlamaForCausalLM "
                    "directory: config.json, model.safetensors and the run's tokenizer. Runs in one process.")
    parser.add_argument("--load", required=True, help="The checkpoint directory (what the run got as --save).")
    parser.add_argument("--output", required=True, help="The directory to write (created; must not exist or be "
                                                         "empty unless --overwrite).")
    parser.add_argument("--iteration", type=int, default=None,
                        help="Export this iteration instead of the latest one.")
    parser.add_argument("--tokenizer", default=None,
                        help="A tokenizer.json (or a directory holding one) to ship with the model instead of "
                             "the tokenizer recorded in the checkpoint's config.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output directory.")
    return parser


def export_main(argv: Optional[List[str]] = None) -> int:
    args = export_parser().parse_args(argv)
    # After --help and flag errors: the export imports megatron-core (seconds).
    from megatron_mile.export.hf_directory import export_checkpoint  # noqa: PLC0415

    try:
        export_checkpoint(args.load, args.output, iteration=args.iteration, tokenizer=args.tokenizer,
                          overwrite=args.overwrite)
    except (OSError, ValueError, ImportError) as error:
        print(f"export_hf.py: error: {error}", file=sys.stderr)
        return 1
    return 0
