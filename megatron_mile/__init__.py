"""megatron-mile: Megatron-style pretraining with MiLe, focal and cross-entropy losses computed inside the
vocab-parallel cross-entropy. See README.md."""

__version__ = "0.1.0"
