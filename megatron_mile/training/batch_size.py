"""The global batch size of each step, constant or ramped up with --rampup-batch-size, through megatron-core's
num-microbatches calculator, as Megatron-LM drives it (per release: megatron_core_api.microbatches).

--rampup-batch-size START INCREMENT SAMPLES: the global batch starts at START samples and grows by INCREMENT
every SAMPLES / ((--global-batch-size - START) / INCREMENT) consumed samples, reaching --global-batch-size once
SAMPLES samples are consumed. Before each step the calculator is updated with the samples consumed so far
(update_num_microbatches); the step runs get_num_microbatches() micro-batches of --micro-batch-size on each
data-parallel rank, the consumed-sample count and the learning-rate schedule advance by that step's global
batch (micro-batches x micro-batch size x DP), and --train-samples gives the number of steps by Megatron-LM's
count (train_iters_for_samples). A resumed run recomputes the batch size from its consumed samples, so it
continues the ramp where it stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # annotations only: the config (RunConfig.finalize) imports this module
    from megatron_mile.config import RunConfig


def num_micro_batches(config: "RunConfig", global_batch_size: Optional[int] = None) -> int:
    """Micro-batches per data-parallel rank in a step of `global_batch_size` samples (default: the full
    --global-batch-size, the one validation always uses). Needs megatron's parallel state."""
    from megatron.core import parallel_state

    t = config.training
    batch = t.global_batch_size if global_batch_size is None else global_batch_size
    return batch // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())


def init_calculator(config: "RunConfig") -> None:
    """Set up megatron-core's global num-microbatches calculator for this run (replacing one left by an earlier
    run in this process) at the global batch size of consumed sample 0; the ramp through
    megatron_core_api.microbatches (the release's own calculator). Needs megatron's parallel state; no
    collectives."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mile.megatron_core_api import microbatches

    t = config.training
    microbatches.init_calculator(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        rampup_batch_size=list(t.rampup_batch_size) if t.rampup_batch_size else None,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )


def micro_batches_for_step(consumed_samples: int) -> int:
    """The calculator moved to `consumed_samples`; the number of micro-batches of the next step (megatron's
    consistency check: the global batch must divide into micro-batches x DP)."""
    from megatron.core import num_microbatches_calculator as calculator

    calculator.update_num_microbatches(consumed_samples, consistency_check=True)
    return calculator.get_num_microbatches()


def current_global_batch_size() -> int:
    """The global batch of the step the calculator was last moved to (samples over all data-parallel ranks)."""
    from megatron.core import num_microbatches_calculator as calculator

    return calculator.get_current_running_global_batch_size()


def train_iters_for_samples(train_samples: int, global_batch_size: int, rampup: Optional[List[int]]) -> int:
    """Steps of a --train-samples run, as Megatron-LM's update_train_iters counts them: without a ramp
    train_samples // global batch; with one, the ramp's steps (while the consumed samples are within both the
    ramp and train_samples, each step consuming the ramp's batch at that point) plus the whole full-size
    batches that fit in the rest (a partial last batch is dropped). Uses megatron-core's calculator of the ramp
    (a private one, not the run's: megatron_core_api.microbatches); no collectives."""
    if not rampup:
        return train_samples // global_batch_size
    from megatron_mile.megatron_core_api.microbatches import ramp_calculator

    ramp_samples = rampup[2]
    ramp = ramp_calculator(list(rampup), global_batch_size)
    iterations = consumed = 0
    while consumed <= ramp_samples and consumed <= train_samples:
        ramp.update(consumed, consistency_check=False)
        consumed += ramp.get_current_global_batch_size()
        iterations += 1
    if train_samples > consumed:
        iterations += (train_samples - consumed) // global_batch_size
    return iterations
