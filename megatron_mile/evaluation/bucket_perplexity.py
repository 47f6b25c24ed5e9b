"""Validation cross-entropy per token-frequency bucket and per domain, at any TP / PP / DP layout.

The model runs forward only through megatron-core's pipeline schedules with the training step's forward
function (megatron_mile.training.step.make_forward_step); its loss hook returns, per token, the plain
cross-entropy ce (whatever loss it was trained with), the weight and the entropy. On the last pipeline
stage, each micro-batch's loss-masked tokens are grouped by the bucket of their TARGET token and summed.
Tensor-parallel ranks hold identical per-token values (the vocab-parallel loss all-reduces them), so only
the data-parallel ranks' sums are added.

Every sample is scored exactly once whatever the layout: the samples are dealt to data-parallel ranks
round-robin by micro-batch, as in training, and the last round is padded with masked-out copies of
sample 0. So TP=1, TP=2, PP=2 and DP=2 give the same sums (up to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mile import device
from megatron_mile.model import CE, ENTROPY, request_entropy
from megatron_mile.training import data as run_data
from megatron_mile.training.step import make_forward_step

# Columns of the per-(domain, bucket) sums.
CE_SUM, TOKENS, ENTROPY_SUM = range(3)
_NUM_STATS = 3


class BucketSums:
    """Loss function for megatron's schedules that adds up ce, token count and entropy per target bucket.

    bucket_of_token: int64 [vocab] on the compute device; sums: float64 [buckets, 3] of this rank.
    """

    def __init__(self, bucket_of_token: torch.Tensor, num_buckets: int):
        self.bucket_of_token = bucket_of_token
        self.num_buckets = num_buckets
        self.sums = torch.zeros(num_buckets, _NUM_STATS, dtype=torch.float64)

    def loss_func(self, loss_mask: torch.Tensor, labels: torch.Tensor, output: torch.Tensor):
        """output [b, s, 5] (megatron_mile.model.output), labels / loss_mask [b, s] -> (sum ce, tokens, {}).
        No communication."""
        selected = loss_mask > 0  # [b, s]
        buckets = self.bucket_of_token[labels[selected]]  # [n]
        ce = output[..., CE][selected].double()  # [n]
        entropy = output[..., ENTROPY][selected].double()  # [n]
        sums = torch.stack(
            [
                torch.bincount(buckets, weights=ce, minlength=self.num_buckets),
                torch.bincount(buckets, minlength=self.num_buckets).double(),
                torch.bincount(buckets, weights=entropy, minlength=self.num_buckets),
            ],
            dim=1,
        )  # [buckets, 3]
        self.sums += sums.cpu()
        # The schedules want (loss, token count, reduced values); the loss is not used further here.
        return ce.sum().to(output.dtype), selected.sum().to(torch.int), {}


def padded_micro_batches(dataset, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
    """This DP rank's micro-batches over samples [0, num_samples), the last round padded with masked copies.

    Round k gives rank r the samples k * (mbs * dp) + r * mbs + [0, mbs) (MicroBatchSampler's order);
    positions past num_samples repeat sample 0 with loss_mask 0, so they count nowhere.
    """
    stride = micro_batch_size * dp_size
    for start in range(0, num_samples, stride):
        samples = []
        for index in range(start + dp_rank * micro_batch_size, start + (dp_rank + 1) * micro_batch_size):
            if index < num_samples:
                samples.append(dataset[index])
            else:
                padding = dict(dataset[0])
                padding["loss_mask"] = torch.zeros_like(torch.as_tensor(np.asarray(padding["loss_mask"])))
                samples.append(padding)
        yield run_data.collate(samples)


def num_rounds(num_samples: int, micro_batch_size: int, dp_size: int) -> int:
    """Micro-batches per DP rank needed to score num_samples samples once."""
    return math.ceil(num_samples / (micro_batch_size * dp_size))


def evaluate_bucket_sums(model: list, datasets: Sequence[Optional[object]], bucket_of_token: np.ndarray,
                         num_buckets: int, micro_batch_size: int, seq_length: int,
                         max_samples: Optional[int] = None) -> np.ndarray:
    """Sums of ce, tokens and entropy per (dataset, target bucket) over the loss-masked validation tokens.

    datasets: one per domain (None = nothing to score). Returns float64 [datasets, buckets, 3] (columns
    CE_SUM, TOKENS, ENTROPY_SUM), identical on every rank. Must be called on every rank; `model` holds this
    rank's chunks (one chunk: virtual pipelines are not supported here).

    Collectives: those of megatron's forward-only schedule per domain (pipeline p2p sends and receives of
    activations; inside the model the TP all-reduces and the loss's MAX and SUM); then, on the last pipeline
    stage, one all-reduce (SUM) of the [datasets * buckets * 3] sums over the DP group, and one broadcast of
    them from the last global rank over the default group.
    """
    if len(model) != 1:
        raise ValueError("bucket evaluation runs one model chunk per rank: use a layout without a virtual pipeline")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    lookup = torch.as_tensor(bucket_of_token, dtype=torch.long, device=device.compute_device())
    all_sums = np.zeros((len(datasets), num_buckets, _NUM_STATS), dtype=np.float64)
    forward_backward = get_forward_backward_func()
    for chunk in model:
        chunk.eval()
    request_entropy(model, True)
    try:
        with torch.no_grad():
            for index, dataset in enumerate(datasets):
                if dataset is None or len(dataset) == 0:
                    continue
                samples = len(dataset) if max_samples is None else min(max_samples, len(dataset))
                collector = BucketSums(lookup, num_buckets)
                iterator = (padded_micro_batches(dataset, samples, micro_batch_size, dp_rank, dp_size)
                            if first or last else None)
                forward_backward(
                    forward_step_func=make_forward_step(collector, pass_labels=True),
                    data_iterator=iterator,
                    model=model,
                    num_microbatches=num_rounds(samples, micro_batch_size, dp_size),
                    seq_length=seq_length,
                    micro_batch_size=micro_batch_size,
                    forward_only=True,
                )
                all_sums[index] = collector.sums.numpy()
    finally:
        for chunk in model:
            chunk.train()
    return _reduce(all_sums, last)


def _reduce(local: np.ndarray, last_stage: bool) -> np.ndarray:
    if not dist.is_initialized():
        return local
    packed = torch.from_numpy(local).to(device.compute_device())
    if last_stage:
        dist.all_reduce(packed, group=parallel_state.get_data_parallel_group())
    # The last global rank sits on the last pipeline stage: after the DP all-reduce it holds the totals.
    dist.broadcast(packed, src=dist.get_world_size() - 1)
    return packed.cpu().numpy()


@dataclass
class BucketStat:
    """Cross-entropy of one group of target tokens: mean loss, its exp, the token count, mean entropy."""

    tokens: int
    loss: float
    perplexity: float
    mean_entropy: float

    @classmethod
    def from_sums(cls, sums: np.ndarray) -> "BucketStat":
        """sums: [3] (ce sum, tokens, entropy sum) -> the statistic (NaN loss for 0 tokens)."""
        tokens = int(round(float(sums[TOKENS])))
        if tokens == 0:
            return cls(0, float("nan"), float("nan"), float("nan"))
        loss = float(sums[CE_SUM]) / tokens
        return cls(tokens, loss, math.exp(loss) if loss < 700 else float("inf"), float(sums[ENTROPY_SUM]) / tokens)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "loss": self.loss, "perplexity": self.perplexity,
                "mean_entropy": self.mean_entropy}


def summarise(sums: np.ndarray, domain_names: List[str], bucket_names: Sequence[str]) -> dict:
    """Per bucket (all domains), per domain (all buckets), per domain and bucket, and overall statistics."""
    return {
        "overall": BucketStat.from_sums(sums.sum(axis=(0, 1))).as_dict(),
        "buckets": {b: BucketStat.from_sums(sums[:, k].sum(axis=0)).as_dict() for k, b in enumerate(bucket_names)},
        "domains": {
            d: {
                **BucketStat.from_sums(sums[i].sum(axis=0)).as_dict(),
                "buckets": {b: BucketStat.from_sums(sums[i, k]).as_dict() for k, b in enumerate(bucket_names)},
            }
            for i, d in enumerate(domain_names)
        },
    }
