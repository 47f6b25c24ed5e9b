"""Token selection (entropy_selection, ce_selection) against the exact top share, found by sorting.

The reference (megatron_mile.loss.reference: reference_token_losses, reference_top_fraction) works on the
full vocabulary and on the whole micro-batch (every data-parallel rank's tokens) in float64. The logits are
built so that every token's entropy or cross-entropy is a chosen value: the exact answer is then known and
unambiguous (neighbouring scores many histogram bins apart), except where a case places two scores in one
bin on purpose (the documented accuracy: the threshold bin is kept whole). Tokens outside the loss mask and
ignored targets get the highest scores, so counting them would change the selection. Multi-rank cases run
on gloo (tests/conftest.py: dist_pool); the last tests train a few steps through the real training step.
"""

from __future__ import annotations

import math

import pytest
import torch

from loss_cases import VOCABS
from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from megatron_mile.loss import LossSpec, reference_token_losses, vocab_parallel_weighted_cross_entropy
from megatron_mile.loss.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_mile.loss.reference import reference_top_fraction
from megatron_mile.loss.selection import SELECTION_BINS
from megatron_mile.vocab import vocab_shard_range
from tiny_model import TINY_LLAMA

SELECTIONS = ("entropy_selection", "ce_selection")
SEQ, BATCH = 6, 4
FRACTIONS = (0.25, 0.5, 0.6, 1.0)


# ---------------------------------------------------------------- logits with chosen scores


def _entropy_of_peak(a: float, vocab: int) -> float:
    """Entropy of softmax of a row with one logit a and vocab - 1 zeros."""
    p = math.exp(a) / (math.exp(a) + vocab - 1)
    rest = (1.0 - p) / (vocab - 1)
    return -p * math.log(p) - (vocab - 1) * rest * math.log(rest)


def _peak_for_entropy(entropy: float, vocab: int) -> float:
    """The peak a >= 0 whose row has this entropy (it falls from ln V at a = 0), by bisection."""
    low, high = 0.0, 60.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _entropy_of_peak(mid, vocab) > entropy else (low, mid)
    return (low + high) / 2


def _peak_for_ce(ce: float, vocab: int) -> float:
    """The logit a of the target, the other vocab - 1 logits 0, for which -log p_target = ce."""
    return math.log(vocab - 1) - math.log(math.expm1(ce))


def _logits_with_scores(loss_type, scores, tie_of, vocab, padded, seed, noise):
    """Logits [N, padded] float64 and targets [N] whose entropy (entropy_selection) or cross-entropy
    (ce_selection) is about scores[i]; tokens with the same tie_of[i] get the identical row and target."""
    gen = torch.Generator().manual_seed(seed)
    rows, targets = {}, {}
    logits = torch.empty(len(scores), padded, dtype=torch.float64)
    target = torch.empty(len(scores), dtype=torch.long)
    for i, (score, tie) in enumerate(zip(scores, tie_of)):
        if tie not in rows:
            row = torch.randn(padded, generator=gen, dtype=torch.float64) * 3  # padding: any value
            row[:vocab] = torch.randn(vocab, generator=gen, dtype=torch.float64) * noise
            column = int(torch.randint(0, vocab, (1,), generator=gen))
            if loss_type == "entropy_selection":
                row[column] = _peak_for_entropy(score, vocab)
                targets[tie] = int(torch.randint(0, vocab, (1,), generator=gen))
            else:
                row[column] = _peak_for_ce(score, vocab)
                targets[tie] = column
            rows[tie] = row
        logits[i], target[i] = rows[tie], targets[tie]
    return logits, target


