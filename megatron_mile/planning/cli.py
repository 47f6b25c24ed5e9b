"""`tools/plan_memory.py`: per-GPU memory and step time of a run, from its training flags or a recipe.

    python tools/plan_memory.py --recipe 6.7b
    python tools/plan_memory.py --recipe 6.7b --world-size 8 --gpu A100 --mfu 0.35 --json
    python tools/plan_memory.py --num-layers 32 --hidden-size 4096 --num-attention-heads 32 \
        --ffn-hidden-size 11008 --seq-length 2048 --swiglu --untie-embeddings-and-output-weights \
        --normalization RMSNorm --disable-bias-linear --vocab-size 32000 --bf16 \
        --tensor-model-parallel-size 2 --micro-batch-size 2 --global-batch-size 2048 --world-size 128

The training flags are pretrain_gpt_mile.py's (Megatron-LM spelling: --recompute-activations,
--recompute-granularity / --recompute-method / --recompute-num-layers among them); flags given after --recipe
override the recipe's. The planner adds its own: --recipe, --world-size, --device, --gpu, --mfu, --json.
Training flags that change memory in ways it does not model (--context-parallel-size > 1, --recompute-modules
other than core_attn) stop it with a message instead of being ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Tuple

from megatron_mile.arguments import RUN_LENGTH_FLAGS, build_parser, config_from_namespace, missing_required_flags
from megatron_mile.planning.memory import (
    GPU_MEMORY_GB,
    GPU_PEAK_TFLOPS,
    GPU_RESERVED_BYTES,
    Layout,
    MemoryPlan,
    ModelShape,
    PlanError,
    padded_vocab,
    plan,
)
from megatron_mile.planning.recipes import RECIPES


def _add(parser: argparse.ArgumentParser, group, flag: str, **kwargs) -> None:
    # Training flags grow over time (another module may add --fp8-format or --recompute-granularity):
    # reuse the training flag when it exists instead of defining a clashing one.
    if flag not in parser._option_string_actions:  # noqa: SLF001 - argparse has no public lookup
        group.add_argument(flag, **kwargs)


def planner_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.prog = "plan_memory.py"
    parser.description = "Per-GPU memory (weights, gradients, optimizer states, activations, logits/loss) " \
        "and time per step of a training run. Flags are pretrain_gpt_mile.py's, plus the planner's own."
    group = parser.add_argument_group("planner")
    _add(parser, group, "--recipe", choices=sorted(RECIPES), default=None,
         help="Start from a paper model's flags and layout (examples/pretrain_llama_*.sh); later flags override.")
    _add(parser, group, "--world-size", type=int, default=None, dest="world_size",
         help="GPUs in the run (data parallel = world / (TP * PP)). Default: the recipe's, else TP * PP.")
    _add(parser, group, "--fp8-format", choices=["hybrid", "e4m3"], default=None, dest="fp8_format",
         help="Plan for fp8 linear layers (Transformer Engine).")
    _add(parser, group, "--device", choices=["gpu", "cpu"], default="gpu", dest="device",
         help="gpu: Transformer Engine layers and flash attention; cpu: megatron-core's local layers as this "
              "project runs them without a GPU (materialised fp32 attention scores).")
    _add(parser, group, "--gpu", choices=sorted(GPU_PEAK_TFLOPS), default="H100", dest="gpu",
         help="GPU for the capacity check and the step time.")
    _add(parser, group, "--mfu", type=float, default=0.4, dest="mfu",
         help="Model FLOPs utilisation assumed for the step time.")
    _add(parser, group, "--json", action="store_true", dest="json", help="Print JSON instead of a table.")
    return parser


def shape_and_layout(argv: List[str]) -> Tuple[ModelShape, Layout, argparse.Namespace]:
    """Parse planner flags (a --recipe expands to its flags first) into the planner's inputs."""
    parser = planner_parser()
    recipe_pre = argparse.ArgumentParser(add_help=False)
    recipe_pre.add_argument("--recipe", choices=sorted(RECIPES))
    pre, _ = recipe_pre.parse_known_args(argv)
    recipe = RECIPES[pre.recipe] if pre.recipe else None
    args = parser.parse_args((recipe.flags if recipe else []) + list(argv))
    # The model shape and micro-batch size a run requires; a plan needs no run length.
    missing = [flag for flag in missing_required_flags(args) if flag != " or ".join(RUN_LENGTH_FLAGS)]
    if missing:
        raise PlanError(f"give {', '.join(missing)} (or --recipe)")
    config = config_from_namespace(args)
    m, p, t = config.model, config.parallel, config.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    world = args.world_size or (recipe.world_size if recipe else tp * pp)
    if world % (tp * pp):
        raise PlanError(f"--world-size {world} is not divisible by TP * PP = {tp} * {pp}")
    config.finalize(world)
    if p.context_parallel_size != 1:
        raise PlanError("the planner does not model context parallelism: drop --context-parallel-size")
    if config.recompute.recompute_modules not in (None, ["core_attn"]):
        raise PlanError("the planner models selective recomputation of core_attn (the default) only: drop "
                        "--recompute-modules")
    if config.data.vocab_size is None:
        raise PlanError("give --vocab-size (the tokenizer's vocabulary, e.g. 32000 for LLaMA's)")
    shape = ModelShape(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        vocab_size=config.data.vocab_size,
        seq_length=m.seq_length,
        swiglu=m.swiglu,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        normalization=m.normalization,
        add_bias_linear=not m.disable_bias_linear,
        position_embedding_type=m.position_embedding_type,
        max_position_embeddings=m.max_position_embeddings,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
    )
    # fp16 holds the same 2-byte weights, gradients-to-be and fp32 main copies as bf16: planned as bf16.
    precision = "fp8" if args.fp8_format else ("bf16" if config.optimizer.half_precision else "fp32")
    layout = Layout(
        tensor_parallel=tp,
        pipeline_parallel=pp,
        data_parallel=world // (tp * pp),
        layers_per_virtual_stage=p.num_layers_per_virtual_pipeline_stage,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        precision=precision,
        distributed_optimizer=p.use_distributed_optimizer,
        # The training flags: --recompute-activations is selective; full without a method or a layer count
        # (which training refuses) is planned as every layer recomputed.
        recompute=config.recompute.granularity or "none",
        recompute_method=config.recompute.recompute_method or "uniform",
        recompute_num_layers=config.recompute.recompute_num_layers or 1,
        sequence_parallel=p.sequence_parallel,
        device=args.device,
    )
    return shape, layout, args


def gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_plan(shape: ModelShape, layout: Layout, result: MemoryPlan, gpu: str, mfu: float) -> str:
    """A readable table of the plan."""
    lines = [
        f"model: {shape.num_layers} layers, hidden {shape.hidden_size}, {shape.num_attention_heads} heads "
        f"({shape.groups} query groups), FFN {shape.ffn_hidden_size}, vocab {shape.vocab_size} "
        f"(padded {padded_vocab(shape, layout.tensor_parallel)}), seq {shape.seq_length}: "
        f"{result.parameters_total / 1e9:.3f} B parameters",
        f"layout: TP {layout.tensor_parallel} x PP {layout.pipeline_parallel} x DP {layout.data_parallel} = "
        f"{layout.world_size} {layout.device.upper()}s"
        + (f", {layout.layers_per_virtual_stage} layers per virtual stage" if layout.layers_per_virtual_stage else "")
        + f"; micro-batch {layout.micro_batch_size}, {layout.num_micro_batches} micro-batches per step; "
        f"{layout.precision}, distributed optimizer {'on' if layout.distributed_optimizer else 'off'}, "
        f"recompute {layout.recompute}"
        + (f" ({layout.recompute_method}, {layout.recompute_num_layers} layers)" if layout.recompute == "full" else "")
        + f", sequence parallel {'on' if layout.sequence_parallel else 'off'}",
        f"busiest rank: pipeline stage {result.peak_stage} "
        f"({result.parameters_per_rank[result.peak_stage] / 1e6:.1f} M parameters)",
        "",
        f"  {'weights':<40}{gib(result.weights)}",
        f"  {'gradients (fp32 buffer)':<40}{gib(result.gradients)}",
        f"  {'optimizer states (master + Adam m, v)':<40}{gib(result.optimizer_states)}",
        f"  {'activations':<40}{gib(result.activations)}",
        f"  {'logits and loss':<40}{gib(result.logits_and_loss)}",
    ]
    if result.attention_backward_extra:
        lines.append(f"  {'backward peak beyond logits/loss':<40}{gib(result.attention_backward_extra)}")
    lines += [
        f"  {'total':<40}{gib(result.total)}",
    ]
    if result.capacity is not None:
        lines.append(f"  {'+ reserve (context, NCCL, fragmentation)':<40}{gib(GPU_RESERVED_BYTES)}")
        verdict = "fits" if result.fits else "DOES NOT FIT"
        lines.append(f"  {gpu} {GPU_MEMORY_GB[gpu]:.0f} GB ({result.capacity / 2**30:.1f} GiB): {verdict}")
    lines.append("")
    lines.append(f"tokens per step {result.tokens_per_step:,}; model FLOPs per step {result.flops_per_step:.3e}")
    if result.step_time_s is not None:
        lines.append(f"time per step at {mfu:.0%} MFU on {layout.world_size} x {gpu} "
                     f"({GPU_PEAK_TFLOPS[gpu]:.0f} TFLOP/s bf16): {result.step_time_s:.2f} s")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        shape, layout, args = shape_and_layout(argv)
        result = plan(shape, layout, gpu=args.gpu, mfu=args.mfu)
    except PlanError as err:
        print(f"plan_memory.py: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = result.to_dict()
        out["layout"] = vars(layout)
        out["shape"] = vars(shape)
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(shape, layout, result, args.gpu, args.mfu))
    return 0
