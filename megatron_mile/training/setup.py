"""setup_training(): everything a run builds before its first step, as one TrainingSetup.

The TrainingSetup is the run's state: pretrain() (megatron_mile.training.loop), the step and evaluation
(megatron_mile.training.step) and the benchmarks take it whole, instead of its pieces by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron.core import parallel_state

from megatron_mile import checkpointing
from megatron_mile.arguments import config_to_dict
from megatron_mile.config import RunConfig
from megatron_mile.model import build_model
from megatron_mile.training import data as run_data
from megatron_mile.training.initialize import initialize_parallel, set_random_seeds
from megatron_mile.training.optimizer import build_optimizer, wrap_for_training
from megatron_mile.training.step import LossCollector, configure_schedules


def num_micro_batches(config: RunConfig) -> int:
    t = config.training
    dp = parallel_state.get_data_parallel_world_size()
    return t.global_batch_size // (t.micro_batch_size * dp)


def _data_iterators(config: RunConfig, model: list, dataset, consumed_samples: int, cycle: bool) -> list:
    """One iterator per model chunk that reads data (first / last pipeline stage, and with
    --reset-attention-mask every stage: each layer needs the block-diagonal mask), None elsewhere."""
    iterators = []
    vp = len(model) > 1
    for index, chunk in enumerate(model):
        stage = index if vp else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=not vp, vp_stage=stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=not vp, vp_stage=stage)
        reads = first or last or config.data.reset_attention_mask
        iterators.append(run_data.micro_batch_iterator(dataset, config, consumed_samples, cycle=cycle) if reads else None)
    return iterators


@dataclass
class TrainingSetup:
    """Everything pretrain() builds before its first step; the state train_step and evaluate take."""

    config: RunConfig
    model: list  # model chunks, wrapped in megatron DDP
    optimizer: object
    scheduler: object
    train_iterators: list
    valid_iterators: Optional[list]
    num_micro_batches: int
    loss_collector: LossCollector  # the schedules' finalize hook is bound to it (configure_schedules)
    config_dict: dict
    vocab_size: int
    iteration: int = 0
    consumed_samples: int = 0


def setup_training(config: RunConfig, model_provider=None, dataset_provider=None) -> TrainingSetup:
    """Initialise parallel state, build model, optimizer, scheduler and data, load --load if given.

    Must be called on every rank. Collectives: those of megatron's parallel-state initialisation, model
    wrapping, the optimizer and (with --load) the checkpoint load.
    """
    t = config.training
    model_provider = model_provider or build_model
    dataset_provider = dataset_provider or run_data.build_datasets
    initialize_parallel(config)
    set_random_seeds(t.seed)
    tokenizer = run_data.build_run_tokenizer(config)
    chunks = model_provider(config, tokenizer.vocab_size)
    set_random_seeds(t.seed)  # model building re-seeded per layer; restart the runtime streams
    model = wrap_for_training(config, chunks)
    optimizer, scheduler = build_optimizer(config, model)
    config_dict = config_to_dict(config)

    iteration, consumed_samples = 0, 0
    if t.load is not None:
        iteration, consumed_samples = checkpointing.load_checkpoint(t.load, model, optimizer, scheduler, config_dict)

    num_micro = num_micro_batches(config)
    eval_samples = t.eval_iters * t.global_batch_size * max(1, math.ceil(t.train_iters / t.eval_interval) + 1)
    train_ds, valid_ds = dataset_provider(config, tokenizer, eval_samples if t.eval_iters > 0 else 0)
    train_iterators = _data_iterators(config, model, train_ds, consumed_samples, cycle=False)
    valid_iterators = _data_iterators(config, model, valid_ds, 0, cycle=True) if t.eval_iters > 0 and valid_ds else None

    collector = LossCollector()
    configure_schedules(model, optimizer, collector, config)
    return TrainingSetup(config, model, optimizer, scheduler, train_iterators, valid_iterators, num_micro, collector,
                         config_dict, tokenizer.vocab_size, iteration, consumed_samples)
