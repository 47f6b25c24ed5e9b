"""The vocab-parallel MiLe / focal / cross-entropy against the plain full-vocabulary reference.

Every case checks ce, weight, entropy AND the gradient of every vocabulary shard, for TP 1, 2 and 4, fp32
and bf16 logits, several gammas, sigmas, seeds, ignored tokens and padded vocabularies. Multi-rank cases
run on gloo in spawned processes (tests/conftest.py: dist_pool).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from loss_cases import VOCABS, loss_specs, tp_rank_size
from megatron_mile.loss import (
    LossSpec,
    all_reduce_step_loss,
    reduce_micro_batch,
    reference_global_loss,
    reference_weighted_cross_entropy,
    vocab_parallel_cross_entropy,
    vocab_parallel_focal,
    vocab_parallel_mile,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_mile.vocab import vocab_shard_range

SEEDS = [0, 1, 2]


def _make_case(seed, vocab, padded, dtype, seq=6, batch=3, ignore_some=True):
    """Logits [s, b, padded] with a spread of confidences, targets [s, b], upstream gradient [s, b]."""
    gen = torch.Generator().manual_seed(seed)
    # A per-token temperature spreads the entropies from near 0 (peaked) to near ln V (flat).
    temperature = torch.rand(seq, batch, 1, generator=gen) * 8.0
    logits = torch.randn(seq, batch, padded, generator=gen) * temperature
    target = torch.randint(0, vocab, (seq, batch), generator=gen)
    if ignore_some:
        target[0, 0] = -100
        target[-1, -1] = -100
    upstream = torch.rand(seq, batch, generator=gen) + 0.5
    return logits.to(dtype), target, upstream


def _loss_settings(loss_type):
    """The LossSpecs worth checking for one loss type (MiLe: two sigmas and two entropy thresholds)."""
    return loss_specs(loss_type, mile_sigmas=(1.0, 0.25), mile_extra=[(1.0, 1.0, 0.5), (2.0, 1.0, 0.9)])


def check_against_reference(loss_type: str, dtype_name: str, reuse_logits_for_grad: bool = False) -> int:
    """Worker body: compare loss, weight, entropy and this rank's gradient shard with the reference.

    With reuse_logits_for_grad the logits are a non-leaf (as the output layer produces them) that the loss
    may overwrite; the gradient is read at the leaf behind it.
    """
    dtype = getattr(torch, dtype_name)
    rank, tp = tp_rank_size()
    checked = 0
    for (vocab, padded), seed, spec in itertools.product(
        VOCABS, SEEDS, _loss_settings(loss_type)
    ):
        logits, target, upstream = _make_case(seed, vocab, padded, dtype)
        start, end = vocab_shard_range(padded, rank, tp)
        leaf = logits[..., start:end].clone()
        untouched = leaf.clone()
        leaf.requires_grad_()
        shard = leaf * 1.0 if reuse_logits_for_grad else leaf
        losses = vocab_parallel_weighted_cross_entropy(
            shard, target, spec, vocab, compute_entropy=True, reuse_logits_for_grad=reuse_logits_for_grad,
        )
        ce, weight, entropy = losses.loss, losses.weight, losses.entropy
        (upstream * weight * ce).sum().backward()

        full = logits.float().requires_grad_()
        ref_ce, ref_weight, ref_entropy = reference_weighted_cross_entropy(
            full, target, spec.loss_type, spec.gamma, spec.sigma, vocab, spec.entropy_threshold
        )
        (upstream * ref_weight * ref_ce).sum().backward()
        ref_grad = full.grad[..., start:end]

        where = (f"{spec.describe()} {dtype_name} tp={tp} rank={rank} vocab={vocab}/{padded} seed={seed} "
                 f"reuse={reuse_logits_for_grad}")
        assert ce.dtype == torch.float32 and weight.dtype == torch.float32, where
        assert not weight.requires_grad and not entropy.requires_grad, where
        torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5, msg=lambda m: f"ce {where}: {m}")
        torch.testing.assert_close(weight, ref_weight, rtol=1e-5, atol=1e-5, msg=lambda m: f"w {where}: {m}")
        torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5, msg=lambda m: f"H {where}: {m}")
        assert leaf.grad.dtype == dtype, where
        if dtype == torch.float32:
            torch.testing.assert_close(leaf.grad, ref_grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {where}: {m}")
        else:
            # Ours rounds an fp32 gradient to bf16 once; so does the reference here.
            torch.testing.assert_close(
                leaf.grad.float(), ref_grad.to(dtype).float(), rtol=8e-3, atol=1e-6,
                msg=lambda m: f"grad {where}: {m}",
            )
        # Padded columns get exactly zero gradient; logits not given up are never modified.
        owned = max(0, min(end, vocab) - start)
        assert torch.count_nonzero(leaf.grad[..., owned:]) == 0, where
        if not (reuse_logits_for_grad and dtype == torch.float32):
            assert torch.equal(shard.detach(), untouched), f"logits were modified: {where}"
        checked += 1
    return checked


@pytest.mark.parametrize("dtype_name,reuse", [("float32", False), ("bfloat16", False), ("float32", True)])
@pytest.mark.parametrize("loss_type", ["cross_entropy", "focal", "mile"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_matches_reference_on_every_shard(dist_pool, tp, loss_type, dtype_name, reuse):
    if tp == 1:
        counts = [check_against_reference(loss_type, dtype_name, reuse)]  # in-process, no torch.distributed
    else:
        counts = dist_pool(tp).run(
            check_against_reference, loss_type, dtype_name, reuse, tensor_model_parallel_size=tp
        )
    assert all(c == counts[0] and c > 0 for c in counts)


def check_against_reference_in_small_chunks(chunk_elements: int) -> int:
    """Worker body: the reference check with scratch buffers of a few rows, so that forward and backward
    walk several chunks and a shorter last one (production chunks hold whole test cases in one)."""
    from megatron_mile.loss import vocab_parallel

    saved = vocab_parallel.CHUNK_ELEMENTS
    vocab_parallel.CHUNK_ELEMENTS = chunk_elements
    try:
        return sum(check_against_reference(loss, dtype, reuse) for loss in ("mile", "focal")
                   for dtype, reuse in (("float32", False), ("bfloat16", False), ("float32", True)))
    finally:
        vocab_parallel.CHUNK_ELEMENTS = saved


@pytest.mark.parametrize("tp", [1, 2])
def test_matches_reference_when_walking_several_chunks(dist_pool, tp):
    # 160 elements: 2-4 rows of 40-64 owned columns at TP 1, 5 rows of 32 at TP 2; 18 tokens per case.
    if tp == 1:
        counts = [check_against_reference_in_small_chunks(160)]
    else:
        counts = dist_pool(tp).run(check_against_reference_in_small_chunks, 160, tensor_model_parallel_size=tp)
    assert all(c == counts[0] and c > 0 for c in counts)


def check_gamma_zero_is_megatron_cross_entropy() -> None:
    """Worker body: gamma = 0 MiLe and focal equal megatron-core's vocab_parallel_cross_entropy."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    rank, tp = tp_rank_size()
    for seed in SEEDS:
        logits, target, upstream = _make_case(seed, 64, 64, torch.float32, ignore_some=False)
        start, end = vocab_shard_range(64, rank, tp)
        theirs_in = logits[..., start:end].clone().requires_grad_()
        # megatron's function writes into an fp32 input: give it its own copy.
        theirs = megatron_ce(theirs_in.clone(), target)
        (upstream * theirs).sum().backward()
        for fn in (vocab_parallel_mile, vocab_parallel_focal):
            ours_in = logits[..., start:end].clone().requires_grad_()
            ce, weight = fn(ours_in, target, gamma=0.0)
            assert torch.all(weight == 1.0)
            (upstream * weight * ce).sum().backward()
            torch.testing.assert_close(ce, theirs, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gamma_zero_reproduces_megatron_core(dist_pool, tp):
    dist_pool(max(tp, 2)).run(check_gamma_zero_is_megatron_cross_entropy, tensor_model_parallel_size=tp)


_COLLECTIVES = [
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "broadcast", "reduce", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "barrier",
]


def count_collectives(loss_type: str, name_groups: bool = False):
    """Worker body: record every torch.distributed collective issued in forward and in backward, as
    (name, op), or with `name_groups` (name, op, "tp" / "dp" / other: the group it ran on)."""
    from megatron.core import parallel_state

    calls = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}
    groups = {id(parallel_state.get_tensor_model_parallel_group()): "tp",
              id(parallel_state.get_data_parallel_group(with_context_parallel=True)): "dp"}

    def recorder(name):
        def record(*args, **kwargs):
            op = kwargs.get("op", args[1] if name == "all_reduce" and len(args) > 1 else None)
            call = (name, str(op).split(".")[-1] if op is not None else "SUM" if name == "all_reduce" else None)
            calls.append(call + (groups.get(id(kwargs.get("group")), "other"),) if name_groups else call)
            return originals[name](*args, **kwargs)

        return record

    rank, tp = tp_rank_size()
    logits, target, _ = _make_case(0, 64, 64, torch.float32)
    shard = logits[..., vocab_shard_range(64, rank, tp)[0] : vocab_shard_range(64, rank, tp)[1]]
    shard = shard.clone().requires_grad_()
    try:
        for name in _COLLECTIVES:
            setattr(dist, name, recorder(name))
        losses = vocab_parallel_weighted_cross_entropy(shard, target, LossSpec(loss_type))
        ce, weight = losses.loss, losses.weight
        forward_calls = list(calls)
        calls.clear()
        (ce * weight).sum().backward()
        backward_calls = list(calls)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return forward_calls, backward_calls


