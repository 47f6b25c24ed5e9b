"""What the dataset-building test files share: small real datasets, a run config over them, and a build that
fails the test instead of hanging when megatron's dataset builder would spin forever.

tests/test_data_splits.py (split checks) and tests/test_data_index_cache.py (index-cache safety) build
datasets through megatron_mile.training.data.build_datasets, as training does.
"""

from __future__ import annotations

import contextlib
import os
import signal

import numpy as np

from megatron_mile.arguments import parse_args
from megatron_mile.data.indexed_writer import IndexedDatasetWriter
from megatron_mile.training import data as run_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data", "sample", "tokenizer.json")
MODEL_FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 1 "
               "--global-batch-size 2 --train-iters 3 --eval-interval 2 --tokenizer-type HuggingFaceTokenizer "
               f"--tokenizer-model {TOKENIZER}").split()
# A build that does not finish in this time is megatron's endless loop: fail the test instead of hanging.
BUILD_TIMEOUT_S = 60


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (a pure-Python loop is interrupted too)."""
    def expired(signum, frame):
        raise TimeoutError(f"the dataset build did not finish in {seconds} s (an empty split spins forever)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_dataset(prefix: str, num_documents: int, seed: int = 0) -> str:
    """A dataset of `num_documents` random documents (5-39 ids below the sample tokenizer's 8,192)."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(num_documents):
            writer.add_document(rng.integers(1, 8000, size=int(rng.integers(5, 40))).tolist())
        writer.finalize()
    return prefix


def run_config(data_path, *extra):
    """A validated RunConfig training a tiny model on `data_path` (a list of --data-path entries)."""
    return parse_args([*MODEL_FLAGS, "--data-path", *data_path, *map(str, extra)])


def build_run_datasets(config):
    """(train, validation) as training builds them, under time_limit(BUILD_TIMEOUT_S)."""
    tokenizer = run_data.build_run_tokenizer(config)
    t = config.training
    with time_limit(BUILD_TIMEOUT_S):
        return run_data.build_datasets(config, tokenizer, t.eval_iters * t.global_batch_size)
