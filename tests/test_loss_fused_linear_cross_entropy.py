"""The fused LM head + loss against the unfused path and the full-vocabulary reference.

Unfused path: hidden -> copy_to_tensor_model_parallel_region (what megatron's ColumnParallelLinear does to its
replicated input) -> hidden @ W_shard^T -> vocab_parallel_weighted_cross_entropy -> sum(mask * w * ce).
Reference: the full vocabulary in one process (reference_weighted_cross_entropy on hidden @ W_full^T).
Every case compares the loss, per-token ce / weight / entropy and the gradients w.r.t. hidden and this
rank's W shard, at TP 1, 2 and 4 (gloo, tests/conftest.py: dist_pool), for the three loss types, several
gammas, padded vocabularies, loss masks with zeros and chunk sizes that do and do not divide the tokens.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from loss_cases import VOCABS, loss_specs, tp_rank_size
from megatron_mile.loss import (
    LossSpec,
    MicroBatchLoss,
    reduce_micro_batch,
    reference_weighted_cross_entropy,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_mile.loss.fused_linear_cross_entropy import (
    DEFAULT_CHUNK_BYTES,
    chunk_tokens_for_budget,
    fused_linear_cross_entropy,
    grad_group_chunks,
)
from megatron_mile.vocab import vocab_shard_range

SEQ, BATCH, HIDDEN = 6, 3, 16  # 18 tokens
# 1 and 18 are the extremes; 4 and 7 leave a short last chunk; 6 divides; 64 exceeds the token count.
CHUNKS = [1, 4, 6, 7, 18, 64]
UPSTREAM = 0.37  # the scalar backward multiplies by (e.g. 1 / sum(w)); not 1, so a missing scale shows


def _make_case(seed, vocab, padded, dtype, ignore_some=False):
    """hidden [s, b, h], full weight [padded, h], target [s, b], loss_mask [s, b] with zeros.

    A per-token scale of the hidden state spreads the entropies from near 0 (peaked) to near ln V (flat).
    Identical on every rank (same seed), as replicated activations are.
    """
    gen = torch.Generator().manual_seed(seed)
    temperature = torch.rand(SEQ, BATCH, 1, generator=gen) * 3.0
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen) * temperature
    weight = torch.randn(padded, HIDDEN, generator=gen)
    target = torch.randint(0, vocab, (SEQ, BATCH), generator=gen)
    loss_mask = (torch.rand(SEQ, BATCH, generator=gen) > 0.3).float()
    loss_mask[0, 0] = 0.0
    if ignore_some:
        target[1, 1] = -100
        target[-1, 0] = -100
    return hidden.to(dtype), weight.to(dtype), target, loss_mask


def _loss_settings(loss_type):
    """The LossSpecs worth checking for one loss type (MiLe: sigma 0.25 and one entropy threshold too)."""
    return loss_specs(loss_type, mile_extra=[(1.0, 0.25, None), (1.0, 1.0, 0.5)])


def _unfused(hidden, weight_shard, target, loss_mask, spec, vocab, ignore_index=-100):
    """The path the fused one replaces: ColumnParallelLinear's matmul, then the vocab-parallel loss."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    _, tp = tp_rank_size()
    h = hidden.detach().clone().requires_grad_()
    w = weight_shard.detach().clone().requires_grad_()
    replicated = copy_to_tensor_model_parallel_region(h) if tp > 1 else h  # backward: all-reduce SUM
    logits = torch.matmul(replicated, w.t())  # [s, b, v/tp]
    losses = vocab_parallel_weighted_cross_entropy(
        logits, target, spec, vocab, ignore_index, compute_entropy=True
    )
    ce, weight, entropy = losses.loss, losses.weight, losses.entropy
    total = (weight * loss_mask * ce).sum()
    (total * UPSTREAM).backward()
    return total.detach(), ce.detach(), weight, entropy, h.grad, w.grad


def _fused(hidden, weight_shard, target, loss_mask, spec, vocab, chunk, **kwargs):
    h = hidden.detach().clone().requires_grad_()
    w = weight_shard.detach().clone().requires_grad_()
    out = fused_linear_cross_entropy(
        h, w, target, loss_mask, spec, vocab, chunk_tokens=chunk, return_entropy=True, **kwargs,
    )
    (out.weighted_loss_sum * UPSTREAM).backward()
    return out, h.grad, w.grad


