"""megatron-mile: Megatron-style pretraining with MiLe, focal and cross-entropy losses computed inside the
vocab-parallel cross-entropy. See README.md ("Layout") for the packages: loss, model, training,
checkpointing, data, evaluation, export, planning; parallel / device / cpu_compat for process groups and the
CPU layer; config / arguments for the flags; atomic_io for every file the project writes."""

__version__ = "0.1.0"
