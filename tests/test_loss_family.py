"""The loss family around MiLe: label smoothing, z-loss and the dft weighting with every weighting, on both
vocab-parallel paths; megatron-core's cross-entropy API as a drop-in; the statistics at extreme logits.

References: megatron_mile.loss.reference.reference_token_losses (the definitions, float64, full vocabulary),
megatron-core's own vocab_parallel_cross_entropy, and closed forms. Multi-rank cases run on gloo
(tests/conftest.py: dist_pool).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist

from loss_cases import VOCABS, tp_rank_size
from megatron_mile.loss import (
    LossSpec,
    reference_token_losses,
    vocab_parallel_cross_entropy,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_mile.loss.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_mile.vocab import vocab_shard_range

# (loss type, gamma) x (label smoothing, z-loss coefficient): each term alone and both together.
WEIGHTINGS = [("cross_entropy", 1.0), ("focal", 2.0), ("mile", 1.0), ("dft", 1.0)]
TERMS = [(0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)]
FIELDS = ("loss", "ce", "weight", "entropy", "z_loss")


def _specs():
    return [LossSpec(t, g, label_smoothing=ls, z_loss_coeff=zc) for (t, g), (ls, zc) in itertools.product(WEIGHTINGS, TERMS)]


def _reference(logits, target, spec, vocab, ignore_index=-100):
    return reference_token_losses(logits, target, spec.loss_type, spec.gamma, spec.sigma, vocab,
                                  spec.entropy_threshold, ignore_index, spec.label_smoothing, spec.z_loss_coeff)


def _logit_case(seed, vocab, padded, dtype, seq=6, batch=3):
    """Logits [s, b, padded] with a spread of confidences (and logits up to ~+-20, so log Z matters),
    targets [s, b] with two ignored positions, and an upstream gradient [s, b]."""
    gen = torch.Generator().manual_seed(seed)
    temperature = torch.rand(seq, batch, 1, generator=gen) * 8.0
    logits = torch.randn(seq, batch, padded, generator=gen) * temperature + torch.randn(seq, batch, 1, generator=gen) * 4
    target = torch.randint(0, vocab, (seq, batch), generator=gen)
    target[0, 0] = -100
    target[-1, -1] = -100
    upstream = torch.rand(seq, batch, generator=gen) + 0.5
    return logits.to(dtype), target, upstream


# ---------------------------------------------------------------- on given logits, every shard


def check_terms_against_reference(dtype_name: str, reuse: bool) -> int:
    """Worker body: every field and this rank's logit gradient against the definitions, for every
    weighting x term combination, padded vocabularies and ignored tokens."""
    dtype = getattr(torch, dtype_name)
    rank, tp = tp_rank_size()
    checked = 0
    for (vocab, padded), spec, seed in itertools.product(VOCABS, _specs(), (0, 1)):
        logits, target, upstream = _logit_case(seed, vocab, padded, dtype)
        start, end = vocab_shard_range(padded, rank, tp)
        leaf = logits[..., start:end].clone().requires_grad_()
        shard = leaf * 1.0 if reuse else leaf
        out = vocab_parallel_weighted_cross_entropy(shard, target, spec, vocab, compute_entropy=True,
                                                    reuse_logits_for_grad=reuse)
        (upstream * out.weight * out.loss).sum().backward()

        full = logits.float().requires_grad_()
        ref = _reference(full, target, spec, vocab)
        (upstream * ref["weight"] * ref["loss"]).sum().backward()

        where = f"{spec.describe()} {dtype_name} reuse={reuse} tp={tp} rank={rank} vocab={vocab}/{padded} seed={seed}"
        for name in FIELDS:
            got = getattr(out, name)
            expected = ref[name] if name != "z_loss" or spec.z_loss_coeff else torch.empty(0)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {where}: {m}")
        assert out.loss.requires_grad and not any(getattr(out, n).requires_grad for n in FIELDS[1:]), where
        ref_grad = full.grad[..., start:end]
        if dtype == torch.float32:
            torch.testing.assert_close(leaf.grad, ref_grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {where}: {m}")
        else:
            torch.testing.assert_close(leaf.grad.float(), ref_grad.to(dtype).float(), rtol=8e-3, atol=1e-6,
                                       msg=lambda m: f"grad {where}: {m}")
        owned = max(0, min(end, vocab) - start)
        assert torch.count_nonzero(leaf.grad[..., owned:]) == 0, where  # padding takes no part
        checked += 1
    return checked


@pytest.mark.parametrize("dtype_name,reuse", [("float32", False), ("bfloat16", False), ("float32", True)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_smoothing_and_z_loss_match_the_definitions_on_every_shard(dist_pool, tp, dtype_name, reuse):
    if tp == 1:
        counts = [check_terms_against_reference(dtype_name, reuse)]
    else:
        counts = dist_pool(tp).run(check_terms_against_reference, dtype_name, reuse, tensor_model_parallel_size=tp)
    assert all(c == counts[0] and c > 0 for c in counts)


def test_the_terms_change_the_loss_and_not_the_weight():
    """Smoothing and z-loss move the loss (the comparisons above are not vacuous) but the weights come from
    the model's own distribution, and lm loss's ce stays plain."""
    logits, target, _ = _logit_case(3, 64, 64, torch.float32)
    plain = vocab_parallel_weighted_cross_entropy(logits, target, LossSpec("mile"))
    both = vocab_parallel_weighted_cross_entropy(logits, target, LossSpec("mile", label_smoothing=0.2,
                                                                          z_loss_coeff=1e-2))
    kept = target != -100
    assert (both.loss - plain.loss)[kept].abs().min() > 1e-4
    assert torch.equal(both.weight, plain.weight) and torch.equal(both.ce, plain.ce)


# ---------------------------------------------------------------- the fused linear cross-entropy


def check_fused_terms_against_reference() -> int:
    """Worker body: the fused head with smoothing / z-loss: per-token values, the weighted sum and the
    gradients of hidden and this rank's W shard against the definitions on hidden @ W^T."""
    rank, tp = tp_rank_size()
    checked = 0
    upstream = 0.37
    for (vocab, padded), spec, chunk in itertools.product(VOCABS, _specs(), (4, 7, 64)):
        gen = torch.Generator().manual_seed(5)
        hidden = torch.randn(6, 3, 16, generator=gen) * torch.rand(6, 3, 1, generator=gen) * 3
        weight = torch.randn(padded, 16, generator=gen)
        target = torch.randint(0, vocab, (6, 3), generator=gen)
        mask = (torch.rand(6, 3, generator=gen) > 0.3).float()
        start, end = vocab_shard_range(padded, rank, tp)
        h = hidden.clone().requires_grad_()
        w = weight[start:end].clone().requires_grad_()
        out = fused_linear_cross_entropy(h, w, target, mask, spec, vocab, chunk_tokens=chunk, return_entropy=True)
        (out.weighted_loss_sum * upstream).backward()

        full_h, full_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = _reference(full_h @ full_w.t(), target, spec, vocab)
        ref_sum = (ref["weight"] * mask * ref["loss"]).sum()
        (ref_sum * upstream).backward()
        where = f"fused {spec.describe()} tp={tp} rank={rank} vocab={vocab}/{padded} chunk={chunk}"
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.weighted_loss_sum.detach(), ref_sum.detach(), **close, msg=lambda m: f"sum {where}: {m}")
        for name in FIELDS:
            expected = ref[name] if name != "z_loss" or spec.z_loss_coeff else torch.empty(0)
            torch.testing.assert_close(getattr(out, name), expected, **close, msg=lambda m: f"{name} {where}: {m}")
        torch.testing.assert_close(h.grad, full_h.grad, **close, msg=lambda m: f"grad hidden {where}: {m}")
        torch.testing.assert_close(w.grad, full_w.grad[start:end], **close, msg=lambda m: f"grad W {where}: {m}")
        checked += 1
    return checked


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_head_smoothing_and_z_loss_match_the_definitions(dist_pool, tp):
    counts = [check_fused_terms_against_reference()] if tp == 1 else dist_pool(tp).run(
        check_fused_terms_against_reference, tensor_model_parallel_size=tp)
    assert all(c == counts[0] and c > 0 for c in counts)


