"""Forward+backward time and peak memory of the vocab-parallel losses, side by side in one run.

Methods: megatron-core's vocab_parallel_cross_entropy, our cross-entropy, MiLe, focal, dft, MiLe with z-loss
and label smoothing (mile_zloss_ls), the token selections entropy_selection and ce_selection (60% kept; their
histogram threshold over this process's tokens: no data-parallel group here), and a naive
full-vocabulary MiLe (softmax, clamp, log over all logits, as the paper's code does; TP 1 only); for fp32
logits also ce_inplace / mile_inplace, ours with reuse_logits_for_grad as the model's loss hook calls it
(it overwrites the logits, as megatron-core's does).
Shapes: 4096 tokens ([s, b] = [1024, 4]), vocab 32000 and 50257 (padded to a multiple of 128 * TP),
TP 1 (one process, 2 threads) and TP 2 (two gloo processes, 1 thread each), bf16 and fp32 logits.

Time: one process group per (vocab, TP, dtype) runs every method in interleaved rounds and reports the
median of the rounds (the slowest rank per round). Memory: a fresh process group per (method, vocab, TP,
dtype) runs one forward+backward and reports the process's peak RSS (whole process) and the peak above
the RSS held just before the call (logits and inputs already allocated): the loss's own working memory.

    python benchmarks/bench_loss.py                 # everything, prints a markdown table
    python benchmarks/bench_loss.py --quick         # vocab 32000, TP 1, bf16 only
    python benchmarks/bench_loss.py --vocabs 32000 --tps 1,2 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from _harness import call_peak_memory, emit_result, markdown_table, run_worker

from megatron_mile.loss import (
    CROSS_ENTROPY,
    LossSpec,
    vocab_parallel_focal,
    vocab_parallel_mile,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_mile.loss.reference import naive_mile_loss
from megatron_mile.testing.distributed import run_distributed
from megatron_mile.vocab import padded_vocab_size, vocab_shard_range

TOKENS_SEQ, TOKENS_BATCH = 1024, 4  # 4096 tokens
METHODS = ["megatron_ce", "ce", "mile", "focal", "dft", "mile_zloss_ls", "entropy_selection", "ce_selection",
           "naive_mile", "ce_inplace", "mile_inplace"]
# The loss family's extra terms, on the path the model uses: MiLe with z-loss 1e-4 and label smoothing 0.1.
MILE_ZLOSS_LS = dict(loss_type="mile", gamma=1.0, sigma=1.0, z_loss_coeff=1e-4, label_smoothing=0.1)
# The methods that are one LossSpec on vocab_parallel_weighted_cross_entropy, as the model calls it.
SPEC_METHODS = {
    "dft": LossSpec("dft"),
    "mile_zloss_ls": LossSpec(**MILE_ZLOSS_LS),
    "entropy_selection": LossSpec("entropy_selection", selection_fraction=0.6),
    "ce_selection": LossSpec("ce_selection", selection_fraction=0.6),
}
# The model's loss hook gives its fp32 logits up (reuse_logits_for_grad), as megatron-core's in-place
# cross-entropy takes them; bf16 logits are never overwritten, so these two run for fp32 only.
FP32_ONLY = ("ce_inplace", "mile_inplace")


def _make_inputs(vocab: int, dtype_name: str):
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    padded = padded_vocab_size(vocab, tp)
    start, end = vocab_shard_range(padded, rank, tp)
    gen = torch.Generator().manual_seed(1234 + rank)
    shard = (torch.randn(TOKENS_SEQ, TOKENS_BATCH, end - start, generator=gen) * 3).to(getattr(torch, dtype_name))
    target = torch.randint(0, vocab, (TOKENS_SEQ, TOKENS_BATCH), generator=torch.Generator().manual_seed(99))
    return shard, target, vocab


def _step(method: str, leaf, target, vocab: int) -> None:
    """One forward+backward of `method` on a fresh leaf copy of the logits, seen through a view.

    A model's loss gets the output layer's logits, a non-leaf. Handing a leaf itself to megatron-core's
    in-place cross-entropy would make autograd copy the gradient on accumulation (it is the leaf's own
    tensor), a cost no model pays; through a view every method's gradient lands in .grad without a copy.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    logits = leaf.view_as(leaf)
    if method == "megatron_ce":
        loss = megatron_ce(logits, target).sum()
    elif method == "ce":
        losses = vocab_parallel_weighted_cross_entropy(logits, target, CROSS_ENTROPY, vocab)
        ce, w = losses.loss, losses.weight
        loss = (ce * w).sum()
    elif method == "mile":
        ce, w = vocab_parallel_mile(logits, target, vocab_size=vocab)
        loss = (ce * w).sum()
    elif method == "focal":
        ce, w = vocab_parallel_focal(logits, target, vocab_size=vocab)
        loss = (ce * w).sum()
    elif method in SPEC_METHODS:
        losses = vocab_parallel_weighted_cross_entropy(logits, target, SPEC_METHODS[method], vocab)
        loss = (losses.loss * losses.weight).sum()
    elif method in FP32_ONLY:
        spec = LossSpec({"ce_inplace": "cross_entropy", "mile_inplace": "mile"}[method], 1.0, 1.0)
        losses = vocab_parallel_weighted_cross_entropy(logits, target, spec, vocab, reuse_logits_for_grad=True)
        ce, w = losses.loss, losses.weight
        loss = (ce * w).sum()
    elif method == "naive_mile":
        loss = naive_mile_loss(logits[..., :vocab], target)
    else:
        raise ValueError(method)
    loss.backward()


