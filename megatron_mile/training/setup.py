"""setup_training(): everything a run builds before its first step, as one TrainingSetup.

The TrainingSetup is the run's state: pretrain() (megatron_mile.training.loop), the step and evaluation
(megatron_mile.training.step) and the benchmarks take it whole, instead of its pieces by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from megatron.core import parallel_state
from megatron.core.timers import Timers

from megatron_mile import checkpointing
from megatron_mile.arguments import config_to_dict
from megatron_mile.atomic_io import ensure_writable_directory
from megatron_mile.checkpointing import megatron_lm
from megatron_mile.checkpointing.collectives import on_rank0_for_all
from megatron_mile.checkpointing.compatibility import ARCHITECTURE_FIELDS
from megatron_mile.checkpointing.lock import SaveDirectoryLock
from megatron_mile.checkpointing.tracker import read_metadata, resolve_checkpoint_dir
from megatron_mile.config import RunConfig
from megatron_mile.model import build_model
from megatron_mile.training import batch_size
from megatron_mile.training import data as run_data
from megatron_mile.training.initialize import initialize_parallel, print_rank_0, set_random_seeds
from megatron_mile.training.optimizer import build_optimizer, wrap_for_training
from megatron_mile.training.step import LossCollector, configure_schedules
from megatron_mile.training.timing import build_timers


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


def _validation_start(config: RunConfig, dataset, consumed_valid_samples: int) -> int:
    """Where the validation iterator starts after `consumed_valid_samples` validation samples: wrapped the way
    run_data.micro_batch_iterator cycles, whole rounds of micro_batch_size * DP samples per pass."""
    if config.data.dataloader_type == "cyclic":
        return consumed_valid_samples  # its sampler counts epochs itself
    stride = config.training.micro_batch_size * parallel_state.get_data_parallel_world_size()
    period = (len(dataset) // stride) * stride
    return consumed_valid_samples % period if period else 0


@dataclass
class TrainingSetup:
    """Everything pretrain() builds before its first step; the state train_step and evaluate take."""

    config: RunConfig
    model: list  # model chunks, wrapped in megatron DDP
    optimizer: object
    scheduler: object
    train_iterators: list
    valid_iterators: Optional[list]
    num_micro_batches: int  # of the coming training step (set before each step with --rampup-batch-size)
    loss_collector: LossCollector  # the schedules' finalize hook is bound to it (configure_schedules)
    config_dict: dict
    vocab_size: int
    iteration: int = 0
    consumed_samples: int = 0
    consumed_valid_samples: int = 0  # validation samples evaluated so far (pretrain's validate() counts them)
    num_floating_point_operations_so_far: int = 0  # Megatron-LM's counter: training FLOPs of all iterations so far
    save_lock: Optional[SaveDirectoryLock] = None  # rank 0's lock on --save; None elsewhere
    timers: Optional[Timers] = None  # --timing-log-level's timers (megatron_mile.training.timing)
    test_iterators: Optional[list] = None  # --test-data-path: evaluated once at the end of training

    def release(self) -> None:
        """Give up what the run holds outside the process (the --save lock). Idempotent, no collectives."""
        if self.save_lock is not None:
            self.save_lock.release()


def _claim_output_directories(config: RunConfig) -> Optional[SaveDirectoryLock]:
    """Rank 0 checks that --save and --tensorboard-dir are writable directories (creating them) and locks
    --save for this run; a failure stops every rank with rank 0's one-line reason.

    Raises OutputDirectoryError (bad directory) or SaveDirectoryLocked (another run writes --save), both
    ValueErrors. Returns the lock on rank 0, None elsewhere. Collectives: one broadcast from rank 0.
    """
    t = config.training

    def claim() -> Optional[SaveDirectoryLock]:
        for path, flag in ((t.save, "--save"), (t.tensorboard_dir, "--tensorboard-dir")):
            if path:
                ensure_writable_directory(path, flag)
        return SaveDirectoryLock.acquire(t.save, log=print_rank_0) if t.save else None

    return on_rank0_for_all(claim)


def setup_training(config: RunConfig, model_provider=None, dataset_provider=None) -> TrainingSetup:
    """Initialise parallel state, check the output directories and lock --save, build model, optimizer,
    scheduler and data, load --load if given.

    Must be called on every rank. The caller releases the --save lock (TrainingSetup.release) when the run
    ends; set-up releases it itself when it fails. Collectives: those of megatron's parallel-state
    initialisation, a broadcast of the output-directory decision, model wrapping, the optimizer and (with
    --load) the checkpoint load.
    """
    initialize_parallel(config)
    # Before any training work: an unwritable output directory, or a --save another run writes, stops here.
    save_lock = _claim_output_directories(config)
    try:
        setup = _build_training_state(config, model_provider, dataset_provider)
    except BaseException:
        if save_lock is not None:
            save_lock.release()
        raise
    setup.save_lock = save_lock
    return setup


def _load_at_start(config: RunConfig, model, optimizer, scheduler, config_dict: dict) -> Tuple[int, int, int, int]:
    """(iteration, consumed training samples, consumed validation samples, floating-point operations so far)
    after loading what Megatron-LM's flags ask for (from this project's checkpoints and Megatron-LM's alike): --load (at --ckpt-step if given; without the optimizer and scheduler with --no-load-optim,
    without RNG states with --no-load-rng), its weights only from iteration 0 with --finetune, and
    --pretrained-checkpoint's weights (as --finetune) when --load holds no checkpoint yet.
    Collectives: those of checkpointing.load_checkpoint / load_model_weights."""
    t = config.training
    load_dir, finetune = t.load, t.finetune
    if t.pretrained_checkpoint is not None and (load_dir is None or not _holds_checkpoint(load_dir)):
        load_dir, finetune = t.pretrained_checkpoint, True
    if load_dir is None:
        return 0, 0, 0, 0
    if finetune:
        loaded = checkpointing.load_model_weights(load_dir, model, t.ckpt_step, config_dict)
        print_rank_0(f" --finetune: weights of iteration {loaded} of {load_dir}; training starts at iteration 0 "
                     "with a fresh optimizer, scheduler and data position")
        return 0, 0, 0, 0
    iteration, consumed_samples = checkpointing.load_checkpoint(
        load_dir, model, optimizer, scheduler, config_dict, load_optimizer=not t.no_load_optim,
        load_rng=not t.no_load_rng, iteration=t.ckpt_step)
    if iteration == 0:
        return 0, consumed_samples, 0, 0
    saved = checkpointing.read_training_progress(load_dir, iteration)
    return iteration, consumed_samples, saved["consumed_valid_samples"], saved["num_floating_point_operations_so_far"]


# The model flags --use-checkpoint-args takes from the checkpoint (Megatron-LM's names in both kinds).
_CHECKPOINT_ARGS = ARCHITECTURE_FIELDS + ("max_position_embeddings", "make_vocab_size_divisible_by")


def _use_checkpoint_args(config: RunConfig) -> None:
    """--use-checkpoint-args: the model-shape flags of the checkpoint in --load replace this run's (its
    mile_checkpoint.json config, or a Megatron-LM checkpoint's args). No collectives."""
    t = config.training
    path, _ = resolve_checkpoint_dir(t.load, t.ckpt_step, megatron_lm=True)
    if path is None:
        print_rank_0(f" --use-checkpoint-args: no checkpoint in {t.load}; the flags' model is built")
        return
    if (path / checkpointing.METADATA_FILENAME).is_file():
        saved = read_metadata(path)["config"]["model"]
    else:
        args = vars(megatron_lm.read_common(path)["args"])
        saved = {name: args[name] for name in _CHECKPOINT_ARGS if name in args}
        if "add_bias_linear" in args:
            saved["disable_bias_linear"] = not args["add_bias_linear"]
    for name in _CHECKPOINT_ARGS:
        if name in saved:
            setattr(config.model, name, saved[name])