# ---------------------------------------------------------------- still two collectives, none backward


def count_collectives(spec: LossSpec):
    """Worker body: (name, op, numel) of every all-reduce in forward, and every collective in backward."""
    calls = []
    original = dist.all_reduce

    def record(tensor, op=dist.ReduceOp.SUM, *args, **kwargs):
        calls.append((str(op).split(".")[-1], tensor.numel()))
        return original(tensor, op, *args, **kwargs)

    rank, tp = tp_rank_size()
    logits, target, _ = _logit_case(0, 50, 64, torch.float32)
    start, end = vocab_shard_range(64, rank, tp)
    shard = logits[..., start:end].clone().requires_grad_()
    dist.all_reduce = record
    try:
        out = vocab_parallel_weighted_cross_entropy(shard, target, spec, 50)
        forward = list(calls)
        calls.clear()
        (out.loss * out.weight).sum().backward()
        backward = list(calls)
    finally:
        dist.all_reduce = original
    return forward, backward


@pytest.mark.parametrize("spec, rows", [
    (LossSpec("mile", label_smoothing=0.1, z_loss_coeff=1e-3), 4),  # S, z_t, T, U
    (LossSpec("focal", 2.0, label_smoothing=0.1), 3),  # S, z_t, U
    (LossSpec("dft", z_loss_coeff=1e-3), 2),  # S, z_t: log Z needs nothing more
])
def test_two_collectives_forward_none_backward(dist_pool, spec, rows):
    tokens = 18
    for forward, backward in dist_pool(2).run(count_collectives, spec, tensor_model_parallel_size=2):
        assert forward == [("MAX", tokens), ("SUM", rows * tokens)], forward
        assert backward == []