@pytest.mark.parametrize("loss_type", ["cross_entropy", "focal", "mile", "entropy_selection", "ce_selection"])
def test_two_collectives_forward_none_backward(dist_pool, loss_type):
    for forward_calls, backward_calls in dist_pool(2).run(
        count_collectives, loss_type, tensor_model_parallel_size=2
    ):
        assert [name for name, _ in forward_calls] == ["all_reduce", "all_reduce"], forward_calls
        assert "MAX" in forward_calls[0][1], forward_calls
        assert forward_calls[1][1] in ("SUM", "RedOpType.SUM") or "SUM" in forward_calls[1][1], forward_calls
        assert backward_calls == []


@pytest.mark.parametrize("loss_type, selection_calls", [
    ("entropy_selection", [("all_reduce", "SUM", "dp")]),  # the histogram: H lies in [0, log V]
    ("ce_selection", [("all_reduce", "MAX", "dp"), ("all_reduce", "SUM", "dp")]),  # the largest ce, the histogram
])
def test_selection_adds_only_data_parallel_collectives(dist_pool, loss_type, selection_calls):
    """TP 2 x DP 2: the TP group still sees exactly MAX then SUM; the selection's threshold adds its
    collectives on the data-parallel group only; backward issues none."""
    for forward_calls, backward_calls in dist_pool(4).run(count_collectives, loss_type, True,
                                                          tensor_model_parallel_size=2):
        assert forward_calls == [("all_reduce", "MAX", "tp"), ("all_reduce", "SUM", "tp")] + selection_calls
        assert backward_calls == []