def check_fp32(loss_type: str) -> int:
    """Worker body: fp32 fused == unfused == reference within 1e-5 for every setting and chunk size."""
    rank, tp = tp_rank_size()
    checked = 0
    for (vocab, padded), spec, seed in itertools.product(VOCABS, _loss_settings(loss_type), (0, 1)):
        hidden, weight, target, loss_mask = _make_case(seed, vocab, padded, torch.float32, ignore_some=seed == 1)
        start, end = vocab_shard_range(padded, rank, tp)
        shard = weight[start:end]
        settings = (spec, vocab)
        u_loss, u_ce, u_w, u_h, u_gh, u_gw = _unfused(hidden, shard, target, loss_mask, *settings)

        full_h = hidden.clone().requires_grad_()
        full_w = weight.clone().requires_grad_()
        r_ce, r_w, r_h = reference_weighted_cross_entropy(
            full_h @ full_w.t(), target, spec.loss_type, spec.gamma, spec.sigma, vocab, spec.entropy_threshold
        )
        r_loss = (r_w * loss_mask * r_ce).sum()
        (r_loss * UPSTREAM).backward()

        for chunk in CHUNKS:
            out, f_gh, f_gw = _fused(hidden, shard, target, loss_mask, *settings, chunk)
            where = f"{spec.describe()} tp={tp} rank={rank} vocab={vocab}/{padded} chunk={chunk} seed={seed}"
            close = dict(rtol=1e-5, atol=1e-5)
            for name, got, unfused, ref in [
                ("loss", out.weighted_loss_sum.detach(), u_loss, r_loss.detach()),
                ("ce", out.ce, u_ce, r_ce.detach()),
                ("weight", out.weight, u_w, r_w),
                ("entropy", out.entropy, u_h, r_h),
                ("grad hidden", f_gh, u_gh, full_h.grad),
                ("grad W", f_gw, u_gw, full_w.grad[start:end]),
            ]:
                torch.testing.assert_close(got, unfused, **close, msg=lambda m: f"{name} vs unfused, {where}: {m}")
                torch.testing.assert_close(got, ref, **close, msg=lambda m: f"{name} vs reference, {where}: {m}")
            assert out.weighted_loss_sum.dtype == torch.float32 and out.weighted_loss_sum.dim() == 0, where
            assert not out.ce.requires_grad and not out.weight.requires_grad, where
            assert f_gh.dtype == f_gw.dtype == torch.float32, where
            # Padded rows of W take no part: exactly zero gradient.
            owned = max(0, min(end, vocab) - start)
            assert torch.count_nonzero(f_gw[owned:]) == 0, where
            checked += 1
    return checked


def check_bf16(loss_type: str) -> int:
    """Worker body: bf16 hidden / weight, fused against the unfused bf16 path and the fp32 reference.

    Both paths round the logits and the logit gradient to bf16 (8 significant bits). Tolerances:
    per-token values and the loss to 1e-4 relative (the fp32 loss arithmetic on the same bf16 logits; the
    only difference is which kernel rounds each logit); gradients to 2 bf16 ulps (2^-7 relative) of the
    largest entry, since the unfused path also rounds its TP all-reduce and its grad_W matmul to bf16,
    where the fused one sums per-chunk bf16 products in fp32.
    """
    rank, tp = tp_rank_size()
    checked = 0
    for (vocab, padded), spec in itertools.product(VOCABS, _loss_settings(loss_type)):
        hidden, weight, target, loss_mask = _make_case(3, vocab, padded, torch.bfloat16)
        start, end = vocab_shard_range(padded, rank, tp)
        shard = weight[start:end]
        settings = (spec, vocab)
        u_loss, u_ce, u_w, u_h, u_gh, u_gw = _unfused(hidden, shard, target, loss_mask, *settings)
        for chunk in (4, 7, 64):
            out, f_gh, f_gw = _fused(hidden, shard, target, loss_mask, *settings, chunk)
            where = f"bf16 {spec.describe()} tp={tp} rank={rank} vocab={vocab}/{padded} chunk={chunk}"
            assert f_gh.dtype == f_gw.dtype == torch.bfloat16, where
            torch.testing.assert_close(out.weighted_loss_sum.detach(), u_loss, rtol=1e-4, atol=1e-4, msg=lambda m: f"loss {where}: {m}")
            for name, got, want in [("ce", out.ce, u_ce), ("weight", out.weight, u_w), ("entropy", out.entropy, u_h)]:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} {where}: {m}")
            for name, got, want in [("grad hidden", f_gh, u_gh), ("grad W", f_gw, u_gw)]:
                scale = want.float().abs().max().item()
                torch.testing.assert_close(
                    got.float(), want.float(), rtol=2 ** -7, atol=2 * 2 ** -8 * scale,
                    msg=lambda m: f"{name} {where}: {m}",
                )
            checked += 1
    return checked