# ---------------------------------------------------------------- statistics at extreme logits


@pytest.mark.parametrize("loss_type", ["cross_entropy", "focal", "mile", "dft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_infinity_logits_are_entries_of_probability_zero(loss_type, dtype):
    """Masked vocabulary entries (-inf): every statistic equals that of the vocabulary without them."""
    logits, target, upstream = _logit_case(7, 64, 64, torch.float32)
    masked = torch.zeros(64, dtype=torch.bool)
    masked[[3, 17, 40, 41, 63]] = True
    target = torch.where(masked[target.clamp(min=0)] & (target >= 0), torch.zeros_like(target), target)
    leaf = logits.masked_fill(masked, float("-inf")).to(dtype).requires_grad_()
    spec = LossSpec(loss_type, 2.0 if loss_type == "focal" else 1.0)
    out = vocab_parallel_weighted_cross_entropy(leaf, target, spec, compute_entropy=True)
    (upstream * out.weight * out.loss).sum().backward()

    # Reference: the same distribution over the 59 entries that remain.
    keep = (~masked).nonzero().squeeze(1)
    remap = torch.full((64,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    small_target = torch.where(target >= 0, remap[target.clamp(min=0)], target)
    small = logits[..., keep].to(dtype).float().requires_grad_()
    ref = reference_token_losses(small, small_target, loss_type, spec.gamma, spec.sigma)
    (upstream * ref["weight"] * ref["loss"]).sum().backward()
    for name in ("loss", "weight", "entropy"):
        assert torch.isfinite(getattr(out, name)).all(), name
        torch.testing.assert_close(getattr(out, name), ref[name], rtol=1e-5, atol=1e-5)
    grad = leaf.grad.float()
    assert torch.count_nonzero(grad[..., masked]) == 0
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(grad[..., keep], small.grad.to(dtype).float(), **tolerance)


def test_largest_finite_bf16_logits_and_all_equal_logits():
    big = torch.finfo(torch.bfloat16).max
    # One token: the largest finite value, its negative and zeros: p is one-hot at column 0.
    logits = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    logits[..., 0], logits[..., 1] = big, -big
    for loss_type, gamma in (("mile", 1.0), ("focal", 2.0), ("dft", 1.0)):
        out = vocab_parallel_weighted_cross_entropy(logits, torch.tensor([[0]]), LossSpec(loss_type, gamma),
                                                    compute_entropy=True)
        assert out.ce.item() == 0.0 and out.entropy.item() == 0.0, loss_type
        expected = {"mile": 1.0, "focal": 0.0, "dft": 1.0}[loss_type]  # (1 + 0)^1, (1 - 1)^2, p = 1
        assert out.weight.item() == expected, loss_type
        far = vocab_parallel_weighted_cross_entropy(logits, torch.tensor([[1]]), LossSpec(loss_type, gamma))
        assert far.ce.item() == math.inf and torch.isfinite(far.weight).all(), loss_type  # p_target = 0 exactly
    # All-equal logits: the uniform distribution, H = ce = ln V, p_target = 1 / V.
    vocab = 50
    flat = torch.full((2, 3, vocab), 7.25)
    target = torch.randint(0, vocab, (2, 3))
    for spec, weight in ((LossSpec("mile", 1.0, 1.0), 1 + math.log(vocab)), (LossSpec("focal", 2.0), (1 - 1 / vocab) ** 2),
                         (LossSpec("dft"), 1 / vocab)):
        out = vocab_parallel_weighted_cross_entropy(flat, target, spec, compute_entropy=True)
        torch.testing.assert_close(out.ce, torch.full((2, 3), math.log(vocab)))
        torch.testing.assert_close(out.entropy, torch.full((2, 3), math.log(vocab)))
        torch.testing.assert_close(out.weight, torch.full((2, 3), weight))


# ---------------------------------------------------------------- megatron-core's API, as a drop-in


def check_megatron_unit_logic() -> list:
    """Worker body: megatron-core's own unit-test setting, rewritten: every rank's shard holds 0..7 four
    times (32 columns), targets 0, 2, ..., 30 (all on rank 0's shard); the loss is log(sum over the whole
    vocabulary of e^z) - z_target, i.e. log(4 tp sum_k e^k) - (t mod 8), on every rank."""
    _, tp = tp_rank_size()
    logits = torch.arange(0, 8, dtype=torch.float32).repeat(16, 4)  # [16, 32]
    target = torch.arange(0, 32, 2)
    output = vocab_parallel_cross_entropy(logits, target, 0.0)  # megatron-core's positional signature
    assert isinstance(output, torch.Tensor) and output.shape == (16,) and output.dtype == torch.float32
    base = math.log(4 * tp * sum(math.exp(k) for k in range(8)))
    expected = torch.tensor([base - (t % 8) for t in range(0, 32, 2)])
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-5)
    return output.tolist()


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)])
def test_megatron_core_unit_test_logic_passes_against_the_drop_in(dist_pool, tp, pp):
    results = dist_pool(tp * pp).run(check_megatron_unit_logic, tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
    if tp == 4:  # megatron-core's own expected values, rounded as its test rounds them
        megatron_expected = [10.2309, 8.2309, 6.2309, 4.2309] * 4
        assert all(torch.equal(torch.tensor(r).round(), torch.tensor(megatron_expected).round()) for r in results)


def check_label_smoothing_against_megatron_core(smoothing: float) -> dict:
    """Worker body: ours at this TP size against megatron-core's function at TP 1 (the whole vocabulary in
    one shard: what megatron-core computes without its per-shard mean) and against the definitions."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_cross_entropy

    rank, tp = tp_rank_size()
    logits, target, upstream = _logit_case(11, 64, 64, torch.float32)
    target = target.clamp(min=0)  # megatron-core has no ignore index
    start, end = vocab_shard_range(64, rank, tp)
    ours_in = logits[..., start:end].clone().requires_grad_()
    ours = vocab_parallel_cross_entropy(ours_in * 1.0, target, smoothing)
    (upstream * ours).sum().backward()
    ref = reference_token_losses(logits, target, vocab_size=64, label_smoothing=smoothing, ignore_index=None)
    torch.testing.assert_close(ours, ref["loss"], rtol=1e-5, atol=1e-5)
    result = {"ours": ours.detach()}
    if tp == 1:
        theirs_in = logits.clone().requires_grad_()
        theirs = megatron_cross_entropy(theirs_in * 1.0, target, smoothing)
        (upstream * theirs).sum().backward()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-7)
    return result


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_as_megatron_core_computes_it(dist_pool, smoothing):
    # megatron-core's function needs its parallel state: TP 1 runs in a one-process pool too.
    at_tp1 = dist_pool(1).run(check_label_smoothing_against_megatron_core, smoothing)[0]["ours"]
    for tp in (2, 4):
        for result in dist_pool(tp).run(check_label_smoothing_against_megatron_core, smoothing,
                                        tensor_model_parallel_size=tp):
            torch.testing.assert_close(result["ours"], at_tp1, rtol=1e-6, atol=1e-6)  # the same at every TP


def test_drop_in_in_place_behaviour_is_as_documented():
    logits, target, _ = _logit_case(2, 64, 64, torch.float32)
    target = target.clamp(min=0)
    fp32 = logits.clone()
    vocab_parallel_cross_entropy(fp32, target)
    assert not torch.equal(fp32, logits)  # fp32 logits are given up, as megatron-core's are
    bf16 = logits.to(torch.bfloat16)
    kept = bf16.clone()
    vocab_parallel_cross_entropy(bf16, target)
    assert torch.equal(bf16, kept)  # bf16 logits are left as they were
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(logits.clone(), target, 1.0)


def test_a_spec_names_the_parameters_it_uses():
    """What run descriptions and the evaluation report show of a loss (LossSpec.settings)."""
    from megatron_mile.loss import LossSpec

    assert LossSpec("cross_entropy").settings() == {}
    assert LossSpec("mile", gamma=2.0, sigma=0.5, z_loss_coeff=1e-4).settings() == {
        "gamma": 2.0, "sigma": 0.5, "z_loss_coeff": 1e-4}
    assert LossSpec("focal", gamma=1.0, label_smoothing=0.1).settings() == {"gamma": 1.0, "label_smoothing": 0.1}
    assert LossSpec("entropy_selection", selection_fraction=0.6).settings() == {"selection_fraction": 0.6}