def check_split_invariance(loss_type: str, micro_batches: int) -> dict:
    """Worker body: a global batch split over DP ranks and micro-batches gives the full-batch loss/grads."""
    from megatron.core import parallel_state

    rank, tp = tp_rank_size()
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    vocab, padded, seq, global_batch = 50, 64, 5, 8
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(seq, global_batch, padded, generator=gen) * torch.rand(seq, global_batch, 1, generator=gen) * 6
    target = torch.randint(0, vocab, (seq, global_batch), generator=gen)
    loss_mask = (torch.rand(seq, global_batch, generator=gen) > 0.3).float()

    # Reference: the whole global batch in one full-vocabulary computation.
    full = logits.clone().requires_grad_()
    spec = LossSpec(loss_type, 1.5, 1.0)
    ref_ce, ref_w, _ = reference_weighted_cross_entropy(full, target, loss_type, 1.5, 1.0, vocab)
    ref_loss = reference_global_loss(ref_ce, ref_w, loss_mask)
    ref_loss.backward()

    # This rank: its DP slice of sequences, its TP slice of the vocabulary, split into micro-batches.
    start, end = vocab_shard_range(padded, rank, tp)
    per_rank = global_batch // dp
    cols = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    mine = logits[:, cols, start:end].clone().requires_grad_()
    parts = []
    per_micro = per_rank // micro_batches
    for m in range(micro_batches):
        sl = slice(m * per_micro, (m + 1) * per_micro)
        losses = vocab_parallel_weighted_cross_entropy(
            mine[:, sl], target[:, cols][:, sl], spec, vocab, compute_entropy=True
        )
        ce, w, h = losses.loss, losses.weight, losses.entropy
        part = reduce_micro_batch(ce, w, loss_mask[:, cols][:, sl], h)
        part.weighted_loss_sum.backward()  # gradient accumulation of the un-normalised numerators
        parts.append(part)
    step = all_reduce_step_loss(parts, group=parallel_state.get_data_parallel_group())
    grad = mine.grad / step.weight_sum  # the one division by the global weight total

    torch.testing.assert_close(torch.tensor(step.loss), ref_loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, full.grad[:, cols, start:end], rtol=1e-5, atol=1e-8)
    masked_ce = (ref_ce * loss_mask).sum() / loss_mask.sum()
    torch.testing.assert_close(torch.tensor(step.lm_loss), masked_ce.detach(), rtol=1e-6, atol=1e-6)
    selected = ref_w[loss_mask > 0]
    assert abs(step.weight_min - selected.min().item()) < 1e-5
    assert abs(step.weight_max - selected.max().item()) < 1e-5
    return {"loss": step.loss, "weight_sum": step.weight_sum}


