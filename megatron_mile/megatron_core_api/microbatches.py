"""megatron-core's num-microbatches calculator with Megatron-LM's --rampup-batch-size, on both releases.

--rampup-batch-size START INCREMENT SAMPLES (Megatron-LM's meaning, megatron-core 0.16.1's
``RampupBatchsizeNumMicroBatchesCalculator.update``): with n = (GLOBAL - START) / INCREMENT increments and
p = SAMPLES / n samples per increment (a float), the global batch after c consumed samples is

    START + int(c / p) * INCREMENT   for c <= SAMPLES,        GLOBAL   for c > SAMPLES.

- 0.16.1: that calculator, through ``init_num_microbatches_calculator(rampup_batch_size=...)``.
- 0.19.x: the ramp calculator is gone and ``init_num_microbatches_calculator`` ignores ``rampup_batch_size``
  with a deprecation warning (Megatron-LM itself keeps the flag, deprecated, and no longer ramps); what
  remains is ``StepBatchsizeNumMicroBatchesCalculator`` (``step_batch_size_schedule="THRESHOLD:BATCH ..."``,
  the batch of the last threshold <= c). `rampup_step_schedule` writes the ramp above as such a schedule, step
  for step the same batch sizes for every c (the same float arithmetic), so the flag keeps its meaning.

`init_calculator` sets up megatron's global calculator (what update_num_microbatches / get_num_microbatches
then use); `ramp_calculator` builds a private one (to count a run's steps). No collectives in this module.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from megatron.core import num_microbatches_calculator as calculator

__all__ = ["HAS_RAMPUP_CALCULATOR", "init_calculator", "ramp_calculator", "rampup_step_schedule"]

# 0.16.1 has the ramp calculator; 0.17+ the step-schedule one (found from megatron's own module).
HAS_RAMPUP_CALCULATOR = hasattr(calculator, "RampupBatchsizeNumMicroBatchesCalculator")


def rampup_step_schedule(start: int, increment: int, ramp_samples: int, global_batch_size: int) -> List[Tuple[int, int]]:
    """[(threshold samples, global batch)] from (0, start): the --rampup-batch-size ramp (module docstring) as
    step-wise thresholds, each the first consumed-sample count at which the ramp's batch changes.

    Raises ValueError unless 1 <= start < global_batch_size, increment >= 1 divides their difference, and
    ramp_samples >= 1 (megatron-core 0.16.1 asserts the first two and divides by the third).
    """
    if not (1 <= start < global_batch_size and increment >= 1 and (global_batch_size - start) % increment == 0
            and ramp_samples >= 1):
        raise ValueError(f"--rampup-batch-size {start} {increment} {ramp_samples} with --global-batch-size "
                         f"{global_batch_size}: START must be >= 1 and below the global batch, INCREMENT must divide "
                         "their difference, SAMPLES must be >= 1")
    increments = (global_batch_size - start) // increment
    per_increment = ramp_samples / increments  # float, as megatron-core 0.16.1 computes it

    def steps(consumed: int) -> int:
        return int(consumed / per_increment)

    schedule = [(0, start)]
    for k in range(1, increments + 1):
        # The smallest c with steps(c) >= k: the exact ceil(k * p), then moved by the float rounding of c / p.
        c = (k * ramp_samples + increments - 1) // increments
        while c > 0 and steps(c - 1) >= k:
            c -= 1
        while steps(c) < k:
            c += 1
        if c > ramp_samples:
            break
        batch = start + steps(c) * increment
        if c == schedule[-1][0]:
            schedule[-1] = (c, batch)  # several increments at once (fewer ramp samples than increments)
        elif batch != schedule[-1][1]:
            schedule.append((c, batch))
    if schedule[-1][1] != global_batch_size:
        schedule.append((ramp_samples + 1, global_batch_size))  # "c > SAMPLES" reaches the full batch
    return schedule


def init_calculator(rank: int, rampup_batch_size: Optional[List[int]], global_batch_size: int,
                    micro_batch_size: int, data_parallel_size: int) -> None:
    """megatron's global num-microbatches calculator for a run (any earlier one is destroyed first), ramped
    with `rampup_batch_size` [start, increment, samples] when given, else constant."""
    calculator.destroy_num_microbatches_calculator()
    common = dict(rank=rank, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                  data_parallel_size=data_parallel_size, decrease_batch_size_if_needed=False)
    if not rampup_batch_size:
        calculator.init_num_microbatches_calculator(rampup_batch_size=None, **common)  # 0.16.1 requires the name
    elif HAS_RAMPUP_CALCULATOR:
        calculator.init_num_microbatches_calculator(rampup_batch_size=list(rampup_batch_size), **common)
    else:
        calculator.init_num_microbatches_calculator(
            step_batch_size_schedule=_schedule_text(rampup_batch_size, global_batch_size), **common)


def ramp_calculator(rampup_batch_size: List[int], global_batch_size: int):
    """A private calculator of the ramp (one sample per micro-batch, one rank: every batch divides), with
    megatron's ``update(consumed, consistency_check)`` and ``get_current_global_batch_size()``."""
    start, increment, ramp_samples = rampup_batch_size
    if HAS_RAMPUP_CALCULATOR:
        return calculator.RampupBatchsizeNumMicroBatchesCalculator(
            global_batch_size, 1, 1, False, 1, start, increment, ramp_samples)  # rank 1: no log lines
    return calculator.StepBatchsizeNumMicroBatchesCalculator(
        micro_batch_size=1, data_parallel_size=1, decrease_batch_size_if_needed=False, rank=1,
        schedule=_schedule_text(rampup_batch_size, global_batch_size))


def _schedule_text(rampup_batch_size: List[int], global_batch_size: int) -> str:
    # Plain integers (megatron parses each through float(): exact below 2**53 samples).
    return " ".join(f"{c}:{b}" for c, b in rampup_step_schedule(*rampup_batch_size, global_batch_size))
