"""Context parallelism's share of the exact MiLe normalisation, on CPU (the CP attention itself needs
Transformer Engine on GPUs, and start-up refuses --context-parallel-size > 1 elsewhere: tests/test_kernels.py).

With CP each rank holds two of the 2 * CP chunks of every sequence (megatron's get_batch_on_this_cp_rank), so
the weight sum W, the token count and every statistic of the step must be summed over the CP group as well as
over the data-parallel ranks; the gradients are summed over both by megatron's DDP, then divided once by that
W. Here two gloo processes form one CP group (CP 2, DP 1) and these reductions are checked against sums taken
by hand over both ranks' tokens.
"""

from __future__ import annotations

import pytest
import torch

# Per CP rank: ce, weight and loss mask of its tokens, and a gradient value of the one parameter.
CE = [torch.tensor([[2.0, 1.0, 3.0, 0.5]]), torch.tensor([[1.5, 4.0, 0.25, 2.0]])]
WEIGHT = [torch.tensor([[1.0, 2.0, 0.5, 1.5]]), torch.tensor([[3.0, 1.0, 2.0, 0.5]])]
MASK = [torch.tensor([[1.0, 1.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0, 1.0]])]
GRAD = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]


def context_parallel_reductions():
    """Worker body (2 ranks): CP 2 x DP 1; the step statistics, the finalized gradient and W of this rank, and
    the CP slices of a batch."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from megatron_mile import parallel
    from megatron_mile.loss import reduce_micro_batch
    from megatron_mile.training.step import LossCollector, _this_context_parallel_rank, step_statistics

    parallel.initialize_model_parallel(context_parallel_size=2)
    assert parallel_state.get_data_parallel_world_size() == 1
    rank = parallel_state.get_context_parallel_rank()
    parts = [reduce_micro_batch(CE[rank], WEIGHT[rank], MASK[rank])]
    stats = step_statistics(parts)

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, context_parallel_size=2,
                               calculate_per_token_loss=True, activation_func=F.gelu, use_cpu_initialization=True)
    module = MegatronModule(config)
    module.weight = torch.nn.Parameter(torch.zeros(4))
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    model.module.weight.main_grad.copy_(GRAD[rank])
    collector = LossCollector()
    collector.parts = parts
    collector.finalize_grads([model], num_tokens=None)

    batch = {"tokens": torch.arange(8).unsqueeze(0), "attention_mask": torch.zeros(1, 1, 8, 8, dtype=torch.bool)}
    sliced = _this_context_parallel_rank(batch)
    return {"weight_sum": stats.weight_sum, "tokens": stats.tokens, "loss": stats.loss, "lm_loss": stats.lm_loss,
            "grad": model.module.weight.main_grad.clone(), "global_weight_sum": collector.global_weight_sum,
            "tokens_slice": sliced["tokens"], "mask_shape": tuple(sliced["attention_mask"].shape)}


def test_weight_sum_statistics_and_gradients_are_reduced_over_the_context_parallel_group(dist_pool):
    ranks = dist_pool(2).run(context_parallel_reductions)
    ce, weight, mask = torch.cat(CE, 1), torch.cat(WEIGHT, 1), torch.cat(MASK, 1)
    weight_sum = float((weight * mask).sum())  # W over both ranks' tokens
    for rank in ranks:
        assert rank["weight_sum"] == pytest.approx(weight_sum) and rank["global_weight_sum"] == pytest.approx(weight_sum)
        assert rank["tokens"] == float(mask.sum())
        assert rank["loss"] == pytest.approx(float((weight * mask * ce).sum()) / weight_sum)
        assert rank["lm_loss"] == pytest.approx(float((mask * ce).sum() / mask.sum()))
        # Gradient sums over the CP ranks, divided once by the global W.
        torch.testing.assert_close(rank["grad"], (GRAD[0] + GRAD[1]) / weight_sum)
    # Each rank keeps chunks (r, 2 * CP - 1 - r) of the 4 chunks of 2 tokens, the mask's query rows with them.
    assert ranks[0]["tokens_slice"].tolist() == [[0, 1, 6, 7]] and ranks[1]["tokens_slice"].tolist() == [[2, 3, 4, 5]]
    assert ranks[0]["mask_shape"] == (1, 1, 4, 8)
