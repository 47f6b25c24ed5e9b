"""megatron_mile.model.fused_output_layer: the fused LM head inside the model (--fused-lm-head).

The training tests (tests/test_training.py) show that a run with the fused head reproduces the unfused one
at TP 1/2 and PP 2 for every loss. Here: the sequence-parallel path (all-gather of the sequence shards,
whose backward reduce-scatters instead of the head's own all-reduce) against a full-vocabulary fp32
reference on one process, which training on CPU cannot reach (megatron's local RMSNorm refuses sequence
parallelism); and the gradient bridge, which must refuse a loss it did not compute gradients for.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_mile.arguments import parse_args
from megatron_mile.loss import reference_weighted_cross_entropy
from tiny_model import LOSS_FLAGS, TINY_LLAMA, build_tiny_model

GAMMAS = {"cross_entropy": 0.0, "focal": 2.0, "mile": 1.0}


def fused_head_vs_full_vocabulary(loss_type: str, sequence_parallel: bool) -> dict:
    """Worker body (TP ranks): fused_language_model_loss on this rank's shards vs the plain fp32 loss of
    full logits = hidden @ W^T; returns the largest differences of values and gradients."""
    from megatron.core import parallel_state

    from megatron_mile.loss import LossSpec
    from megatron_mile.model.fused_output_layer import fused_language_model_loss
    from megatron_mile.model import CE, ENTROPY, LOSS, WEIGHT

    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    s, b, h, vocab, padded = 8, 3, 16, 50, 64  # padding: the last shard holds 14 unused rows at TP 2
    gen = torch.Generator().manual_seed(11)  # the same full tensors on every rank
    hidden = torch.randn(s, b, h, generator=gen)
    weight = torch.randn(padded, h, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    loss_mask = (torch.rand(b, s, generator=gen) > 0.25).float()

    rows = padded // tp
    weight_shard = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()  # [V/tp, h]
    if sequence_parallel:
        hidden_in = hidden[rank * s // tp:(rank + 1) * s // tp].clone().requires_grad_()  # [s/tp, b, h]
    else:
        hidden_in = hidden.clone().requires_grad_()  # [s, b, h], replicated
    model = SimpleNamespace(
        pg_collection=SimpleNamespace(tp=parallel_state.get_tensor_model_parallel_group()),
        config=SimpleNamespace(sequence_parallel=sequence_parallel),
        share_embeddings_and_output_weights=False,
        output_layer=SimpleNamespace(weight=weight_shard),
        entropy_requested=True, loss_spec=LossSpec(loss_type, GAMMAS[loss_type], 1.0), real_vocab_size=vocab,
    )
    packed = fused_language_model_loss(model, hidden_in, labels, loss_mask)  # [b, s, 5]
    (packed[..., WEIGHT] * loss_mask * packed[..., LOSS]).sum().backward()  # as LossCollector.loss_func

    full_hidden = hidden.clone().requires_grad_()
    full_weight = weight.clone().requires_grad_()
    logits = full_hidden @ full_weight.t()  # [s, b, V]
    ce, w, entropy = reference_weighted_cross_entropy(logits, labels.t(), loss_type, GAMMAS[loss_type], 1.0, vocab)
    (w * loss_mask.t() * ce).sum().backward()
    expected_hidden_grad = full_hidden.grad[rank * s // tp:(rank + 1) * s // tp] if sequence_parallel else full_hidden.grad
    out = packed.detach().transpose(0, 1)  # [s, b, 5]
    return {
        "values": max((out[..., CE] - ce).abs().max().item(), (out[..., WEIGHT] - w).abs().max().item(),
                      (out[..., ENTROPY] - entropy).abs().max().item()),
        "grad_hidden": (hidden_in.grad - expected_hidden_grad).abs().max().item(),
        "grad_weight": (weight_shard.grad - full_weight.grad[rank * rows:(rank + 1) * rows]).abs().max().item(),
        "grad_scale": full_weight.grad.abs().max().item(),
    }


@pytest.mark.parametrize("loss_type", list(GAMMAS))
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["replicated", "sequence_parallel"])
def test_fused_head_matches_full_vocabulary_reference_at_tp2(dist_pool, loss_type, sequence_parallel):
    results = dist_pool(2).run(fused_head_vs_full_vocabulary, loss_type, sequence_parallel,
                               tensor_model_parallel_size=2)
    for rank, r in enumerate(results):
        assert r["grad_scale"] > 1e-2, r  # the comparison is not vacuous
        assert r["values"] < 1e-5 and r["grad_hidden"] < 1e-5 and r["grad_weight"] < 1e-5, (rank, r)


def fused_head_backward_outcomes():
    """Worker body: backpropagate the fused head's packed output through several losses; report which
    raise (the fused head computed its gradients in forward for sum(loss_mask * w * l) only)."""
    import torch

    from megatron_mile.model import LOSS, WEIGHT

    config = parse_args(TINY_LLAMA + LOSS_FLAGS["mile"] + ["--fused-lm-head"], world_size=1)
    (model,) = build_tiny_model(config, 300)  # seeded with TINY_LLAMA's --seed 7
    tokens = torch.randint(0, 300, (2, 32))
    positions = torch.arange(32).expand(2, -1)
    mask = (torch.arange(32) % 3 != 0).float().expand(2, -1)
    losses = {
        "weighted": lambda out: (out[..., WEIGHT] * mask * out[..., LOSS]).sum(),
        "unweighted": lambda out: (mask * out[..., LOSS]).sum(),
        "other_mask": lambda out: (out[..., WEIGHT] * out[..., LOSS]).sum(),
    }
    outcomes = {}
    for name, loss in losses.items():
        model.zero_grad()
        out = model(tokens, positions, None, labels=tokens, loss_mask=mask)
        try:
            loss(out).backward()
            outcomes[name] = "ok" if model.output_layer.weight.grad is not None else "no gradient"
        except RuntimeError as error:
            outcomes[name] = str(error)
    return outcomes


def test_fused_lm_head_refuses_a_loss_it_did_not_compute_gradients_for(dist_pool):
    outcomes = dist_pool(1).run(fused_head_backward_outcomes)[0]
    assert outcomes["weighted"] == "ok"
    for name in ("unweighted", "other_mask"):
        assert "not proportional to loss_mask * w" in outcomes[name] and "drop --fused-lm-head" in outcomes[name]