def _layout():
    """(tp rank, tp size, dp rank, dp size) of this process ((0, 1, 0, 1) without torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1, 0, 1
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def _selection_case(loss_type, vocab, padded, seed, hardest_first):
    """A micro-batch [SEQ, BATCH] of 24 tokens: 3 outside the loss mask and 2 ignored, all five with the
    highest scores; 19 counted with distinct scores, except three identical tokens at counted ranks 9-11
    (the cutoff of a half). Positions shuffled, or with `hardest_first` the hardest tokens in the first batch
    columns (data-parallel rank 0), so that a per-rank selection differs from the global one.

    Returns logits [SEQ, BATCH, padded] float64, target [SEQ, BATCH] (-100 where ignored), loss_mask,
    upstream gradient.
    """
    n = SEQ * BATCH
    top = math.log(vocab) if loss_type == "entropy_selection" else 7.0
    low = 0.05 * top if loss_type == "entropy_selection" else 0.3
    levels = torch.linspace(0.95 * top, low, n - 2).tolist()  # 22 distinct scores, descending
    # Designs by descending score: the five excluded tokens, then the counted ones with ranks 9-11 tied.
    scores, tie_of = [], []
    for level_index, level in enumerate(levels):
        copies = 3 if level_index == 5 + 8 else 1  # counted ranks 9, 10, 11 (levels 13 x 3)
        scores += [level] * copies
        tie_of += [level_index] * copies
    excluded = ["masked"] * 3 + ["ignored"] * 2
    kind = excluded + ["counted"] * (n - len(excluded))
    gen = torch.Generator().manual_seed(1000 + seed)
    if hardest_first:  # flat [BATCH, SEQ] order: batch column 0 first
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=gen)
    logits_flat, target_flat = _logits_with_scores(loss_type, scores, tie_of, vocab, padded, seed, noise=0.02)
    logits = torch.empty(BATCH * SEQ, padded, dtype=torch.float64)
    target = torch.empty(BATCH * SEQ, dtype=torch.long)
    mask = torch.ones(BATCH * SEQ)
    for design, position in enumerate(order.tolist()):
        logits[position], target[position] = logits_flat[design], target_flat[design]
        if kind[design] == "masked":
            mask[position] = 0.0
        elif kind[design] == "ignored":
            target[position] = -100
    as_sb = lambda t: t.view(BATCH, SEQ, *t.shape[1:]).transpose(0, 1).contiguous()  # noqa: E731
    upstream = torch.rand(SEQ, BATCH, generator=gen) + 0.5
    return as_sb(logits), as_sb(target), as_sb(mask), upstream


def _scores(ref, loss_type):
    return ref["entropy"] if loss_type == "entropy_selection" else ref["ce"]


def _bin_width(loss_type, vocab, scores, counted):
    upper = math.log(vocab) if loss_type == "entropy_selection" else float(scores[counted].max())
    return upper / SELECTION_BINS


def _run_on_this_rank(logits, target, mask, upstream, spec, vocab, padded, dtype):
    """This rank's share: its data-parallel batch columns and tensor-parallel vocabulary shard. Returns the
    TokenLosses, this rank's logit gradient and its batch-column slice."""
    tp_rank, tp, dp_rank, dp = _layout()
    per_rank = BATCH // dp
    columns = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    start, end = vocab_shard_range(padded, tp_rank, tp)
    leaf = logits[:, columns, start:end].to(dtype).clone().requires_grad_()
    out = vocab_parallel_weighted_cross_entropy(leaf, target[:, columns], spec, vocab, compute_entropy=True,
                                                loss_mask=mask[:, columns])
    (upstream[:, columns] * out.weight * out.loss).sum().backward()
    return out, leaf.grad, columns, (start, end)


def _reference(logits, target, mask, upstream, loss_type, fraction, vocab, dtype, weight=None):
    """The full-vocabulary, whole-micro-batch values and logit gradient; `weight` overrides the exact
    selection's weights in the gradient (a case whose expected selection is the exact one plus a bin)."""
    full = logits.to(dtype).float().requires_grad_()
    ref = reference_token_losses(full, target, loss_type, vocab_size=vocab, selection_fraction=fraction,
                                 loss_mask=mask)
    w = ref["weight"] if weight is None else weight
    (upstream * w * ref["loss"]).sum().backward()
    return ref, full.grad


def _assert_matches(out, grad, ref, ref_grad, columns, shard, dtype, where, weight=None):
    expected_weight = ref["weight"] if weight is None else weight
    assert torch.equal(out.weight, expected_weight[:, columns]), f"weight {where}: {out.weight} != {expected_weight}"
    for name in ("loss", "ce", "entropy"):
        torch.testing.assert_close(getattr(out, name), ref[name][:, columns], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name} {where}: {m}")
    expected = ref_grad[:, columns, shard[0]:shard[1]]
    if dtype == torch.float32:
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {where}: {m}")
    else:
        torch.testing.assert_close(grad.float(), expected.to(dtype).float(), rtol=8e-3, atol=1e-6,
                                   msg=lambda m: f"grad {where}: {m}")


