"""Peak memory and forward+backward time of the LM head + loss: fused vs unfused, side by side in one run.

Methods (MiLe loss, gamma 1, a loss mask with ~10% zeros; both produce the gradients of hidden and W):
  unfused  what the model does today: megatron's ColumnParallelLinear computation for a replicated input
           (copy_to_tensor_model_parallel_region, then hidden @ W^T -> [s, b, V/tp] logits), then
           vocab_parallel_weighted_cross_entropy (with reuse_logits_for_grad, as MileGPTModel uses it)
           and sum(mask * w * ce), backward through autograd;
  fused    megatron_mile.loss.fused_linear_cross_entropy (default 32 MiB chunk budget).
Shapes: 16384 tokens ([s, b] = [2048, 8]), hidden 512, vocab 32000 (already a multiple of 128 * TP),
TP 1 (one process, 2 threads) and TP 2 (two gloo processes, 1 thread each), bf16 and fp32.

Time: one process group per (TP, dtype) runs both methods in interleaved rounds after a warm-up round and
reports the median and the minimum (slowest rank per round). Memory: a fresh process group per (method, TP, dtype) builds
the inputs, resets the RSS high-water mark (writes "5" to /proc/self/clear_refs), runs one forward+backward
and reads VmHWM from /proc/self/status; reported as the peak above the RSS just before the call (the LM
head + loss's own working memory, gradients of hidden and W included) and as the whole process's peak.

    python benchmarks/bench_fused_lm_head.py              # TP 1 and 2, bf16 and fp32 (~15 min, 2 cores)
    python benchmarks/bench_fused_lm_head.py --quick      # TP 1, bf16 only
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
from _harness import call_peak_memory, emit_result, markdown_table, run_worker

from megatron_mile.loss import LossSpec, vocab_parallel_weighted_cross_entropy
from megatron_mile.loss.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_mile.testing.distributed import run_distributed
from megatron_mile.vocab import padded_vocab_size, vocab_shard_range

SEQ, BATCH, HIDDEN, VOCAB = 2048, 8, 512, 32000
METHODS = ["unfused", "fused"]


def _make_inputs(dtype_name: str):
    """hidden [s, b, h] (same on every rank), this rank's W shard [V/tp, h], target, loss mask."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    padded = padded_vocab_size(VOCAB, tp)
    start, end = vocab_shard_range(padded, rank, tp)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).to(dtype)
    weight = (torch.randn(padded, HIDDEN, generator=gen) * 0.05)[start:end].to(dtype).contiguous()
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=gen)
    loss_mask = (torch.rand(SEQ, BATCH, generator=gen) > 0.1).float()
    return hidden, weight, target, loss_mask


def _step(method: str, hidden, weight, target, loss_mask) -> float:
    """One forward+backward; fresh leaves so that each call allocates its own gradients. Returns the loss."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    spec = LossSpec("mile", 1.0, 1.0)
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if method == "unfused":
        replicated = copy_to_tensor_model_parallel_region(h) if tp > 1 else h
        logits = replicated.matmul(w.t())  # [s, b, v/tp]
        losses = vocab_parallel_weighted_cross_entropy(
            logits, target, spec, VOCAB, ignore_index=None, reuse_logits_for_grad=True
        )
        ce, wt = losses.loss, losses.weight
        del logits
        loss = (wt * loss_mask * ce).sum()
    elif method == "fused":
        loss = fused_linear_cross_entropy(h, w, target, loss_mask, spec, VOCAB, ignore_index=None).weighted_loss_sum
    else:
        raise ValueError(method)
    loss.backward()
    assert h.grad is not None and w.grad is not None
    return float(loss)


def time_methods(methods, dtype_name, rounds):
    """Worker body: median seconds per forward+backward of each method, interleaved rounds."""
    inputs = _make_inputs(dtype_name)
    times = {m: [] for m in methods}
    losses = {}
    for round_index in range(rounds + 1):  # round 0 warms up
        for method in methods:
            torch.distributed.barrier()
            start = time.perf_counter()
            losses[method] = _step(method, *inputs)
            elapsed = time.perf_counter() - start
            if round_index:
                times[method].append(elapsed)
    return {
        "seconds": {m: statistics.median(v) for m, v in times.items()},
        "min_seconds": {m: min(v) for m, v in times.items()},
        "loss": losses,
    }


def measure_memory(method, dtype_name):
    """Worker body: (call peak above pre-call RSS, whole-process peak) of one forward+backward."""
    inputs = _make_inputs(dtype_name)
    gc.collect()
    return call_peak_memory(lambda: _step(method, *inputs))


def _worker(args) -> None:
    if args.job == "time":
        per_rank = run_distributed(time_methods, args.tp, METHODS, args.dtype, args.rounds, tensor_model_parallel_size=args.tp)
        result = {
            "seconds": {m: max(r["seconds"][m] for r in per_rank) for m in METHODS},
            "min_seconds": {m: max(r["min_seconds"][m] for r in per_rank) for m in METHODS},
            "loss": per_rank[0]["loss"],
        }
    else:
        per_rank = run_distributed(measure_memory, args.tp, args.method, args.dtype, tensor_model_parallel_size=args.tp)
        result = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    emit_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tp", type=int, nargs="*", help="TP sizes (default 1 2; --quick: 1)")
    parser.add_argument("--dtypes", nargs="*", help="default bfloat16 float32; --quick: bfloat16")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("method", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("tp_size", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("dtype", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("worker_rounds", nargs="?", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.tp, args.rounds = args.tp_size, args.worker_rounds
        _worker(args)
        return

    tps = args.tp or ([1] if args.quick else [1, 2])
    dtypes = args.dtypes or (["bfloat16"] if args.quick else ["bfloat16", "float32"])
    rows = []
    for tp in tps:
        for dtype in dtypes:
            timing = run_worker(__file__, "time", "-", tp, dtype, args.rounds)
            for method in METHODS:
                mem = run_worker(__file__, "memory", method, tp, dtype, 0)
                rows.append(dict(tp=tp, dtype=dtype, method=method, seconds=timing["seconds"][method],
                                 min_seconds=timing["min_seconds"][method],
                                 loss=timing["loss"][method], **mem))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(_markdown(rows))


def _markdown(rows) -> str:
    mib = 1024**2
    base = {(r["tp"], r["dtype"]): r for r in rows if r["method"] == "unfused"}
    lines = []
    for r in rows:
        b = base[(r["tp"], r["dtype"])]
        lines.append((r["tp"], r["dtype"], r["method"], f"{r['seconds']:.2f}", f"{r['min_seconds']:.2f}",
                      f"{r['seconds'] / b['seconds']:.2f}x", f"{r['call_peak'] / mib:.0f}",
                      f"{b['call_peak'] / max(r['call_peak'], 1):.1f}x", f"{r['process_peak'] / mib:.0f}",
                      f"{r['loss']:.2f}"))
    return markdown_table(["TP", "dtype", "method", "fwd+bwd s (median)", "min s", "median vs unfused",
                           "LM head + loss peak MiB", "memory: unfused / fused", "process peak MiB", "loss value"],
                          lines)


if __name__ == "__main__":
    main()
