"""The training loop: setup, the step, evaluation, logging and checkpoints (one module per concern)."""
