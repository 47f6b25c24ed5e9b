"""The training loop: setup, the step, evaluation and logging, one module per concern (checkpoints live in
megatron_mile.checkpointing)."""