@pytest.mark.parametrize("loss_type", ["cross_entropy", "focal", "mile"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fp32_matches_unfused_and_reference(dist_pool, tp, loss_type):
    counts = [check_fp32(loss_type)] if tp == 1 else dist_pool(tp).run(check_fp32, loss_type, tensor_model_parallel_size=tp)
    assert all(c == counts[0] and c > 0 for c in counts)


@pytest.mark.parametrize("loss_type", ["cross_entropy", "focal", "mile"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bf16_matches_unfused_bf16(dist_pool, tp, loss_type):
    counts = [check_bf16(loss_type)] if tp == 1 else dist_pool(tp).run(check_bf16, loss_type, tensor_model_parallel_size=tp)
    assert all(c == counts[0] and c > 0 for c in counts)


# ---------------------------------------------------------------- collectives


def count_collectives(chunk: int, reduce_grad_hidden: bool, grad: bool):
    """Worker body: the collectives of one fused call, forward and backward, as (name, op, numel)."""
    calls = []
    original = dist.all_reduce
    others = ["all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "barrier"]
    saved = {name: getattr(dist, name) for name in others}

    def record_all_reduce(tensor, op=dist.ReduceOp.SUM, *args, **kwargs):
        calls.append(("all_reduce", str(op).split(".")[-1], tensor.numel()))
        return original(tensor, op, *args, **kwargs)

    def record_other(name):
        def record(*args, **kwargs):
            calls.append((name, None, None))
            return saved[name](*args, **kwargs)

        return record

    rank, tp = tp_rank_size()
    hidden, weight, target, loss_mask = _make_case(0, 50, 64, torch.float32)
    start, end = vocab_shard_range(64, rank, tp)
    h = hidden.clone().requires_grad_(grad)
    w = weight[start:end].clone().requires_grad_(grad)
    try:
        dist.all_reduce = record_all_reduce
        for name in others:
            setattr(dist, name, record_other(name))
        out = fused_linear_cross_entropy(h, w, target, loss_mask, LossSpec("mile", 1.0), vocab_size=50,
                                         chunk_tokens=chunk, reduce_grad_hidden=reduce_grad_hidden)
        forward_calls = list(calls)
        calls.clear()
        if grad:
            out.weighted_loss_sum.backward()
        backward_calls = list(calls)
    finally:
        dist.all_reduce = original
        for name, fn in saved.items():
            setattr(dist, name, fn)
    return forward_calls, backward_calls


@pytest.mark.parametrize("chunk", [4, 6, 18, 100])
def test_two_collectives_per_chunk_and_one_in_backward(dist_pool, chunk):
    tokens = SEQ * BATCH
    chunks = -(-tokens // chunk)
    for forward_calls, backward_calls in dist_pool(2).run(count_collectives, chunk, True, True, tensor_model_parallel_size=2):
        assert len(forward_calls) == 2 * chunks, forward_calls
        sizes = [min(chunk, tokens - i * chunk) for i in range(chunks)]
        expected = []
        for n in sizes:
            expected += [("all_reduce", "MAX", n), ("all_reduce", "SUM", 3 * n)]  # MiLe: [3, c] packed
        assert forward_calls == expected, forward_calls
        assert backward_calls == [("all_reduce", "SUM", tokens * HIDDEN)], backward_calls


def test_no_grad_hidden_reduction_when_the_caller_does_it(dist_pool):
    for forward_calls, backward_calls in dist_pool(2).run(count_collectives, 7, False, True, tensor_model_parallel_size=2):
        assert len(forward_calls) == 2 * 3
        assert backward_calls == []


def test_no_collectives_at_tp1_and_none_in_backward_without_grad(dist_pool):
    assert count_collectives(4, True, True) == ([], [])  # in-process, no torch.distributed
    for forward_calls, backward_calls in dist_pool(2).run(count_collectives, 4, True, False, tensor_model_parallel_size=2):
        assert len(forward_calls) == 2 * 5 and backward_calls == []


def check_caller_reduces_grad_hidden() -> None:
    """Worker body: hidden routed through copy_to_tensor_model_parallel_region + reduce_grad_hidden=False."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    rank, tp = tp_rank_size()
    hidden, weight, target, loss_mask = _make_case(2, 50, 64, torch.float32)
    start, end = vocab_shard_range(64, rank, tp)
    _, _, _, _, u_gh, u_gw = _unfused(hidden, weight[start:end], target, loss_mask, LossSpec("mile", 1.0, 1.0), 50)
    h = hidden.clone().requires_grad_()
    w = weight[start:end].clone().requires_grad_()
    out = fused_linear_cross_entropy(copy_to_tensor_model_parallel_region(h), w, target, loss_mask,
                                     LossSpec("mile", 1.0), vocab_size=50, chunk_tokens=5, reduce_grad_hidden=False)
    (out.weighted_loss_sum * UPSTREAM).backward()
    torch.testing.assert_close(h.grad, u_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, u_gw, rtol=1e-5, atol=1e-5)


def test_caller_side_grad_hidden_reduction_gives_the_same_gradients(dist_pool):
    dist_pool(2).run(check_caller_reduces_grad_hidden, tensor_model_parallel_size=2)


# ---------------------------------------------------------------- memory and work (single process)


class _Recorder(TorchDispatchMode):
    """Records the largest tensor any op produces and how many matmuls run."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            self.matmuls += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_never_materialises_the_logits(dtype, monkeypatch):
    seq, batch, hidden_size, vocab = 64, 4, 8, 512
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(seq, batch, hidden_size, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(vocab, hidden_size, generator=gen).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (seq, batch), generator=gen)
    chunk = 16
    monkeypatch.setattr("megatron_mile.loss.fused_linear_cross_entropy.GRAD_GROUP_TOKENS", 4 * chunk)  # groups of 4 chunks
    with _Recorder() as rec:
        out = fused_linear_cross_entropy(h, w, target, spec=LossSpec("mile"), chunk_tokens=chunk)
        out.weighted_loss_sum.backward()
    tokens = seq * batch
    # Largest tensors: the [chunk, V] scratch blocks (bf16: the [group * chunk, V] staging) and the
    # [V, h] / [N, h] accumulators, never [N, V].
    staged_rows = chunk if dtype == torch.float32 else 4 * chunk
    assert staged_rows < tokens
    assert rec.largest <= max(staged_rows * vocab, vocab * hidden_size, tokens * hidden_size), rec.largest
    assert rec.largest < tokens * vocab
    chunks = tokens // chunk
    # fp32: logits, grad_hidden, grad_W per chunk. bf16: the two gradient matmuls run once per group of
    # grad_group_chunks(chunk) chunks. None in backward.
    group = 1 if dtype == torch.float32 else grad_group_chunks(chunk)
    groups = -(-chunks // group)
    assert group in (1, 4) and rec.matmuls == chunks + 2 * groups, rec.matmuls
    # The unfused path does hold one: the recorder sees it.
    with _Recorder() as rec_unfused:
        losses = vocab_parallel_weighted_cross_entropy(h @ w.t(), target, LossSpec("mile"))
        ce, wt = losses.loss, losses.weight
        (ce * wt).sum().backward()
    assert rec_unfused.largest >= tokens * vocab


@pytest.mark.parametrize("frozen", ["none", "weight", "both"])
def test_gradients_only_for_what_needs_them(frozen):
    hidden, weight, target, loss_mask = _make_case(4, 50, 64, torch.float32)
    h = hidden.clone().requires_grad_(frozen != "both")
    w = weight.clone().requires_grad_(frozen == "none")
    grads_wanted = {"none": 1, "weight": 1, "both": 0}[frozen]
    with _Recorder() as rec:
        out = fused_linear_cross_entropy(h, w, target, loss_mask, LossSpec("focal", 2.0), vocab_size=50, chunk_tokens=6)
    chunks = 3
    # Per chunk: the projection, plus one matmul for each gradient that is needed.
    assert rec.matmuls == chunks * {"none": 3, "weight": 2, "both": 1}[frozen], rec.matmuls
    assert out.weighted_loss_sum.requires_grad == bool(grads_wanted)
    with torch.no_grad(), _Recorder() as rec_eval:
        evaluated = fused_linear_cross_entropy(h, w, target, loss_mask, LossSpec("focal", 2.0), vocab_size=50,
                                               chunk_tokens=6)
    assert rec_eval.matmuls == chunks  # evaluation: the projection only
    assert not evaluated.weighted_loss_sum.requires_grad
    torch.testing.assert_close(evaluated.weighted_loss_sum, out.weighted_loss_sum.detach(), rtol=0, atol=0)
    if frozen == "weight":
        out.weighted_loss_sum.backward()
        assert w.grad is None and h.grad is not None


def fused_micro_batch_loss(hidden, weight, target, loss_mask, **kwargs) -> MicroBatchLoss:
    """fused_linear_cross_entropy reduced to a MicroBatchLoss: the fused sum with its gradient, and the
    detached statistics reduce_micro_batch gives for the fused call's own per-token values."""
    out = fused_linear_cross_entropy(hidden, weight, target, loss_mask, **kwargs)
    entropy = out.entropy if out.entropy.numel() else None
    part = reduce_micro_batch(out.ce, out.weight, loss_mask, entropy)
    return MicroBatchLoss(out.weighted_loss_sum, part.sums, part.weight_min, part.weight_max)


def test_micro_batch_loss_equals_reduce_micro_batch_of_the_unfused_path():
    hidden, weight, target, loss_mask = _make_case(5, 50, 64, torch.float32)
    for loss_type in ("cross_entropy", "focal", "mile"):
        spec = LossSpec(loss_type, 1.0)
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        part = fused_micro_batch_loss(h, w, target, loss_mask, spec=spec, vocab_size=50, chunk_tokens=5,
                                      return_entropy=True)
        part.weighted_loss_sum.backward()
        h2 = hidden.clone().requires_grad_()
        w2 = weight.clone().requires_grad_()
        losses = vocab_parallel_weighted_cross_entropy(h2 @ w2.t(), target, spec, vocab_size=50, compute_entropy=True)
        ce, wt, ent = losses.loss, losses.weight, losses.entropy
        ref = reduce_micro_batch(ce, wt, loss_mask, ent)
        ref.weighted_loss_sum.backward()
        torch.testing.assert_close(part.weighted_loss_sum.detach(), ref.weighted_loss_sum.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(part.sums, ref.sums, rtol=1e-6, atol=1e-6)
        assert part.sums[4] > 0  # the entropy was computed and summed
        torch.testing.assert_close(part.weight_min, ref.weight_min)
        torch.testing.assert_close(part.weight_max, ref.weight_max)
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_bf16_gradient_groups_cover_about_grad_group_tokens():
    assert grad_group_chunks(262) == 4 and grad_group_chunks(524) == 2 and grad_group_chunks(5000) == 1


def test_default_chunk_follows_the_memory_budget():
    assert chunk_tokens_for_budget(32000) == DEFAULT_CHUNK_BYTES // (4 * 32000) == 262
    assert chunk_tokens_for_budget(16000, 64 << 20) == 1048
    assert chunk_tokens_for_budget(10**9) == 1  # never zero
    hidden, weight, target, _ = _make_case(6, 64, 64, torch.float32)
    # A budget of exactly 5 rows gives the same results as chunk_tokens=5.
    a = fused_linear_cross_entropy(hidden, weight, target, spec=LossSpec("mile"), chunk_bytes=5 * 4 * 64)
    b = fused_linear_cross_entropy(hidden, weight, target, spec=LossSpec("mile"), chunk_tokens=5)
    torch.testing.assert_close(a.ce, b.ce, rtol=0, atol=0)


def test_a_second_backward_raises_instead_of_reusing_consumed_gradients():
    hidden, weight, target, loss_mask = _make_case(7, 64, 64, torch.float32)
    h = hidden.clone().requires_grad_()
    out = fused_linear_cross_entropy(h, weight, target, loss_mask, LossSpec("mile"), chunk_tokens=4)
    (out.weighted_loss_sum * 2.0).backward(retain_graph=True)
    first = h.grad.clone()
    h2 = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h2, weight, target, loss_mask, LossSpec("mile"), chunk_tokens=4).weighted_loss_sum.backward()
    torch.testing.assert_close(first, 2.0 * h2.grad)
    with pytest.raises(RuntimeError, match="consumed by the first backward"):
        out.weighted_loss_sum.backward()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(weight=torch.randn(64, 8)), "weight must be"),
        (dict(weight=torch.randn(64, 16, dtype=torch.bfloat16)), "same dtype"),
        (dict(target=torch.randint(0, 64, (3, 3))), "target shape"),
        (dict(target=torch.full((SEQ, BATCH), 64)), "outside the vocabulary"),
        (dict(loss_mask=torch.ones(3, 3)), "loss_mask shape"),
        (dict(vocab_size=65), "vocab_size"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(loss_type="softmax"), "loss_type"),
        (dict(gamma=-1.0), "gamma"),
    ],
)
def test_bad_input_raises_value_error(change, match):
    hidden, weight, target, loss_mask = _make_case(0, 64, 64, torch.float32)
    kwargs = dict(hidden=hidden, weight=weight, target=target, loss_mask=loss_mask, loss_type="mile")
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        spec = LossSpec(kwargs.pop("loss_type"), kwargs.pop("gamma", 1.0))
        fused_linear_cross_entropy(spec=spec, **kwargs)
