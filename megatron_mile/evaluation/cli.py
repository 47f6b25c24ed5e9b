"""tools/eval_token_buckets.py: perplexity per token-frequency bucket and loss per domain of a checkpoint.

    torchrun --nproc_per_node 2 tools/eval_token_buckets.py --load runs/x/checkpoints \
        --tensor-model-parallel-size 2 --output-json runs/x/buckets.json

The model's settings, tokenizer, data and split come from the args saved in the checkpoint
(checkpointing.read_saved_config); flags override the data and the layout only. Steps, all ranks alike:
count token ids over the training split of the training data (the buckets), load the weights at the
requested TP/PP layout, score every validation sample once (megatron_mile.evaluation.bucket_perplexity),
print a table and write the JSON on the last rank.

Exit codes: 0 done; 2 invalid flags; 1 the evaluation cannot run (missing or mismatched checkpoint, data
tokenized with another vocabulary, missing files), with one `error:` line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import List, Optional

import torch.distributed as dist
from megatron.core.transformer.module import Float16Module

from megatron_mile import checkpointing, device, parallel
from megatron_mile.arguments import add_dataclass_arguments, config_from_dict, config_to_dict
from megatron_mile.config import ConfigError, flag
from megatron_mile.evaluation import datasets as eval_data
from megatron_mile.evaluation.bucket_perplexity import evaluate_bucket_sums, summarise
from megatron_mile.evaluation.report import format_report, write_strict_json
from megatron_mile.evaluation.token_buckets import (
    DEFAULT_FRACTIONS,
    build_buckets,
    count_tokens_distributed,
    validate_fractions,
)
from megatron_mile.loss import LossSpec
from megatron_mile.model import build_model
from megatron_mile.training import data as run_data
from megatron_mile.training.initialize import initialize_parallel, print_rank_0, set_random_seeds

PROG = "eval_token_buckets.py"


class EvaluationError(ValueError):
    """The evaluation cannot run as asked; the message says why and what to change."""


@dataclass
class BucketEvalConfig:
    """Settings of one bucket evaluation (flags derive from these fields)."""

    load: Optional[str] = None
    """Checkpoint directory (the training run's --save). Required."""
    iteration: Optional[int] = None
    """Checkpoint iteration to evaluate. Default: the latest (latest_checkpointed_iteration.txt)."""
    data_path: Optional[List[str]] = flag(None, nargs="*")
    """Training datasets whose token frequencies define the buckets ('w1 prefix1 ...' or prefixes); their
    training split is counted. Default: the checkpoint's --data-path."""
    split: Optional[str] = None
    """Train/validation/test proportions of --data-path. Default: the checkpoint's --split."""
    valid_data_path: Optional[List[str]] = flag(None, nargs="*")
    """Held-out validation datasets, each scored whole as one domain. Default: the validation split of each
    --data-path prefix (one domain per prefix)."""
    tokenizer_model: Optional[str] = None
    """The checkpoint's tokenizer file, where it has moved since training. Its vocabulary must match."""
    data_cache_path: Optional[str] = None
    """Where megatron's dataset index caches go. Default: the checkpoint's --data-cache-path (or beside the data)."""
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size to evaluate at (any size that divides the heads and the padded vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size to evaluate at (the last stage computes the losses)."""
    micro_batch_size: Optional[int] = None
    """Samples per forward pass on each data-parallel rank. Default: the checkpoint's."""
    max_eval_samples: Optional[int] = None
    """Score at most this many samples (--seq-length tokens each) per domain. Default: all of them."""
    bucket_fractions: List[float] = flag(DEFAULT_FRACTIONS, nargs="+")
    """Share of training-token occurrences covered by each bucket, most frequent first (the paper's
    high / medium / low: 0.80 0.15 0.05)."""
    output_json: Optional[str] = None
    """Write the results here as JSON (to a temp name, then renamed)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Perplexity per token-frequency bucket (high / medium / low: the tokens covering the first "
        "80% / next 15% / last 5% of training-token occurrences) and validation loss per domain of a "
        "megatron_mile checkpoint, at any TP/PP layout (launch with torchrun for several processes).",
        allow_abbrev=False,
    )
    add_dataclass_arguments(parser, BucketEvalConfig, "evaluation")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> BucketEvalConfig:
    namespace = build_parser().parse_args(argv)
    config = BucketEvalConfig(**{f.name: getattr(namespace, f.name) for f in fields(BucketEvalConfig)})
    problems = []
    if not config.load:
        problems.append("--load <checkpoint directory> is required")
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size", "max_eval_samples"):
        value = getattr(config, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if problems:
        raise ConfigError("invalid flags:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def run_config_for(eval_config: BucketEvalConfig, saved_config: dict, saved_vocab: dict, world_size: int):
    """The checkpoint's RunConfig with this evaluation's layout, batch, data and tokenizer overrides.

    The vocabulary is padded to the checkpoint's row count at the new TP size (choosing
    --make-vocab-size-divisible-by = padded rows / TP), so a checkpoint loads at any TP that divides it.
    """
    config = config_from_dict(saved_config)
    p, t, d, m = config.parallel, config.training, config.data, config.model
    tp, pp = eval_config.tensor_model_parallel_size, eval_config.pipeline_model_parallel_size
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.num_layers_per_virtual_pipeline_stage = None
    p.sequence_parallel = False
    p.use_distributed_optimizer = False
    p.distributed_backend = None
    padded = saved_vocab.get("padded")
    if isinstance(padded, int) and padded > 0:
        if padded % tp:
            raise EvaluationError(
                f"the checkpoint's vocabulary has {padded} rows (padded), which --tensor-model-parallel-size "
                f"{tp} does not divide: evaluate at a TP size that divides {padded}"
            )
        m.make_vocab_size_divisible_by = padded // tp
    if eval_config.micro_batch_size is not None:
        t.micro_batch_size = eval_config.micro_batch_size
    dp = max(1, world_size // (tp * pp))
    t.global_batch_size = t.micro_batch_size * dp
    t.load = t.save = t.tensorboard_dir = None
    t.log_entropy_histogram_interval = 0
    t.save_interval = t.exit_interval = None
    if eval_config.data_path:
        d.data_path, d.mock_data = list(eval_config.data_path), False
        # The evaluation's data replaces every data source of the training run (a blend file, per-split blends).
        d.data_args_path = d.per_split_data_args_path = None
        d.train_data_path = d.valid_data_path = d.test_data_path = None
    if eval_config.split is not None:
        d.split = eval_config.split
    if eval_config.tokenizer_model is not None:
        d.tokenizer_model = eval_config.tokenizer_model
    if eval_config.data_cache_path is not None:
        d.data_cache_path = eval_config.data_cache_path
    if not d.data_path:
        raise EvaluationError(
            f"the checkpoint {eval_config.load} was trained without --data-path (on --mock-data, a --data-args-path "
            "file or per-split data): give the training data whose token frequencies define the buckets with "
            "--data-path (and held-out data with --valid-data-path)"
        )
    d.mock_data = False
    return config


def _checkpoint_metadata(eval_config: BucketEvalConfig) -> dict:
    """mile_checkpoint.json of the checkpoint to evaluate. No collectives."""
    if not os.path.isdir(eval_config.load):
        raise EvaluationError(
            f"checkpoint directory {eval_config.load} does not exist: pass the directory the training run saved "
            "its checkpoints to (its --save)"
        )
    return checkpointing.read_checkpoint_metadata(eval_config.load, eval_config.iteration)


def _checked_tokenizer(config, saved_vocab: dict):
    """The run's tokenizer, refused when its vocabulary is not the checkpoint's. No collectives."""
    tokenizer = run_data.build_run_tokenizer(config)
    saved_real = saved_vocab.get("real")
    if saved_real is not None and tokenizer.vocab_size != saved_real:
        raise EvaluationError(
            f"the tokenizer {config.data.tokenizer_model or config.data.tokenizer_type} has {tokenizer.vocab_size} "
            f"entries, the checkpoint was trained with a {saved_real}-token vocabulary: pass the checkpoint's "
            "tokenizer (--tokenizer-model)"
        )
    return tokenizer


def _load_model(eval_config: BucketEvalConfig, config, vocab_size: int):
    """(model chunks of this rank with the checkpoint's weights, in eval precision; the iteration).

    Collectives: those of checkpointing.load_model_weights.
    """
    chunks = build_model(config, vocab_size)
    iteration = checkpointing.load_model_weights(eval_config.load, chunks, eval_config.iteration,
                                                 config_dict=config_to_dict(config))
    if config.optimizer.half_precision:
        # As in training: bf16 / fp16 weights and activations; the loss statistics are fp32 whatever the input.
        chunks = [Float16Module(chunks[0].config, chunk) for chunk in chunks]
    return chunks, iteration


def evaluate(eval_config: BucketEvalConfig) -> dict:
    """Run the whole evaluation on every rank; return the report (the same dict on every rank).

    Collectives: process-group and model-parallel group creation; count_tokens_distributed (all-reduces);
    dataset index builds (barriers); the checkpoint load (megatron's dist_checkpointing.load);
    evaluate_bucket_sums (forward-only schedules, DP all-reduce, broadcast).
    """
    start = time.time()
    fractions = validate_fractions(eval_config.bucket_fractions)
    metadata = _checkpoint_metadata(eval_config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config = run_config_for(eval_config, metadata.get("config", {}), metadata.get("vocab", {}), world_size)
    config.finalize(world_size)
    config.validate(world_size, device.gpu_available())
    train_prefixes = eval_data.prefixes_of(config.data.data_path)
    run_data.check_dataset_files(train_prefixes)
    held_out = bool(eval_config.valid_data_path)
    valid_prefixes = eval_data.prefixes_of(eval_config.valid_data_path) if held_out else train_prefixes
    run_data.check_dataset_files(valid_prefixes, "--valid-data-path" if held_out else "--data-path")

    initialize_parallel(config)
    set_random_seeds(config.training.seed)
    tokenizer = _checked_tokenizer(config, metadata.get("vocab", {}))

    # Buckets from the training split; the validation ranges are counted too, to catch foreign token ids
    # before any model work.
    train_ranges = eval_data.training_ranges(train_prefixes, config.data.split)
    print_rank_0(f" counting token frequencies over {sum(r.end - r.begin for r in train_ranges):,} training "
                 f"sequences of {len(train_ranges)} dataset(s) ...")
    buckets = build_buckets(count_tokens_distributed(train_ranges, tokenizer.vocab_size), fractions)
    domains = eval_data.validation_domains(valid_prefixes, None if held_out else config.data.split)
    count_tokens_distributed([d.sequences for d in domains], tokenizer.vocab_size)

    chunks, iteration = _load_model(eval_config, config, tokenizer.vocab_size)
    print_rank_0(f" building the sample indices of {len(domains)} validation domain(s) ...")
    eval_data.build_validation_datasets(config, tokenizer, domains)
    sums = evaluate_bucket_sums(
        chunks, [d.dataset for d in domains], buckets.bucket_of_token, len(buckets.names),
        config.training.micro_batch_size, config.model.seq_length, eval_config.max_eval_samples,
    )
    results = summarise(sums, [d.name for d in domains], buckets.names)
    loss = config.loss
    return {
        "checkpoint": os.path.abspath(eval_config.load),
        "iteration": iteration,
        "loss_type": loss.loss_type,
        "loss_settings": LossSpec.from_config(loss).settings(),
        "buckets": [{**row, **results["buckets"][row["bucket"]]} for row in buckets.summary()],
        "overall": results["overall"],
        "domains": results["domains"],
        "frequency_data": [{"prefix": r.prefix, "sequences": [r.begin, r.end]} for r in train_ranges],
        "validation_data": [{"domain": d.name, "prefix": d.sequences.prefix,
                             "sequences": [d.sequences.begin, d.sequences.end], "samples": d.num_samples}
                            for d in domains],
        "seq_length": config.model.seq_length,
        "max_eval_samples": eval_config.max_eval_samples,
        "layout": {"tensor_model_parallel_size": config.parallel.tensor_model_parallel_size,
                   "pipeline_model_parallel_size": config.parallel.pipeline_model_parallel_size,
                   "world_size": world_size},
        "seconds": round(time.time() - start, 1),
    }


def main(argv: Optional[List[str]] = None) -> int:
    """Parse flags, evaluate, print the table and write the JSON on the last rank; return the exit code."""
    rank = int(os.environ.get("RANK", "0"))
    last = rank == int(os.environ.get("WORLD_SIZE", "1")) - 1
    # A caller that set up the process group itself (a test's worker pool) keeps it afterwards.
    owns_process_group = not dist.is_initialized()
    try:
        eval_config = parse_args(argv)
    except ConfigError as error:
        if rank == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    try:
        report = evaluate(eval_config)
        if last:
            print(format_report(report), flush=True)
            if eval_config.output_json:
                write_strict_json(eval_config.output_json, report)
                print(f" wrote {eval_config.output_json}", flush=True)
    except ConfigError as error:
        if rank == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        # CheckpointError, TokenBucketError, TokenizerError and EvaluationError are ValueErrors: each says
        # what is wrong and how to fix it. Every rank hits the same check; one line is enough.
        if rank == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    finally:
        if owns_process_group:
            parallel.shutdown()
    return 0
