"""Training-step time of the fork against a bare megatron-core loop and Hugging Face transformers, on CPU.

Model (all variants): LLaMA-style, 4 layers, hidden 256, 4 heads, FFN 688, vocab 32000, seq 256,
micro-batch 4, fp32, dropout 0, Adam, one micro-batch per step.

Variants, each in a fresh process (group), run in alternating rounds so that drift of the shared machine hits
all of them alike; the figure is the median step time over all measured steps of all rounds:
  ours_ce_tp1 / ours_mile_tp1     pretrain() (schedules, loss collector, logging), 1 process x 2 threads
  ours_ce_tp2 / ours_mile_tp2     the same at TP=2: 2 gloo processes x 1 thread
  ours_ce_tp1_fused / ours_mile_tp1_fused
                                  pretrain() with --fused-lm-head (output layer + loss in chunks of tokens)
  megatron_bare_tp1               megatron-core GPTModel (its own cross-entropy), DDP and optimizer in a
                                  plain loop, CPU layer on; no megatron_mile training code. Its torch Adam
                                  runs the fused kernel, as ours does (use_fused_torch_adam_on_cpu), so the
                                  ratio measures the training code, not the choice of Adam kernel
  hf_llama                        transformers' LlamaForCausalLM (sdpa attention) + torch.optim.Adam as
                                  constructed by default (its for-loop kernel on CPU)
  hf_llama_fused_adam             the same with torch.optim.Adam(fused=True)

    python benchmarks/bench_train.py [--rounds 2] [--steps 12] [--warmup 3]
    python benchmarks/bench_train.py --paired [--rounds 4] [--steps 40] [--warmup 4] [--json pairs.json]
    python benchmarks/bench_train.py --paired-loss 1,2 [--rounds 4] [--steps 40] [--warmup 4] [--json loss.json]

--paired measures the TP=1 ratios more precisely: our train_step() (what pretrain() times per iteration), the
same with torch's for-loop Adam, the bare megatron-core step and transformers' step with each Adam take turns
within one process, and each figure is the median of the per-turn ratios with a bootstrap interval.
--paired-loss does the same for MiLe / cross-entropy: one model whose loss type alternates step by step.
Separate processes drift apart by 10-30% on a shared machine; steps one after the other in one process see
the same machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
from _harness import emit_result, markdown_table, run_worker

from megatron_mile.arguments import parse_args
from megatron_mile.testing.distributed import run_distributed

LAYERS, HIDDEN, HEADS, FFN, VOCAB, SEQ, MBS = 4, 256, 4, 688, 32000, 256, 4
VARIANTS = [
    "ours_ce_tp1", "ours_mile_tp1", "megatron_bare_tp1", "hf_llama", "hf_llama_fused_adam", "ours_ce_tp2",
    "ours_mile_tp2", "ours_ce_tp1_fused", "ours_mile_tp1_fused",
]


def _our_flags(loss: str, tp: int, steps: int, fused: bool = False):
    flags = (
        f"--num-layers {LAYERS} --hidden-size {HIDDEN} --num-attention-heads {HEADS} --ffn-hidden-size {FFN} "
        f"--seq-length {SEQ} --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope "
        f"--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 "
        f"--micro-batch-size {MBS} --global-batch-size {MBS} --train-iters {steps} --lr 1e-4 "
        f"--mock-data --tokenizer-type NullTokenizer --vocab-size {VOCAB - 1} --log-interval 1000000 "
        f"--eval-iters 0 --no-progress --loss-type {loss} --tensor-model-parallel-size {tp}"
    ).split()
    if fused:
        flags.append("--fused-lm-head")
    return flags


def run_ours(flags, world_size):
    """Worker body: per-step seconds of pretrain()."""
    from megatron_mile.training.loop import pretrain

    result = pretrain(parse_args(flags, world_size=world_size))
    return [r.seconds for r in result.history]


def build_megatron_bare():
    """megatron-core GPTModel + DDP + optimizer (its own cross-entropy), and a function running one step."""
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ, share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0), [model])
    # The Adam kernel our training picks on CPU (megatron-core offers no argument for it): set the same flag
    # here by hand, so that ours / bare compares training code, not kernels.
    for group in optimizer.optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    gen = torch.Generator().manual_seed(1)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)

    def step():
        """One timed step (the batch is drawn before the clock starts: a bare loop at its cheapest)."""
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        model.finish_grad_sync()
        optimizer.step()
        return time.perf_counter() - start

    return step


def run_megatron_bare(steps):
    """Worker body: megatron-core GPTModel + DDP + optimizer in a plain loop (its own cross-entropy)."""
    step = build_megatron_bare()
    return [step() for _ in range(steps)]


PAIRED_SIDES = (
    "ours_ce_tp1 (train_step)", "ours_ce_tp1, for-loop Adam", "megatron_bare_tp1", "hf_llama", "hf_llama_fused_adam",
)


def run_paired(flags, steps):
    """Worker body: the PAIRED_SIDES taking turns in ONE process; returns one tuple of seconds per turn.

    All sides share the process, its threads and whatever else the machine is doing at that moment, so the
    per-turn ratios are free of the drift between processes that dominates the separate-process figures.
    Our side is exactly what pretrain() times per iteration: train_step() on the setup pretrain() builds;
    its for-loop-Adam twin steps the same model with the fused flag off for that step (the gain of the
    fused kernel). The order rotates every turn so no side always runs right after the same neighbour.
    """
    from megatron_mile.training.optimizer import torch_adams
    from megatron_mile.training.setup import setup_training
    from megatron_mile.training.step import train_step

    config = parse_args(flags, world_size=1)
    setup = setup_training(config)

    groups = [g for _, adam in torch_adams(setup.optimizer) for g in adam.param_groups]
    assert groups and all(g["fused"] for g in groups), "train_step should run torch's fused Adam on CPU"

    def ours(fused_adam=True):
        for group in groups:
            group["fused"] = fused_adam
        start = time.perf_counter()
        train_step(setup)
        seconds = time.perf_counter() - start
        for group in groups:
            group["fused"] = True
        return seconds

    sides = [ours, lambda: ours(fused_adam=False), build_megatron_bare(), build_hf_llama(),
             build_hf_llama(fused_adam=True)]
    assert len(sides) == len(PAIRED_SIDES)
    turns = []
    for index in range(steps):
        seconds = [0.0] * len(sides)
        for offset in range(len(sides)):
            side = (index + offset) % len(sides)
            seconds[side] = sides[side]()
        turns.append(tuple(seconds))
    return turns


def run_paired_loss(flags, world_size, steps):
    """Worker body (every rank): cross-entropy and MiLe steps taking turns on ONE model; returns one
    (cross-entropy, MiLe) pair of seconds per turn, a step ending when this rank's part of it does.

    The loss is the model's LossSpec, switched with megatron_mile.model.set_loss_spec, so both sides share the
    weights, data iterator, optimizer and process: the ratio isolates the loss. Each side computes the entropy
    exactly when pretrain() would (always for MiLe; for cross-entropy only on logging steps, never here).
    The order alternates every turn; every rank follows the same order, as the collectives require.
    """
    from megatron_mile.loss import LossSpec
    from megatron_mile.model import set_loss_spec
    from megatron_mile.training.setup import setup_training
    from megatron_mile.training.step import train_step

    config = parse_args(flags, world_size=world_size)
    setup = setup_training(config)
    specs = {"cross_entropy": LossSpec("cross_entropy"), "mile": LossSpec("mile", 1.0, 1.0)}

    def step(loss_type):
        set_loss_spec(setup.model, specs[loss_type])
        start = time.perf_counter()
        train_step(setup)
        return time.perf_counter() - start

    turns = []
    for index in range(steps):
        seconds = {}
        for loss_type in (("cross_entropy", "mile") if index % 2 == 0 else ("mile", "cross_entropy")):
            seconds[loss_type] = step(loss_type)
        turns.append((seconds["cross_entropy"], seconds["mile"]))
    return turns


def build_hf_llama(fused_adam: bool = False):
    """transformers' LlamaForCausalLM + torch.optim.Adam (fused kernel if asked), and a function running one
    step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ,
        tie_word_embeddings=False, attention_dropout=0.0, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused_adam or None)
    gen = torch.Generator().manual_seed(1)

    def step():
        """One timed step (the batch is drawn before the clock starts)."""
        tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=gen)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return time.perf_counter() - start

    return step


