"""Step time around checkpoint saves, with and without --async-save, on CPU.

Model: LLaMA-style, 6 layers, hidden 512, 8 heads, FFN 1376, vocabulary 32000, sequence 256, micro-batch 4,
fp32, Adam (a checkpoint of ~0.6 GB with the optimizer state), mock data, one process, 2 threads,
--save-interval 4 over 24 iterations (5 saves inside the run, plus the last one). Each mode trains in a fresh
process (benchmarks/_harness.py); modes alternate over the rounds.

Measured per mode from the loop's own clock: the wall time from the start of one step to the start of the
next, split into the steps a save follows (the step plus the time the loop is blocked saving) and the steps
after a save (during which an asynchronous save's writer competes for the cores), and the plain steps; and
the whole run's wall time. "none" runs without --save.

    python benchmarks/bench_async_save.py [--rounds 2] [--json async.json]    # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _harness import emit_result, markdown_table, report, run_worker

MODEL_ARGS = (
    "--num-layers 6 --hidden-size 512 --num-attention-heads 8 --ffn-hidden-size 1376 --seq-length 256 "
    "--max-position-embeddings 256 --normalization RMSNorm --swiglu --disable-bias-linear "
    "--position-embedding-type rope --untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 "
    "--micro-batch-size 4 --global-batch-size 4 --lr 1e-4 --mock-data --tokenizer-type NullTokenizer "
    "--vocab-size 32000 --eval-iters 0 --log-interval 1000 --no-progress --loss-type mile"
).split()
TRAIN_ITERS, SAVE_INTERVAL = 24, 4
MODES = ("none", "sync", "async")


def worker(mode: str) -> dict:
    """Train TRAIN_ITERS steps in this process; the start time of every step and the run's wall time."""
    import torch

    from megatron_mile import parallel
    from megatron_mile.arguments import parse_args
    from megatron_mile.training import loop

    torch.set_num_threads(2)
    starts = []
    real_step = loop.train_step

    def timed_step(*args, **kwargs):
        starts.append(time.perf_counter())
        return real_step(*args, **kwargs)

    loop.train_step = timed_step
    with tempfile.TemporaryDirectory() as directory:
        argv = [*MODEL_ARGS, "--train-iters", str(TRAIN_ITERS)]
        if mode != "none":
            argv += ["--save", directory, "--save-interval", str(SAVE_INTERVAL)]
        if mode == "async":
            argv += ["--async-save"]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(parallel.find_free_port()))
        begin = time.perf_counter()
        loop.pretrain(parse_args(argv, world_size=1))
        wall = time.perf_counter() - begin
        parallel.shutdown()
    # Interval i: start of step i+1 to start of step i+2 (step i+1 is iteration i+1).
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    saved = [s for i, s in enumerate(intervals) if (i + 1) % SAVE_INTERVAL == 0]
    after = [s for i, s in enumerate(intervals) if i % SAVE_INTERVAL == 0 and i > 0]
    plain = [s for i, s in enumerate(intervals) if (i + 1) % SAVE_INTERVAL != 0 and not (i % SAVE_INTERVAL == 0 and i > 0)]
    return {"mode": mode, "wall": wall, "saved": saved, "after": after, "plain": plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        emit_result(worker(args.worker))
        return
    runs = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        order = MODES if round_index % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            result = run_worker(__file__, mode)
            runs[mode].append(result)
            print(f"round {round_index} {mode}: wall {result['wall']:.1f} s", file=sys.stderr, flush=True)

    def median(mode: str, key: str) -> float:
        values = [v for run in runs[mode] for v in run[key]]
        return statistics.median(values) if values else float("nan")

    plain = median("none", "plain")
    rows = []
    for mode in MODES:
        wall = statistics.median(run["wall"] for run in runs[mode])
        rows.append([mode, f"{median(mode, 'plain'):.3f}", f"{median(mode, 'saved'):.3f}",
                     f"{median(mode, 'after'):.3f}", f"{wall:.1f}",
                     f"{(median(mode, 'saved') - plain):.3f}" if mode != "none" else "-"])
    table = markdown_table(["mode", "plain step (s)", "step + save (s)", "step after a save (s)", "run wall (s)",
                            "loop blocked per save (s)"], rows)
    report([dict(mode=m, runs=runs[m]) for m in MODES], table, args.json)


if __name__ == "__main__":
    main()
