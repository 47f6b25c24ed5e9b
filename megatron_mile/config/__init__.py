"""Run configuration: dataclasses with a docstring per field, from which the command-line flags derive.

Flag names are Megatron-LM's (`--tensor-model-parallel-size`, `--micro-batch-size`, ...), spelled from the
field names, so existing launch scripts carry over. `megatron_mile.arguments` builds the parser from these
classes; `RunConfig.validate` checks the combinations once, at start-up, and reports every problem in one
message.

- sections.py: the model, parallelism, loss, optimizer and data sections, one field per flag;
- training.py: TrainingConfig (batches, iterations, checkpoints, run control, logging);
- layers.py: RecomputeConfig and KernelConfig (recomputation, layer implementation, fused kernels);
- fields.py: `flag`, the dataclass field that carries argparse settings;
- run_config.py: RunConfig, which holds them, fills dependent defaults and validates;
- checks.py: the checks behind validate (ranges, schedules, checkpoint flags, combinations).
"""

from megatron_mile.config.checks import ConfigError, checkpoint_flag_problems, schedule_problems
from megatron_mile.config.run_config import RunConfig
from megatron_mile.config.fields import flag
from megatron_mile.config.layers import KernelConfig, RecomputeConfig
from megatron_mile.config.sections import DataConfig, LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_mile.config.training import TrainingConfig

__all__ = [
    "ConfigError", "DataConfig", "KernelConfig", "LossConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig",
    "RecomputeConfig", "RunConfig", "TrainingConfig", "checkpoint_flag_problems", "flag", "schedule_problems",
]