# ---------------------------------------------------------------- against the exact selection


def check_selection_against_exact(dtype_name: str, hardest_first: bool) -> list:
    """Worker body: weights, per-token values and this rank's logit gradient against the exact top share, for
    both selections, several fractions, padded vocabularies. Returns (kept, counted) of this rank per case."""
    dtype = getattr(torch, dtype_name)
    kept_counted = []
    for loss_type in SELECTIONS:
        for (vocab, padded), fraction, seed in [(v, f, s) for v in VOCABS for f in FRACTIONS for s in (0, 1)]:
            logits, target, mask, upstream = _selection_case(loss_type, vocab, padded, seed, hardest_first)
            spec = LossSpec(loss_type, selection_fraction=fraction)
            out, grad, columns, shard = _run_on_this_rank(logits, target, mask, upstream, spec, vocab, padded, dtype)
            ref, ref_grad = _reference(logits, target, mask, upstream, loss_type, fraction, vocab, dtype)
            where = f"{spec.describe()} {dtype_name} layout={_layout()} vocab={vocab}/{padded} seed={seed}"
            # The case is unambiguous: the next counted score below the cutoff lies several bins lower.
            scores, counted, keep = _scores(ref, loss_type), (mask > 0) & (target != -100), ref["weight"] > 0
            if fraction < 1:
                gap = scores[keep].min() - scores[counted & ~keep].max()
                assert gap > 4 * _bin_width(loss_type, vocab, scores, counted), where
            assert int(keep.sum()) >= math.ceil(fraction * 19 - 1e-9), where
            _assert_matches(out, grad, ref, ref_grad, columns, shard, dtype, where)
            kept_counted.append((int((out.weight > 0).sum()), int((counted[:, columns]).sum())))
    return kept_counted


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_selection_matches_the_exact_top_share_on_every_shard(dist_pool, tp, dtype_name):
    if tp == 1:
        results = [check_selection_against_exact(dtype_name, False)]
    else:
        results = dist_pool(tp).run(check_selection_against_exact, dtype_name, False, tensor_model_parallel_size=tp)
    assert all(r == results[0] and r for r in results)  # every TP rank keeps the same tokens


@pytest.mark.parametrize("world, tp", [(2, 1), (4, 2)])
def test_the_threshold_is_global_over_data_parallel_ranks(dist_pool, world, tp):
    """DP 2: rank 0 holds the hardest tokens, so the global selection keeps more of its tokens than a
    per-rank selection would; each rank must match the selection over both ranks' tokens."""
    results = dist_pool(world).run(check_selection_against_exact, "float32", True, tensor_model_parallel_size=tp)
    dp_ranks = results[::tp]  # one TP rank of each DP rank
    per_rank_would_keep = [[max(1, math.ceil(f * c - 1e-9)) for (_, c), f in zip(r, _fractions_of_cases())]
                           for r in dp_ranks]
    kept = [[k for k, _ in r] for r in dp_ranks]
    assert kept != per_rank_would_keep
    # Fraction 1 keeps every counted token on each rank; fraction 0.5 mostly rank 0's.
    assert sum(k for k, _ in dp_ranks[0]) > sum(k for k, _ in dp_ranks[1])


def _fractions_of_cases():
    return [f for _ in SELECTIONS for _v in VOCABS for f in FRACTIONS for _s in (0, 1)]


# ---------------------------------------------------------------- the threshold bin is kept whole


