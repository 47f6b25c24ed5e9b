"""megatron-core's GPTModel with the MiLe / focal / cross-entropy loss where it computes its LM loss.

`MileGPTModel.compute_language_model_loss` (megatron-core's loss hook, reached through the release-specific
seam of megatron_mile.megatron_core_api.model) replaces megatron's vocab-parallel cross-entropy with
megatron_mile.loss and returns, per token, the training loss (with gradient), the plain cross-entropy, the
detached weight, entropy and z-loss, packed as [b, s, 5] (megatron_mile.model.output). The training step's loss function turns
those into the exact global normalisation L = sum(w * ce) / sum(w) (megatron_mile.training.step). With
--fused-lm-head the output layer and the loss run together without materialising the logits
(megatron_mile.model.fused_output_layer), same contract.

The transformer layers are megatron-core's local modules or Transformer Engine's (--transformer-impl), with
FP8 and the fused kernels megatron_mile.kernels resolves for this machine; the output layer is megatron's
ColumnParallelLinear either way (never FP8: bf16 logits, upcast to fp32 statistics inside the loss).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.utils import unwrap_model

from megatron_mile import device, kernels, parallel
from megatron_mile.config import RunConfig
from megatron_mile.loss import LossSpec, vocab_parallel_weighted_cross_entropy
from megatron_mile.megatron_core_api.model import GPTModelWithLossHook
from megatron_mile.model.fused_output_layer import fused_language_model_loss
from megatron_mile.model.output import pack_token_losses
from megatron_mile.vocab import padded_vocab_size


class MileGPTModel(GPTModelWithLossHook):
    """GPTModel whose language-model loss is the weighted vocab-parallel loss of megatron_mile.loss."""

    def __init__(self, *args, loss_spec: LossSpec, real_vocab_size: int, fused_lm_head: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if fused_lm_head and self.config.mtp_num_layers:
            raise ValueError("the fused LM head does not cover multi-token prediction layers")
        _check_loss_spec(loss_spec, fused_lm_head, self.config.mtp_num_layers)
        # Output layer + loss in chunks, without the [s, b, V/tp] logits (megatron_mile.model.fused_output_layer).
        self.fused_lm_head = fused_lm_head
        self.loss_spec = loss_spec
        self.real_vocab_size = real_vocab_size
        # Compute the entropy for logging even when the loss does not need it. Written once per step, by
        # request_entropy (the training step and the evaluators), never per micro-batch.
        self.entropy_requested = False

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """labels [b, s], logits [s, b, V/tp] -> [b, s, 5]: loss (with gradient), ce, weight, entropy, z-loss.

        Collectives: those of vocab_parallel_weighted_cross_entropy on the TP group (MAX, one SUM); with a
        selection weighting also its threshold's, on the data-parallel x context-parallel group (the group
        that holds the rest of this micro-batch: every DP rank computes micro-batch i of a step in the same
        schedule position).
        """
        labels = labels.transpose(0, 1).contiguous()  # [s, b]
        loss_mask = token_group = None
        if self.loss_spec.needs_token_scope:
            # A weighting that selects among the counted tokens needs the micro-batch's mask (the seam holds
            # it while megatron computes the loss: megatron_mile.megatron_core_api.model).
            if self.loss_mask_in_flight is not None:
                loss_mask = self.loss_mask_in_flight.transpose(0, 1)  # [s, b]
            token_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        losses = vocab_parallel_weighted_cross_entropy(
            logits,
            labels,
            self.loss_spec,
            self.real_vocab_size,
            ignore_index=None,  # megatron's datasets mask with loss_mask, never with an ignore id
            tp_group=self.pg_collection.tp,
            compute_entropy=self.entropy_requested,
            # fp32 logits come straight from the output layer and die here: let backward reuse them.
            reuse_logits_for_grad=True,
            loss_mask=loss_mask,
            token_group=token_group,
        )
        return pack_token_losses(losses)

    def fused_output(self, hidden_states, labels, loss_mask) -> Optional[torch.Tensor]:
        """With fused_lm_head, the output layer and the loss as one (the seam calls it for a forward with
        labels outside inference); None takes megatron's output layer and compute_language_model_loss.
        Collectives: those of megatron_mile.model.fused_output_layer.fused_language_model_loss."""
        if not self.fused_lm_head:
            return None
        return fused_language_model_loss(self, hidden_states, labels, loss_mask)


def _check_loss_spec(spec: LossSpec, fused_lm_head: bool, mtp_num_layers) -> None:
    """ValueError when the model cannot train `spec`: a selection weighting (spec.needs_token_scope) needs
    the whole micro-batch's statistics before any gradient, and the micro-batch's own loss mask."""
    if not spec.needs_token_scope:
        return
    if fused_lm_head:
        raise ValueError(f"--fused-lm-head cannot train {spec.loss_type}: it forms each chunk's gradient before "
                         "the micro-batch's selection threshold is known")
    if mtp_num_layers:
        # megatron's MTP losses go through compute_language_model_loss with a shifted mask it does not pass.
        raise ValueError(f"{spec.loss_type} does not cover multi-token prediction layers")


def _loss_chunks(model: Iterable) -> list:
    """The MileGPTModel chunks inside `model` (a chunk list, wrapped or not); pipeline stages without the
    output layer included (they hold the attributes, and a later layout change must not miss one)."""
    chunks = unwrap_model(list(model))
    return [chunk for chunk in chunks if isinstance(chunk, MileGPTModel)]


def request_entropy(model: Iterable, requested: bool) -> None:
    """Ask every chunk of `model` to compute (or not) the entropy for logging this step.

    The one writer of MileGPTModel.entropy_requested: called once per training step or evaluation pass,
    before megatron's schedules run. A weighting that needs the entropy computes it regardless.
    """
    for chunk in _loss_chunks(model):
        chunk.entropy_requested = requested


def set_loss_spec(model: Iterable, spec: LossSpec) -> None:
    """Train `model` with another loss from now on (benchmarks compare loss types on one model)."""
    for chunk in _loss_chunks(model):
        _check_loss_spec(spec, chunk.fused_lm_head, chunk.config.mtp_num_layers)
        chunk.loss_spec = spec


class SeededTransformerLayer(TransformerLayer):
    """A TransformerLayer whose CPU-initialised weights depend on the seed and its global layer number only.

    megatron initialises weights from one RNG stream in build order, so a pipeline stage that builds
    layers 3-4 would draw what a single stage draws for layers 1-2. Re-seeding the default generator from
    (seed, layer_number) before each layer makes the initial model the same at every TP/PP layout (with
    use_cpu_initialization, the full master weight is drawn and split, so TP does not matter either).
    The layer before the output layer is the last one at every layout, so the output layer matches too.
    """

    init_seed: int = 1234

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, pg_collection=None,
                 vp_stage=None):
        # megatron passes the stage-local number; the offset makes it global (as TransformerLayer does).
        offset = get_transformer_layer_offset(config, vp_stage, parallel_state.get_pipeline_model_parallel_rank())
        torch.manual_seed(self.init_seed * 1000 + layer_number + offset)
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)


def transformer_config(config: RunConfig) -> TransformerConfig:
    """megatron-core's TransformerConfig for this run: FP8 as asked, each fusion where its kernel exists
    (megatron_mile.kernels; all of them off on CPU)."""
    m, p, o, k, r = config.model, config.parallel, config.optimizer, config.kernels, config.recompute
    on_gpu = device.gpu_available()
    dtype = torch.bfloat16 if o.bf16 else torch.float16 if o.fp16 else torch.float32
    fusions = kernels.resolve_fusions(config, on_gpu, kernels.detect_kernel_support(on_gpu))
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=not m.disable_bias_linear,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        kv_channels=m.kv_channels,
        qk_layernorm=m.qk_layernorm,
        add_qkv_bias=m.add_qkv_bias,
        attention_softmax_in_fp32=m.attention_softmax_in_fp32,
        layernorm_zero_centered_gamma=m.apply_layernorm_1p,
        attention_backend=AttnBackend[m.attention_backend],
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_size(
            m.num_layers, p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
        ),
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        tp_comm_overlap=p.tp_comm_overlap,
        # Activation recomputation: megatron replays the saved RNG states, so dropout masks repeat exactly.
        recompute_granularity=r.granularity,
        recompute_method=r.recompute_method,
        recompute_num_layers=r.recompute_num_layers,
        recompute_modules=list(r.recompute_modules) if r.recompute_modules else None,
        bf16=o.bf16,
        fp16=o.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Weights are created on the CPU from one full-size master tensor, split across TP ranks, so a
        # given seed gives the same model at every TP size (and no CUDA is needed to build it).
        use_cpu_initialization=not on_gpu,
        # Fusions that need CUDA kernels, apex or Transformer Engine; on CPU they would fail or torch.compile.
        **fusions,
        persist_layer_norm=False,
        # FP8 in the transformer layers only (Transformer Engine); megatron's defaults where a flag is unset.
        fp8=k.fp8_format,
        fp8_recipe=k.fp8_recipe or "delayed",
        fp8_margin=0 if k.fp8_margin is None else k.fp8_margin,
        fp8_amax_history_len=1 if k.fp8_amax_history_len is None else k.fp8_amax_history_len,
        fp8_amax_compute_algo=k.fp8_amax_compute_algo or "most_recent",
        fp8_param=k.fp8_param_gather,  # as Megatron-LM: fp8 weights go with the fp8 parameter all-gather
        # The schedules must not divide by their own token count: the loss function returns
        # un-normalised sums and the gradients are divided once by the global weight total.
        calculate_per_token_loss=True,
    )


def build_model_chunk(
    config: RunConfig,
    tf_config: TransformerConfig,
    real_vocab_size: int,
    pre_process: bool,
    post_process: bool,
    vp_stage: Optional[int] = None,
) -> MileGPTModel:
    """One model chunk (a pipeline stage, or one virtual stage of it)."""
    m = config.model
    spec = transformer_layer_spec(config)
    if spec.module is TransformerLayer:
        spec.module = type("SeededTransformerLayer", (SeededTransformerLayer,), {"init_seed": config.training.seed})
    return MileGPTModel(
        config=tf_config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(
            real_vocab_size, config.parallel.tensor_model_parallel_size, m.make_vocab_size_divisible_by
        ),
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_base=m.rotary_base,
        rotary_percent=m.rotary_percent,
        seq_len_interpolation_factor=m.rotary_seq_len_interpolation_factor,
        rope_scaling=m.use_rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor if m.use_rope_scaling else 8.0,  # read only with rope_scaling
        vp_stage=vp_stage,
        loss_spec=LossSpec.from_config(config.loss),
        real_vocab_size=real_vocab_size,
        fused_lm_head=config.kernels.fused_lm_head,
    )


def transformer_layer_spec(config: RunConfig):
    """megatron-core's layer spec for --transformer-impl: its local modules, or Transformer Engine's (the
    norm fused into the following linear layer; TE picks RMSNorm / LayerNorm from the config)."""
    if config.kernels.transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=config.model.normalization, qk_layernorm=config.model.qk_layernorm)


def build_model(config: RunConfig, real_vocab_size: int) -> list:
    """The model chunks this rank holds (one, or several with a virtual pipeline), on the compute device."""
    tf_config = transformer_config(config)
    vp_size = tf_config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunk = build_model_chunk(config, tf_config, real_vocab_size, pre, post, stage)
        chunk.model_type = getattr(chunk, "model_type", None)
        chunks.append(chunk.to(device.compute_device()))
    return chunks