def run_hf_llama(steps, fused_adam=False):
    """Worker body (no torch.distributed needed): transformers' LlamaForCausalLM in a plain loop."""
    step = build_hf_llama(fused_adam)
    return [step() for _ in range(steps)]


def _worker(variant: str, steps: int) -> list:
    if variant in ("hf_llama", "hf_llama_fused_adam"):
        torch.set_num_threads(2)
        return run_hf_llama(steps, fused_adam=variant == "hf_llama_fused_adam")
    if variant == "megatron_bare_tp1":
        return run_distributed(run_megatron_bare, 1, steps)[0]
    if variant.startswith("paired_loss_tp"):
        world = int(variant[len("paired_loss_tp"):])
        flags = _our_flags("mile", world, 2 * steps + 1)  # two optimizer steps per turn
        per_rank = run_distributed(run_paired_loss, world, flags, world, steps, tensor_model_parallel_size=world)
        return [[max(side) for side in zip(*turn)] for turn in zip(*per_rank)]  # slowest rank per side
    if variant == "paired_ce_tp1":
        return run_distributed(run_paired, 1, _our_flags("cross_entropy", 1, steps + 1), steps)[0]
    _, loss, tp, *fused = variant.split("_")
    loss = {"ce": "cross_entropy", "mile": "mile"}[loss]
    world = int(tp[2:])
    flags = _our_flags(loss, world, steps, fused=bool(fused))
    per_rank = run_distributed(run_ours, world, flags, world, tensor_model_parallel_size=world)
    return [max(step) for step in zip(*per_rank)]  # a step ends when its slowest rank does