def time_methods(methods, vocab, dtype_name, rounds):
    """Worker body: median seconds per forward+backward for each method (interleaved rounds)."""
    shard, target, vocab = _make_inputs(vocab, dtype_name)
    times = {m: [] for m in methods}
    for round_index in range(rounds + 1):  # round 0 warms up
        for method in methods:
            logits = shard.clone().requires_grad_()
            torch.distributed.barrier() if torch.distributed.is_initialized() else None
            start = time.perf_counter()
            _step(method, logits, target, vocab)
            elapsed = time.perf_counter() - start
            del logits
            if round_index:
                times[method].append(elapsed)
    return {m: statistics.median(v) for m, v in times.items()}


def measure_memory(method, vocab, dtype_name):
    """Worker body: (whole-process peak RSS, peak RSS above the pre-call RSS) for one call."""
    shard, target, vocab = _make_inputs(vocab, dtype_name)
    logits = shard.clone().requires_grad_()
    del shard
    return call_peak_memory(lambda: _step(method, logits, target, vocab))


def _worker(args) -> None:
    """Run in a fresh process (group): one timing or memory job, result as JSON on the last stdout line."""
    torch.set_num_threads(2 if args.tp == 1 else 1)
    methods = [m for m in args.methods.split(",") if not (m == "naive_mile" and args.tp > 1)]
    if args.job == "time":
        per_rank = run_distributed(
            time_methods, args.tp, methods, args.vocab, args.dtype, args.rounds, tensor_model_parallel_size=args.tp
        )
        result = {m: max(r[m] for r in per_rank) for m in methods}
    else:
        per_rank = run_distributed(
            measure_memory, args.tp, methods[0], args.vocab, args.dtype, tensor_model_parallel_size=args.tp
        )
        result = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    emit_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--vocabs", help="comma-separated, e.g. 32000 (default: 32000,50257)")
    parser.add_argument("--tps", help="comma-separated, e.g. 1,2 (default: 1,2)")
    parser.add_argument("--dtypes", help="comma-separated, e.g. float32 (default: bfloat16,float32)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("methods", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("vocab", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("tp", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("dtype", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("worker_rounds", nargs="?", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.rounds = args.worker_rounds
        _worker(args)
        return

    vocabs = [32000] if args.quick else [32000, 50257]
    tps = [1] if args.quick else [1, 2]
    dtypes = ["bfloat16"] if args.quick else ["bfloat16", "float32"]
    vocabs = [int(v) for v in args.vocabs.split(",")] if args.vocabs else vocabs
    tps = [int(t) for t in args.tps.split(",")] if args.tps else tps
    dtypes = args.dtypes.split(",") if args.dtypes else dtypes
    rows = []
    for vocab in vocabs:
        for tp in tps:
            for dtype in dtypes:
                methods = [m for m in METHODS if not (m == "naive_mile" and tp > 1)
                           and not (m in FP32_ONLY and dtype != "float32")]
                times = run_worker(__file__, "time", ",".join(methods), vocab, tp, dtype, args.rounds)
                for method in methods:
                    mem = run_worker(__file__, "memory", method, vocab, tp, dtype, 0)
                    rows.append(dict(vocab=vocab, tp=tp, dtype=dtype, method=method, seconds=times[method], **mem))
                    print(json.dumps(rows[-1]), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(_markdown(rows))


def _markdown(rows) -> str:
    gib = 1024**3
    base = {(r["vocab"], r["tp"], r["dtype"]): r for r in rows if r["method"] == "megatron_ce"}
    lines = []
    for r in rows:
        b = base[(r["vocab"], r["tp"], r["dtype"])]
        lines.append((r["vocab"], r["tp"], r["dtype"], r["method"], f"{r['seconds']:.3f}",
                      f"{r['seconds'] / b['seconds']:.2f}", f"{r['process_peak'] / gib:.2f}",
                      f"{r['call_peak'] / gib:.2f}", f"{r['call_peak'] / max(b['call_peak'], 1):.2f}"))
    return markdown_table(["vocab", "TP", "logits", "method", "fwd+bwd s", "x megatron CE", "process peak GiB",
                           "loss peak GiB", "x megatron CE"], lines)


if __name__ == "__main__":
    main()