def check_threshold_bin_accuracy(loss_type: str) -> int:
    """Worker body: the cutoff token (8th of 16 counted, fraction 0.5) and one slightly easier token share a
    histogram bin: the selection is the exact one plus that token, which scores less than one bin width
    below the cutoff. Values and gradients against the reference with that selection."""
    vocab = padded = 64
    n = SEQ * BATCH  # 24 tokens: 16 counted (fraction 0.5: 8 needed), 8 outside the loss mask
    top = math.log(vocab) if loss_type == "entropy_selection" else 8.0
    width = top / SELECTION_BINS
    bin_index = SELECTION_BINS // 2
    cutoff, near = (bin_index + 0.7) * width, (bin_index + 0.2) * width
    above = torch.linspace(0.9 * top, cutoff + 0.2, 7).tolist()
    if loss_type == "ce_selection":
        above[0] = top  # the largest counted ce sets the bin width
    below = torch.linspace(near - 0.2, 0.05 * top, 7).tolist()
    counted_scores = above + [cutoff, near] + below
    masked_scores = torch.linspace(0.99 * top, 0.2 * top, n - 16).tolist()
    scores = counted_scores + masked_scores
    logits_flat, target_flat = _logits_with_scores(loss_type, scores, list(range(n)), vocab, padded, 3, noise=0.0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    as_sb = lambda t: t[order].view(BATCH, SEQ, *t.shape[1:]).transpose(0, 1).contiguous()  # noqa: E731
    logits, target = as_sb(logits_flat), as_sb(target_flat)
    mask = as_sb(torch.tensor([1.0] * 16 + [0.0] * (n - 16)))
    near_token = as_sb(torch.arange(n) == 8)
    upstream = torch.rand(SEQ, BATCH, generator=torch.Generator().manual_seed(5)) + 0.5
    spec = LossSpec(loss_type, selection_fraction=0.5)

    ref, _ = _reference(logits, target, mask, upstream, loss_type, 0.5, vocab, torch.float32)
    exact = ref["weight"] > 0
    assert int(exact.sum()) == 8 and not exact[near_token].any()
    expected = exact | near_token
    scores_ref = _scores(ref, loss_type)
    assert 0 < float(scores_ref[exact].min() - scores_ref[near_token].max()) < width  # within one bin
    ref, ref_grad = _reference(logits, target, mask, upstream, loss_type, 0.5, vocab, torch.float32,
                               weight=expected.float())
    out, grad, columns, shard = _run_on_this_rank(logits, target, mask, upstream, spec, vocab, padded, torch.float32)
    _assert_matches(out, grad, ref, ref_grad, columns, shard, torch.float32, f"{loss_type} {_layout()}",
                    weight=expected.float())
    return int((out.weight > 0).sum())


@pytest.mark.parametrize("loss_type", SELECTIONS)
@pytest.mark.parametrize("world, tp", [(1, 1), (2, 2), (2, 1)])
def test_the_threshold_bin_is_kept_whole(dist_pool, loss_type, world, tp):
    if world == 1:
        kept = [check_threshold_bin_accuracy(loss_type)]
    else:
        kept = dist_pool(world).run(check_threshold_bin_accuracy, loss_type, tensor_model_parallel_size=tp)
    assert sum(kept[::tp]) == 9  # the exact 8, plus the one token of the threshold bin below the cutoff


# ---------------------------------------------------------------- single-process properties


def test_selection_needs_no_ignore_index_or_mask_and_keeps_at_least_one_token():
    assert reference_top_fraction(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([True, True, False]),
                                  0.01).tolist() == [True, False, False]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 32, generator=gen) * 3
    target = torch.randint(0, 32, (4, 3), generator=gen)
    for loss_type in SELECTIONS:
        out = vocab_parallel_weighted_cross_entropy(logits, target, LossSpec(loss_type, selection_fraction=1e-6),
                                                    ignore_index=None)
        assert int((out.weight > 0).sum()) == 1
        nothing_counted = vocab_parallel_weighted_cross_entropy(logits, target, LossSpec(loss_type),
                                                                loss_mask=torch.zeros(4, 3))
        assert not nothing_counted.weight.any()


def test_selection_spec_and_its_fraction_are_validated():
    assert LossSpec("entropy_selection").selection_fraction == 0.6
    assert LossSpec("ce_selection", selection_fraction=1).describe() == "ce_selection (selection_fraction=1.0)"
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="selection_fraction"):
            LossSpec("ce_selection", selection_fraction=bad)
    with pytest.raises(ValueError, match="selection_fraction applies"):
        LossSpec("mile", selection_fraction=0.5)
    with pytest.raises(ValueError, match="loss_mask shape"):
        vocab_parallel_weighted_cross_entropy(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long),
                                              LossSpec("ce_selection"), loss_mask=torch.ones(3, 2))


