"""Activation recomputation on CPU: step time and memory with none / selective / full, beside the memory
planner's prediction for the same three.

Model: megatron-core's local layers as this project trains them (MileGPTModel, fp32, RMSNorm, SwiGLU, rope,
untied embeddings, dropout 0, MiLe loss, TP = PP = 1): 4 layers, hidden 256, 4 heads, FFN 688, vocabulary
4096, sequence 512, micro-batch 8. Recomputation: none; selective (--recompute-activations: core attention);
full (--recompute-granularity full --recompute-method uniform --recompute-num-layers 1).

Per mode, in fresh processes (benchmarks/_harness.py):
- time: the minimum and the median of 7 forward + backward passes after one warm-up (the optimizer step does
  not depend on recomputation); on a shared machine the minimum is the least disturbed;
- memory, harness: the whole process's RSS high-water mark, and one forward + backward's peak above the RSS
  before it (weights and gradients already allocated by the warm-up), with glibc's mmap threshold fixed as
  planning/measure.py fixes it, so that freed tensors leave RSS;
- memory, megatron_mile/planning/measure.py (glibc's mmap threshold fixed so that RSS follows the live
  tensors): the activations held when the output layer starts (what forward keeps for backward) and the step's
  peak above the warm state;
- planner (megatron_mile.planning.memory, --device cpu): activations held, and the step's peak above the
  warm state (activations + logits/loss + backward's peak beyond them).

    python benchmarks/bench_recompute.py          # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time

import torch
from _harness import call_peak_memory, emit_result, markdown_table, peak_rss_bytes, report, run_worker

from megatron_mile import parallel
from megatron_mile.arguments import parse_args
from megatron_mile.planning.measure import MALLOC_ENV, MeasureSpec, measure_in_subprocess, run_flags
from megatron_mile.planning.memory import Layout, ModelShape, plan

MODEL = MeasureSpec(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4, num_query_groups=4,
                    vocab_size=4096, seq_length=512, micro_batch_size=8)
MODES = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
TIMED_STEPS = 7


def spec_of(mode: str) -> MeasureSpec:
    return dataclasses.replace(MODEL, **MODES[mode])


def time_and_peak(mode: str) -> dict:
    """Worker body: seconds per forward + backward, the call's peak and the process's peak RSS."""
    from megatron.core import tensor_parallel

    from megatron_mile.model import build_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = spec_of(mode)
    with parallel.single_process_parallel_state():
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        model = build_model(parse_args(run_flags(spec), world_size=1), spec.vocab_size)[0]
        model.train()
        b, s = spec.micro_batch_size, spec.seq_length
        tokens = torch.randint(0, spec.vocab_size, (b, s))
        labels = torch.randint(0, spec.vocab_size, (b, s))
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)

        def step() -> None:
            model(tokens, position_ids, None, labels=labels)[..., 0].sum().backward()

        step()  # warm-up: gradients, rope caches, megatron's buffers
        seconds = []
        for _ in range(TIMED_STEPS):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        gc.collect()
        memory = call_peak_memory(step)
    return {"seconds": statistics.median(seconds), "min_seconds": min(seconds), "call_peak": memory["call_peak"],
            "process_peak": max(memory["process_peak"], peak_rss_bytes())}


def planned(mode: str):
    spec = spec_of(mode)
    shape = ModelShape(num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                       num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_query_groups,
                       ffn_hidden_size=spec.ffn_hidden_size, vocab_size=spec.vocab_size, seq_length=spec.seq_length)
    layout = Layout(micro_batch_size=spec.micro_batch_size, precision="fp32", device="cpu",
                    recompute=spec.recompute_granularity or "none", recompute_method=spec.recompute_method or "uniform",
                    recompute_num_layers=spec.recompute_num_layers or 1)
    return plan(shape, layout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("mode", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit_result(time_and_peak(args.mode))
        return
    os.environ.update(MALLOC_ENV)  # for the harness workers: RSS follows the live tensors
    rows = []
    for mode in MODES:
        harness = run_worker(__file__, mode)
        measured = measure_in_subprocess(spec_of(mode))
        prediction = planned(mode)
        rows.append(dict(mode=mode, **harness, activations=measured["activations"],
                         step_peak=max(measured["forward_peak"], measured["backward_peak"]),
                         planned_activations=prediction.activations,
                         planned_step_peak=prediction.activations + prediction.logits_and_loss
                         + prediction.attention_backward_extra))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report(rows, _markdown(rows), args.json)


def _markdown(rows) -> str:
    mib = 1024**2
    base = rows[0]
    lines = []
    for r in rows:
        lines.append((r["mode"], f"{r['min_seconds']:.2f}", f"{r['min_seconds'] / base['min_seconds']:.2f}x",
                      f"{r['seconds']:.2f}",
                      f"{r['process_peak'] / mib:.0f}", f"{r['call_peak'] / mib:.0f}",
                      f"{r['activations'] / mib:.1f}", f"{r['planned_activations'] / mib:.1f}",
                      f"{r['planned_activations'] / r['activations'] - 1:+.1%}",
                      f"{r['step_peak'] / mib:.1f}", f"{r['planned_step_peak'] / mib:.1f}",
                      f"{r['planned_step_peak'] / r['step_peak'] - 1:+.1%}"))
    return markdown_table(["recompute", "fwd+bwd s (min)", "vs none", "median s", "process peak RSS MiB",
                           "step peak above warm MiB (harness)", "activations held MiB (measured)", "planned",
                           "diff", "step peak above warm MiB (measured)", "planned", "diff"], lines, "lrrrrrrrrrrr")


if __name__ == "__main__":
    main()
