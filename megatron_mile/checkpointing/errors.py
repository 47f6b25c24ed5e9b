"""The checkpoint package's error type (its own module, so that every other module can raise it without
importing megatron-core)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or used by this run; the one-line message says why and what to do.

    A ValueError, so that the training command line reports it as a failed run (exit 1) without a traceback.
    """
