"""Start-up checks of the options megatron-core would reject late, or take and silently not apply:
activation recomputation, overlapped data-parallel communication and document-aware masking.

Each function returns one message per problem, naming the flag, why it cannot work and what to use instead;
`RunConfig.validate` collects them with every other problem (GPU-only features are checked in
megatron_mile.kernels). The rules are Megatron-LM's (megatron/training/arguments.py validate_args and
megatron-core's TransformerConfig.__post_init__) plus the cases where Megatron-LM would accept a flag that
has no effect on this model, which this project refuses instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

if TYPE_CHECKING:  # config imports this module; at run time the config object is passed in
    from megatron_mile.config import RunConfig

# megatron-core's selective-recomputation submodules that belong to layers this GPT model does not have.
_MODULES_OF_ABSENT_LAYERS = {
    "moe_act": "mixture-of-experts layers",
    "moe": "mixture-of-experts layers",
    "shared_experts": "mixture-of-experts layers",
    "mla_up_proj": "multi-latent attention",
}


def config_problems(config: "RunConfig") -> List[str]:
    """Every problem of the recomputation, data-parallel overlap and document-masking flags."""
    return recompute_problems(config) + data_parallel_problems(config) + document_masking_problems(config)


def recompute_problems(config: "RunConfig") -> List[str]:
    """--recompute-* as Megatron-LM validates them (full needs a method and a layer count, selective takes
    neither), and recompute modules that would recompute nothing in this model."""
    r, m = config.recompute, config.model
    problems: List[str] = []
    granularity = r.granularity
    if r.recompute_activations and r.recompute_granularity == "full":
        problems.append("--recompute-activations means --recompute-granularity selective, but "
                        "--recompute-granularity full is given too: keep one of them")
    if granularity is None:
        given = [flag for flag, value in (("--recompute-method", r.recompute_method),
                                          ("--recompute-num-layers", r.recompute_num_layers),
                                          ("--recompute-modules", r.recompute_modules)) if value is not None]
        if given:
            problems.append(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to activation "
                            "recomputation only: add --recompute-granularity full (method, layers) or selective "
                            "(modules), or drop them")
        return problems

    pp = max(config.parallel.pipeline_model_parallel_size, 1)
    vl = config.parallel.num_layers_per_virtual_pipeline_stage
    # The layers one model chunk holds: what megatron's TransformerBlock recomputes over.
    chunk_layers = vl if vl is not None else m.num_layers // pp
    if granularity == "full":
        if r.recompute_method is None:
            problems.append("--recompute-granularity full needs --recompute-method uniform (groups of "
                            "--recompute-num-layers layers) or block (the first --recompute-num-layers layers "
                            "of each pipeline stage)")
        if r.recompute_num_layers is None:
            problems.append(f"--recompute-granularity full needs --recompute-num-layers, between 1 and the layers "
                            f"of a pipeline stage ({chunk_layers}); 1 with --recompute-method uniform recomputes "
                            "every layer")
        elif r.recompute_num_layers >= 1 and chunk_layers >= 1:
            if r.recompute_num_layers > chunk_layers:
                problems.append(f"--recompute-num-layers {r.recompute_num_layers} exceeds the {chunk_layers} "
                                f"layers of a {'virtual ' if vl is not None else ''}pipeline stage: use at most "
                                f"{chunk_layers}")
            elif r.recompute_method == "uniform" and chunk_layers % r.recompute_num_layers:
                problems.append(f"--recompute-method uniform needs --recompute-num-layers {r.recompute_num_layers} "
                                f"to divide the {chunk_layers} layers of a pipeline stage: use a divisor of "
                                f"{chunk_layers}, or --recompute-method block")
        if r.recompute_modules is not None:
            problems.append("--recompute-modules chooses what selective recomputation recomputes; full "
                            "recomputation recomputes whole layers: drop --recompute-modules or use "
                            "--recompute-granularity selective")
        return problems

    # selective
    if r.recompute_method is not None or r.recompute_num_layers is not None:
        problems.append("selective recomputation recomputes --recompute-modules in every layer and takes no "
                        "--recompute-method / --recompute-num-layers (as Megatron-LM): drop them, or use "
                        "--recompute-granularity full")
    for module in r.recompute_modules or ():
        if module in _MODULES_OF_ABSENT_LAYERS:
            problems.append(f"--recompute-modules {module} recomputes part of {_MODULES_OF_ABSENT_LAYERS[module]}, "
                            "which this GPT model does not have: use core_attn, mlp or layernorm")
    if "layernorm" in (r.recompute_modules or ()) and config.kernels.transformer_impl == "transformer_engine":
        problems.append("--recompute-modules layernorm recomputes megatron-core's separate norm modules, but "
                        "Transformer Engine fuses each norm into the linear layer after it, so there is nothing "
                        "to recompute: drop layernorm, or use --transformer-impl local")
    return problems


def data_parallel_problems(config: "RunConfig") -> List[str]:
    """--overlap-grad-reduce / --overlap-param-gather / --ddp-* combinations (Megatron-LM's rules), and the
    averaging collective, which the weighted loss's exact normalisation cannot use."""
    p = config.parallel
    problems: List[str] = []
    if p.overlap_param_gather:
        missing = [flag for flag, on in (("--use-distributed-optimizer", p.use_distributed_optimizer),
                                         ("--overlap-grad-reduce", p.overlap_grad_reduce)) if not on]
        if missing:
            problems.append(f"--overlap-param-gather needs {' and '.join(missing)}: it overlaps the distributed "
                            "optimizer's parameter all-gather, which follows the overlapped gradient "
                            "reduce-scatter; add them or drop --overlap-param-gather")
    if p.ddp_bucket_size is not None and not p.overlap_grad_reduce:
        problems.append("--ddp-bucket-size sizes the buckets that --overlap-grad-reduce reduces during backward; "
                        "without it the gradients are reduced in one piece: add --overlap-grad-reduce or drop "
                        "--ddp-bucket-size")
    if p.ddp_average_in_collective:
        problems.append("--ddp-average-in-collective cannot be used: the MiLe / focal / cross-entropy loss is "
                        "normalised by the global weight sum, so gradients are summed over data-parallel ranks "
                        "and divided once by that sum after the reduction (megatron-core's per-token-loss mode, "
                        "which refuses averaging collectives); drop the flag")
    return problems


def document_masking_problems(config: "RunConfig") -> List[str]:
    """--reset-position-ids / --reset-attention-mask where they would reach no part of this model."""
    d, m, k = config.data, config.model, config.kernels
    problems: List[str] = []
    if d.reset_position_ids and m.position_embedding_type != "learned_absolute":
        problems.append(f"--reset-position-ids needs --position-embedding-type learned_absolute: with "
                        f"{m.position_embedding_type} megatron-core's GPT model does not read position ids "
                        "(rotary embeddings take positions 0..s-1); drop the flag (--reset-attention-mask "
                        "still separates the documents)")
    if d.reset_attention_mask:
        if not d.create_attention_mask_in_dataloader:
            problems.append("--reset-attention-mask resets the attention mask the data loader builds, but "
                            "--no-create-attention-mask-in-dataloader builds none: drop one of them")
        if k.transformer_impl == "transformer_engine":
            problems.append("--reset-attention-mask needs --transformer-impl local: Transformer Engine's causal "
                            "attention takes no explicit mask and would let documents attend to each other")
    return problems