def _tp_sizes(text: str) -> list:
    """'1,2' -> [1, 2]; anything else is a usage error naming the expected form."""
    try:
        sizes = [int(t) for t in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(tp <= 0 or HEADS % tp for tp in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated TP sizes that divide the model's {HEADS} "
                                         f"attention heads (e.g. 1,2), got {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--paired", action="store_true",
                        help="only the TP=1 ratios: the PAIRED_SIDES (ours, ours with for-loop Adam, bare "
                             "megatron-core, transformers with each Adam) taking turns in one process per round "
                             "(see run_paired)")
    parser.add_argument("--paired-loss", metavar="TPS", type=_tp_sizes,
                        help="only MiLe / cross-entropy: both loss types taking turns on one model, at each TP "
                             "size listed (e.g. 1,2; see run_paired_loss)")
    parser.add_argument("--json", help="with --paired or --paired-loss: write every step time and ratio here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit_result(_worker(args.worker, args.steps))
        return
    if args.paired:
        _main_paired(args)
        return
    if args.paired_loss:
        _main_paired_loss(args)
        return
    variants = args.variants.split(",")
    times = {v: [] for v in variants}
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else list(reversed(variants))
        for variant in order:
            steps = run_worker(__file__, variant, "--steps", args.steps)[args.warmup:]
            times[variant] += steps
            print(f"round {round_index} {variant}: median {statistics.median(steps):.3f} s", file=sys.stderr)
    median = {v: statistics.median(t) for v, t in times.items()}
    tokens = MBS * SEQ
    ratios = {
        "ours_mile_tp1": ("ours_ce_tp1", "MiLe / CE, TP=1"),
        "ours_mile_tp2": ("ours_ce_tp2", "MiLe / CE, TP=2"),
        "ours_ce_tp1": ("megatron_bare_tp1", "ours CE / bare megatron-core"),
        "megatron_bare_tp1": ("hf_llama", "bare megatron-core / transformers"),
        "ours_mile_tp1_fused": ("ours_ce_tp1_fused", "MiLe / CE, fused LM head"),
        "ours_ce_tp1_fused": ("hf_llama", "ours CE fused / transformers"),
        "hf_llama_fused_adam": ("hf_llama", "transformers, fused / for-loop Adam"),
    }
    rows = []
    for v in variants:
        ratio = ""
        if v in ratios and ratios[v][0] in median:
            base, label = ratios[v]
            ratio = f"{median[v] / median[base]:.3f} ({label})"
        rows.append((v, f"{median[v]:.3f}", f"{tokens / median[v]:.0f}", ratio))
    print(markdown_table(["variant", "median step (s)", "tokens/s", "ratio"], rows))
    for hf in ("hf_llama", "hf_llama_fused_adam"):
        if "ours_ce_tp1" in median and hf in median:
            print(f"\nours CE TP=1 / {hf}: {median['ours_ce_tp1'] / median[hf]:.3f}")


def _main_paired(args) -> None:
    names = PAIRED_SIDES
    turns = []
    for round_index in range(args.rounds):
        measured = [tuple(t) for t in run_worker(__file__, "paired_ce_tp1", "--steps", args.steps)[args.warmup:]]
        turns += measured
        medians = [statistics.median(t[i] for t in measured) for i in range(len(names))]
        print(f"round {round_index}: " + ", ".join(f"{n} {m:.3f} s" for n, m in zip(names, medians))
              + "; median ours / " + ", ".join(
                  f"{n} {statistics.median(t[0] / t[i] for t in measured):.3f}" for i, n in enumerate(names) if i
              ), file=sys.stderr)
    tokens = MBS * SEQ
    medians = [statistics.median(t[i] for t in turns) for i in range(len(names))]
    print(markdown_table(["variant", "median step (s)", "tokens/s"],
                         [(name, f"{median:.3f}", f"{tokens / median:.0f}") for name, median in zip(names, medians)]))
    print()
    ratios = {}
    for other in range(1, len(names)):
        label = names[other]
        ratios[label] = [t[0] / t[other] for t in turns]
        quartiles = statistics.quantiles(ratios[label], n=4)
        low, high = _bootstrap_median_interval(ratios[label])
        ratio_of_medians = statistics.median(t[0] for t in turns) / statistics.median(t[other] for t in turns)
        print(f"ours / {label}, median of {len(turns)} same-process turns: {statistics.median(ratios[label]):.3f} "
              f"(quartiles {quartiles[0]:.3f} - {quartiles[2]:.3f}; 95% bootstrap interval of the median "
              f"{low:.3f} - {high:.3f}); ratio of medians {ratio_of_medians:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sides": names, "seconds": turns, "ratios": ratios}, f)


def _main_paired_loss(args) -> None:
    results, rows = {}, []
    for tp in args.paired_loss:
        turns = []
        for round_index in range(args.rounds):
            measured = [tuple(t) for t in run_worker(__file__, f"paired_loss_tp{tp}", "--steps", args.steps)
                        [args.warmup:]]
            turns += measured
            print(f"TP {tp} round {round_index}: cross-entropy {statistics.median(t[0] for t in measured):.3f} s, "
                  f"MiLe {statistics.median(t[1] for t in measured):.3f} s; median MiLe / CE "
                  f"{statistics.median(t[1] / t[0] for t in measured):.3f}", file=sys.stderr)
        ratios = [t[1] / t[0] for t in turns]
        low, high = _bootstrap_median_interval(ratios)
        quartiles = statistics.quantiles(ratios, n=4)
        ce, mile = statistics.median(t[0] for t in turns), statistics.median(t[1] for t in turns)
        rows.append((tp, f"{ce:.3f}", f"{mile:.3f}", f"{statistics.median(ratios):.3f} ({len(turns)} turns)",
                     f"{low:.3f} - {high:.3f}", f"{quartiles[0]:.3f} - {quartiles[2]:.3f}", f"{mile / ce:.3f}"))
        results[tp] = {"seconds": turns, "ratios": ratios}
    print(markdown_table(["TP", "cross-entropy step (s)", "MiLe step (s)", "MiLe / CE: median of per-turn ratios",
                          "95% interval of the median", "quartiles", "ratio of medians"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


def _bootstrap_median_interval(values, resamples: int = 4000, seed: int = 0):
    """95% percentile-bootstrap interval of the median of `values` (resampled with replacement)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


if __name__ == "__main__":
    main()