def test_the_fused_head_refuses_a_selection():
    hidden, weight = torch.randn(2, 3, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="selection threshold"):
        fused_linear_cross_entropy(hidden, weight, torch.zeros(2, 3, dtype=torch.long), spec=LossSpec("ce_selection"))


@pytest.mark.parametrize("extra, message", [
    (["--loss-type", "mile", "--selection-fraction", "0.5"],
     "--selection-fraction needs --loss-type entropy_selection or ce_selection"),
    (["--loss-type", "ce_selection", "--selection-fraction", "0"], "must lie in (0, 1]"),
    (["--loss-type", "entropy_selection", "--selection-fraction", "1.5"], "must lie in (0, 1]"),
    (["--loss-type", "entropy_selection", "--fused-lm-head"],
     "--fused-lm-head cannot train --loss-type entropy_selection"),
])
def test_bad_selection_flags_are_refused_at_start_up(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_args(TINY_LLAMA + extra, world_size=1)


def test_the_flag_resolves_into_the_spec():
    config = parse_args(TINY_LLAMA + ["--loss-type", "entropy_selection"], world_size=1)
    assert LossSpec.from_config(config.loss).selection_fraction == 0.6
    config = parse_args(TINY_LLAMA + ["--loss-type", "ce_selection", "--selection-fraction", "0.3"], world_size=1)
    assert LossSpec.from_config(config.loss) == LossSpec("ce_selection", 0.0, selection_fraction=0.3)


# ---------------------------------------------------------------- through the real training step


def train_recording_step_statistics(argv, world_size):
    """Worker body: pretrain(), returning [(loss, lm_loss)] per step and each step's (weight mean, tokens)."""
    from megatron_mile.training import step as step_module
    from megatron_mile.training.loop import pretrain

    recorded = []
    original = step_module.step_statistics

    def recording(parts):
        stats = original(parts)
        recorded.append((stats.weight_mean, stats.tokens))
        return stats

    step_module.step_statistics = recording
    try:
        result = pretrain(parse_args(argv, world_size=world_size))
    finally:
        step_module.step_statistics = original
    return [(r.loss, r.lm_loss) for r in result.history], recorded


@pytest.mark.parametrize("loss_type, fraction, world", [("ce_selection", 0.5, 1), ("entropy_selection", 0.25, 2)])
def test_training_trains_on_the_selected_share(dist_pool, loss_type, fraction, world):
    """The flag reaches the loss: the mean weight of a step (kept tokens / loss-masked tokens) is the fraction
    (at least, and within the threshold bins' excess), and the selected loss differs from the plain lm loss."""
    argv = TINY_LLAMA + ["--loss-type", loss_type, "--selection-fraction", str(fraction)]
    for history, recorded in dist_pool(world).run(train_recording_step_statistics, argv, world):
        assert len(history) == 3 and len(recorded) == 3
        for (loss, lm_loss), (weight_mean, tokens) in zip(history, recorded):
            assert 0 < tokens <= 8 * 32  # the global batch's loss-masked tokens
            assert fraction <= weight_mean < fraction + 0.05, (loss_type, weight_mean)
            assert math.isfinite(loss) and abs(loss - lm_loss) > 1e-3, (loss, lm_loss)
            if loss_type == "ce_selection":
                assert loss > lm_loss  # the hardest tokens' mean cross-entropy


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]])
def test_tensor_and_pipeline_parallelism_select_the_same_tokens(dist_pool, layout):
    """TP and PP do not change which tokens compete (one micro-batch on the last stage; the TP ranks' scores
    agree), so TP 2 and PP 2 reproduce the single-process run step by step."""
    argv = TINY_LLAMA + ["--loss-type", "entropy_selection", "--selection-fraction", "0.5"]
    reference, reference_weights = dist_pool(1).run(train_recording_step_statistics, argv, 1)[0]
    for history, recorded in dist_pool(2).run(train_recording_step_statistics, argv + layout, 2):
        for (loss, lm_loss), (ref_loss, ref_lm_loss) in zip(history, reference, strict=True):
            assert math.isclose(loss, ref_loss, rel_tol=1e-5) and math.isclose(lm_loss, ref_lm_loss, rel_tol=1e-5)
        assert recorded == reference_weights  # the same number of tokens kept, step by step