@pytest.mark.parametrize("loss_type", ["focal", "mile"])
@pytest.mark.parametrize("tp,micro_batches", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2)])
def test_global_normalisation_is_split_invariant(dist_pool, loss_type, tp, micro_batches):
    results = dist_pool(4).run(check_split_invariance, loss_type, micro_batches, tensor_model_parallel_size=tp)
    assert len({round(r["loss"], 6) for r in results}) == 1


def test_single_process_split_invariance_without_distributed():
    """DP = 1, no torch.distributed at all: micro-batching alone must not change the loss."""
    assert not dist.is_initialized()
    logits = torch.randn(4, 6, 32) * 3
    target = torch.randint(0, 32, (4, 6))
    ce, w = vocab_parallel_mile(logits, target, gamma=1.0)
    whole = all_reduce_step_loss([reduce_micro_batch(ce, w)]).loss
    parts = [reduce_micro_batch(*vocab_parallel_mile(logits[:, i : i + 2], target[:, i : i + 2])) for i in (0, 2, 4)]
    torch.testing.assert_close(torch.tensor(all_reduce_step_loss(parts).loss), torch.tensor(whole))
    torch.testing.assert_close(torch.tensor(whole), reference_global_loss(ce, w))


# ---------------------------------------------------------------- bad input (single process, no dist)


