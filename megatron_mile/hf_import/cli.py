"""Command line of tools/import_hf.py: a Hugging Face LlamaForCausalLM directory -> a checkpoint of this project.

Prints, when done, the pretrain_gpt_mile.py command that continues training from it (the model, layout and
tokenizer flags, and --pretrained-checkpoint). Exit codes: 0 imported; 1 the input or output cannot be used
(one line on stderr, nothing written); 2 invalid flags (argparse).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import List, Optional


def import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="import_hf.py",
        description="Convert a Hugging Face LlamaForCausalLM (or Llama-architecture Mistral or Qwen2) directory "
                    "with safetensors weights into a megatron_mile checkpoint at the given TP/PP layout (iteration 0, "
                    "weights only), and print the training command that starts from it. Runs TP x PP local "
                    "processes.")
    parser.add_argument("--hf", required=True, help="The Hugging Face model directory (config.json, safetensors "
                                                     "weights, tokenizer.json).")
    parser.add_argument("--save", required=True, help="The checkpoint directory to write (must not exist or be "
                                                      "empty).")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP size of the checkpoint (and of the run that trains from it). Default: 1.")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="PP size of the checkpoint. Default: 1.")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="Pad the vocabulary to a multiple of this times the TP size, as the training run "
                             "will. Default: 128.")
    return parser


def training_command(flags: List[str]) -> str:
    """The torchrun line for `flags` (which hold the TP and PP sizes), one flag group per line."""
    tp = int(flags[flags.index("--tensor-model-parallel-size") + 1])
    pp = int(flags[flags.index("--pipeline-model-parallel-size") + 1])
    lines, current = [], []
    for flag in flags:
        if flag.startswith("--") and len(" ".join(current)) > 70:
            lines.append(" ".join(current))
            current = []
        current.append(shlex.quote(flag))
    lines.append(" ".join(current))
    body = " \\\n    ".join(lines)
    return (f"torchrun --nproc_per_node {tp * pp} pretrain_gpt_mile.py \\\n    {body} \\\n"
            "    --load RUN_DIR --save RUN_DIR  <data, batch, schedule and --loss-type flags of your run>")


def import_main(argv: Optional[List[str]] = None, runner=None) -> int:
    args = import_parser().parse_args(argv)
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "make_vocab_size_divisible_by"):
        if getattr(args, flag) < 1:
            import_parser().error(f"--{flag.replace('_', '-')} must be >= 1")
    # After --help and flag errors: the import imports megatron-core (seconds).
    from megatron_mile.hf_import.checkpoint import import_checkpoint  # noqa: PLC0415
    from megatron_mile.testing.distributed import RemoteError  # noqa: PLC0415

    try:
        result = import_checkpoint(args.hf, args.save, args.tensor_model_parallel_size,
                                   args.pipeline_model_parallel_size, args.make_vocab_size_divisible_by,
                                   runner=runner)
    except (OSError, ValueError, ImportError) as error:
        print(f"import_hf.py: error: {error}", file=sys.stderr)
        return 1
    except RemoteError as error:
        print(f"import_hf.py: error: a process failed; nothing was written:\n{error}", file=sys.stderr)
        return 1
    print("\nContinue pretraining from it (the model flags must stay as they are; --seq-length may be lower):\n")
    print(training_command(result.training_flags))
    return 0