def _holds_checkpoint(directory: str) -> bool:
    """Whether `directory` names a checkpoint to resume (its latest-iteration file exists). No collectives."""
    return (Path(directory) / checkpointing.TRACKER_FILENAME).is_file()


def _build_training_state(config: RunConfig, model_provider, dataset_provider) -> TrainingSetup:
    """Model, optimizer, scheduler, data iterators and the --load state, on initialised parallel state."""
    t = config.training
    model_provider = model_provider or build_model
    dataset_provider = dataset_provider or run_data.build_datasets
    set_random_seeds(t.seed)
    tokenizer = run_data.build_run_tokenizer(config)
    eval_samples = t.eval_iters * t.global_batch_size * max(1, math.ceil(t.train_iters / t.eval_interval) + 1)
    eval_samples = eval_samples if t.eval_iters > 0 else 0
    # The data is checked before any model work: a damaged dataset or an empty split stops the run now.
    run_data.check_data(config, eval_samples)
    if t.use_checkpoint_args and t.load is not None:
        _use_checkpoint_args(config)
    chunks = model_provider(config, tokenizer.vocab_size)
    set_random_seeds(t.seed)  # model building re-seeded per layer; restart the runtime streams
    model = wrap_for_training(config, chunks)
    timers = build_timers(t.timing_log_level)
    optimizer, scheduler = build_optimizer(config, model, timers)
    config_dict = config_to_dict(config)

    iteration, consumed_samples, consumed_valid_samples, flops_so_far = _load_at_start(config, model, optimizer,
                                                                                       scheduler, config_dict)

    # As Megatron-LM: megatron-core's calculator gives each step's micro-batches from the consumed samples.
    batch_size.init_calculator(config)
    num_micro = batch_size.micro_batches_for_step(consumed_samples)
    train_ds, valid_ds = dataset_provider(config, tokenizer, eval_samples)
    train_iterators = _data_iterators(config, model, train_ds, consumed_samples, cycle=False)
    valid_iterators = None
    if t.eval_iters > 0 and valid_ds:
        # A resumed run validates on the samples the uninterrupted run would (as Megatron-LM does).
        valid_start = _validation_start(config, valid_ds, consumed_valid_samples)
        valid_iterators = _data_iterators(config, model, valid_ds, valid_start, cycle=True)
    test_ds = run_data.build_test_dataset(config, tokenizer, t.eval_iters * t.global_batch_size)
    test_iterators = _data_iterators(config, model, test_ds, 0, cycle=True) if test_ds else None

    collector = LossCollector()
    configure_schedules(model, optimizer, collector, config, timers)
    return TrainingSetup(config, model, optimizer, scheduler, train_iterators, valid_iterators, num_micro, collector,
                         config_dict, tokenizer.vocab_size, iteration, consumed_samples,
                         consumed_valid_samples=consumed_valid_samples, timers=timers, test_iterators=test_iterators,
                         num_floating_point_operations_so_far=flops_so_far)