def _inputs(vocab=16):
    # The target holds both ends of the vocabulary, so every out-of-range case below is out of range on
    # every draw (a random target missed the vocab_size=12 case about one run in six).
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, vocab, (3, 2), generator=generator)
    target[0, 0], target[-1, -1] = 0, vocab - 1
    return torch.randn(3, 2, vocab, generator=generator), target


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, t: vocab_parallel_mile(x, t, gamma=-0.5), "gamma"),
        (lambda x, t: vocab_parallel_focal(x, t, gamma=float("nan")), "gamma"),
        (lambda x, t: vocab_parallel_mile(x, t, sigma=0.0), "sigma"),
        (lambda x, t: vocab_parallel_mile(x, t, sigma=-1.0), "sigma"),
        (lambda x, t: vocab_parallel_mile(x, t, entropy_threshold=1.5), "entropy_threshold"),
        (lambda x, t: vocab_parallel_mile(x, t + 16), "target"),
        (lambda x, t: vocab_parallel_mile(x, t - 17), "target"),
        (lambda x, t: vocab_parallel_mile(x, t, vocab_size=12), "target"),
        (lambda x, t: vocab_parallel_cross_entropy(x, t[:2]), "target shape"),
        (lambda x, t: vocab_parallel_cross_entropy(x, t.float()), "target"),
        (lambda x, t: vocab_parallel_weighted_cross_entropy(x, t, vocab_size=17), "vocab_size"),
        (lambda x, t: vocab_parallel_cross_entropy(x.long(), t), "logits"),
        (lambda x, t: vocab_parallel_weighted_cross_entropy(x, t, LossSpec("softmax")), "loss_type"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    logits, target = _inputs()
    with pytest.raises(ValueError, match=match):
        call(logits, target)


def test_tp_size_that_does_not_divide_the_padded_vocabulary():
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3 does not divide"):
        vocab_shard_range(64, 0, 3)


@pytest.mark.parametrize("vocab", [64, 50])
def test_reuse_logits_for_grad_gives_the_same_gradient_in_place(vocab):
    logits, target, upstream = _make_case(3, vocab, 64, torch.float32)
    ref_in = logits.clone().requires_grad_()
    ce, w = vocab_parallel_mile(ref_in, target, gamma=1.0, vocab_size=vocab)
    (upstream * ce * w).sum().backward()

    # A non-leaf, as the output layer produces: its gradient flows to the leaf through an identity op.
    leaf = logits.clone().requires_grad_()
    produced = leaf * 1.0
    storage = produced.data_ptr()
    losses = vocab_parallel_weighted_cross_entropy(
        produced, target, LossSpec("mile", 1.0, 1.0), vocab, reuse_logits_for_grad=True
    )
    ce2, w2 = losses.loss, losses.weight
    grads = {}
    produced.register_hook(lambda g: grads.setdefault("g", g))
    (upstream * ce2 * w2).sum().backward()
    torch.testing.assert_close(ce2, ce)
    torch.testing.assert_close(grads["g"], ref_in.grad, rtol=1e-6, atol=1e-8)
    assert grads["g"].data_ptr() == storage, "the gradient should live in the logits' storage"


def test_reuse_logits_for_grad_leaves_non_contiguous_logits_intact_until_backward():
    # exp(z - m) can only be kept in the logits' own storage when reshape() gives a view of it; a
    # transposed [b, s, v] -> [s, b, v] tensor is not one, so forward must leave it alone and backward
    # recompute the softmax.
    logits, target, upstream = _make_case(4, 50, 64, torch.float32)
    ref_in = logits.clone().requires_grad_()
    ce, w = vocab_parallel_mile(ref_in, target, gamma=1.0, vocab_size=50)
    (upstream * ce * w).sum().backward()

    leaf = logits.transpose(0, 1).contiguous().requires_grad_()  # [b, s, v]
    produced = leaf.transpose(0, 1) * 1.0  # [s, b, v], strides of the transposed tensor
    assert not produced.is_contiguous()
    before = produced.detach().clone()
    losses = vocab_parallel_weighted_cross_entropy(produced, target, LossSpec("mile", 1.0, 1.0), 50,
                                                  reuse_logits_for_grad=True)
    ce2, w2 = losses.loss, losses.weight
    assert torch.equal(produced.detach(), before), "forward modified logits it cannot keep exp(z - m) in"
    (upstream * ce2 * w2).sum().backward()
    torch.testing.assert_close(ce2, ce)
    torch.testing.assert_close(leaf.grad.transpose(0, 1), ref_in.grad, rtol=1e-6, atol=1e-8)
