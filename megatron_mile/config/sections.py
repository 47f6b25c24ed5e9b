"""The model, parallelism, loss, optimizer and data sections of a run's configuration: dataclasses with a
docstring per field, from which the command-line flags derive (megatron_mile.arguments). Field names are
Megatron-LM's flags spelled with underscores. The training-loop section is in training.py, the layer
implementation and recomputation sections in layers.py."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional

from megatron_mile.config.fields import flag
from megatron_mile.data.tokenizers import TIKTOKEN_PATTERNS, TOKENIZER_TYPES
from megatron_mile.loss.spec import LOSS_TYPES


@dataclass
class ModelConfig:
    """Transformer shape and regularisation (LLaMA-style when the RMSNorm/SwiGLU/rope flags are set)."""

    # The shape flags Megatron-LM requires have no default here either (megatron_mile.arguments.REQUIRED_FLAGS).
    num_layers: Optional[int] = None
    """Number of transformer layers. Required."""
    hidden_size: Optional[int] = None
    """Transformer hidden size. Required."""
    ffn_hidden_size: Optional[int] = None
    """MLP hidden size. Default: 4 * hidden_size (LLaMA uses about 8/3 * hidden_size with --swiglu)."""
    num_attention_heads: Optional[int] = None
    """Number of attention heads; must divide hidden_size and be divisible by the TP size. Required."""
    group_query_attention: bool = False
    """Use grouped-query attention with --num-query-groups key/value heads."""
    num_query_groups: int = 1
    """Key/value head groups with --group-query-attention."""
    seq_length: Optional[int] = None
    """Tokens per training sample. Required."""
    max_position_embeddings: Optional[int] = None
    """Largest position the model supports. Default: --seq-length."""
    normalization: str = flag("LayerNorm", choices=["LayerNorm", "RMSNorm"])
    """Normalisation layer type."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""
    swiglu: bool = False
    """Gated SiLU MLP (SwiGLU), as LLaMA."""
    disable_bias_linear: bool = False
    """No bias in linear layers, as LLaMA."""
    position_embedding_type: str = flag("learned_absolute", choices=["learned_absolute", "rope", "none"])
    """Position embedding type; LLaMA uses rope."""
    rotary_base: int = 10000
    """Base period of the rotary position embeddings."""
    use_rotary_position_embeddings: bool = False
    """Megatron-LM's older spelling of --position-embedding-type rope (it sets that)."""
    rotary_seq_len_interpolation_factor: Optional[float] = None
    """Rope: divide the positions by this factor (linear position interpolation, to run longer sequences
    than trained with; megatron-core's seq_len_interpolation_factor). Default: none."""
    use_rope_scaling: bool = False
    """Rope: scale the frequencies as Llama 3.x does (wavelengths above 8192 positions divided by
    --rope-scaling-factor, those below 2048 kept, a smooth blend between; megatron-core's rope_scaling)."""
    rope_scaling_factor: Optional[float] = None
    """The factor of --use-rope-scaling. Default: 8.0."""
    untie_embeddings_and_output_weights: bool = False
    """Separate input embedding and output layer weights, as LLaMA."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation (the paper uses 0.01)."""
    hidden_dropout: float = 0.1
    """Dropout probability after attention and MLP."""
    attention_dropout: float = 0.1
    """Dropout probability on attention scores."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the TP size (padding takes no part in the loss)."""
    # More of Megatron-LM's architecture flags (same names, defaults and meaning).
    kv_channels: Optional[int] = None
    """Projection size of each attention head (queries, keys, values). Default: hidden size / heads."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions rotated by the rotary position embedding."""
    qk_layernorm: bool = False
    """Normalise queries and keys (per head, with --normalization) before the attention product."""
    add_qkv_bias: bool = False
    """Bias in the query/key/value projection even with --disable-bias-linear (as Qwen)."""
    attention_softmax_in_fp32: bool = False
    """Compute the attention softmax in fp32 under --bf16 (the local attention's scaled softmax)."""
    apply_layernorm_1p: bool = False
    """Norm weights stored as (gamma - 1), zero-centred, for weight decay and stability (Transformer Engine or
    apex's fused LayerNorm: GPU)."""
    attention_backend: str = flag("auto", choices=["auto", "local", "unfused", "fused", "flash"])
    """Attention implementation: auto picks the fastest available; local/unfused are megatron-core's own
    (CPU and GPU); fused (cuDNN) and flash need Transformer Engine on a GPU."""
    use_flash_attn: bool = False
    """FlashAttention (Megatron-LM's switch from before --attention-backend): --attention-backend flash
    (Transformer Engine on a GPU)."""


@dataclass
class ParallelConfig:
    """How the model and data are split across processes (data parallel size = world / (TP * PP))."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size: attention heads, MLP and the vocabulary are split across this many ranks."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size: the layers are split into this many stages."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per virtual pipeline stage (interleaved 1F1B schedule); needs PP > 1."""
    sequence_parallel: bool = False
    """Split layer norms and dropout along the sequence over the TP group (GPUs, TP > 1; with RMSNorm it
    needs --transformer-impl transformer_engine, with LayerNorm Transformer Engine or apex)."""
    context_parallel_size: int = 1
    """Context-parallel size: each sequence's tokens split over this many ranks (Transformer Engine's ring
    attention, GPUs); data parallel size = world / (TP * PP * CP)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states and fp32 main weights across data-parallel ranks (ZeRO-1)."""
    distributed_backend: Optional[str] = flag(None, choices=["nccl", "gloo"])
    """Process-group backend. Default: nccl on GPUs, gloo on CPU."""
    overlap_grad_reduce: bool = False
    """Reduce each gradient bucket over data-parallel ranks as soon as the last micro-batch's backward fills
    it (the MiLe normalisation stays exact: docs/scale.md)."""
    align_grad_reduce: bool = flag(True, action=argparse.BooleanOptionalAction)
    """With --overlap-grad-reduce and PP: stages after the first launch their bucket reductions together
    after their last backward (Megatron-LM's default); --no-align-grad-reduce: each during its backward."""
    overlap_param_gather: bool = False
    """With --use-distributed-optimizer and --overlap-grad-reduce: all-gather the updated parameters bucket
    by bucket during the next forward instead of after the optimizer step."""
    align_param_gather: bool = flag(True, action=argparse.BooleanOptionalAction)
    """With --overlap-param-gather and the interleaved schedule (only there, as in Megatron-LM): stages launch
    their first all-gathers together (default); --no-align-param-gather: each when its forward needs them."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient bucket with --overlap-grad-reduce. Default: max(40M, 1M * DP), megatron's."""
    ddp_average_in_collective: bool = False
    """Average gradients in the data-parallel collective. Refused: the weighted loss sums them and divides
    once by the global weight sum (docs/scale.md)."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with the GEMMs (Transformer Engine userbuffers; GPUs, needs
    --sequence-parallel and --transformer-impl transformer_engine)."""


@dataclass
class LossConfig:
    """The training objective. `lm loss` is always logged as plain cross-entropy, whatever is trained."""

    loss_type: str = flag("cross_entropy", choices=list(LOSS_TYPES))
    """cross_entropy, focal (weights (1 - p_target)^gamma), mile (weights (sigma + entropy)^gamma), dft
    (weights p_target), or a token selection: entropy_selection / ce_selection (weight 1 for the
    --selection-fraction highest-entropy / highest-cross-entropy loss-masked tokens of each micro-batch, 0 for
    the others). docs/loss-internals.md: adding another."""
    mile_gamma: Optional[float] = None
    """MiLe exponent gamma (default 1.0, as in the paper); 0 gives cross-entropy."""
    mile_sigma: Optional[float] = None
    """MiLe offset sigma > 0 (default 1.0, as in the paper)."""
    mile_entropy_threshold: Optional[float] = None
    """MiLe variant: tokens whose normalised entropy H / ln(V) is below this get weight 1. Off by default."""
    focal_gamma: Optional[float] = None
    """Focal-loss exponent gamma (default 1.0)."""
    label_smoothing: float = 0.0
    """Label smoothing alpha in [0, 1) as megatron-core defines it (1 - alpha on the target, alpha spread over
    the other tokens); with any --loss-type."""
    z_loss_coeff: float = 0.0
    """z-loss coefficient: adds coeff * log(Z)^2 per token (PaLM uses 1e-4), weighted and normalised as the
    main loss, logged as `z loss`; with any --loss-type."""
    selection_fraction: Optional[float] = None
    """entropy_selection / ce_selection: the share k in (0, 1] of each micro-batch's loss-masked tokens
    (over all data-parallel ranks) that is trained on (default 0.6, the share Rho-1 keeps); docs/mile-loss.md."""

    @property
    def gamma(self) -> float:
        if self.loss_type == "mile":
            return 1.0 if self.mile_gamma is None else self.mile_gamma
        if self.loss_type == "focal":
            return 1.0 if self.focal_gamma is None else self.focal_gamma
        return 0.0

    @property
    def sigma(self) -> float:
        return 1.0 if self.mile_sigma is None else self.mile_sigma


@dataclass
class OptimizerConfig:
    """Adam with warmup and decay, gradient clipping and mixed precision."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: str = flag("linear", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    """Learning-rate decay after warmup."""
    lr_warmup_iters: int = 0
    """Iterations of linear warmup from 0 to --lr."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the learning rate decays. Default: --train-iters."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2 (the paper uses 0.95)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    bf16: bool = False
    """bf16 model and activations with fp32 main weights and gradients in the optimizer."""
    fp16: bool = False
    """fp16 model and activations with fp32 main weights and gradients in the optimizer, and loss scaling:
    the loss is multiplied by the loss scale before backward and the gradients divided by it after; a step
    whose gradients overflow is skipped (megatron-core's mixed-precision optimizer and grad scaler)."""
    loss_scale: Optional[float] = None
    """Static loss scale with --fp16 (positive; powers of 2 are exact). Default: dynamic loss scaling."""
    initial_loss_scale: float = 2.0 ** 32
    """Dynamic loss scaling: the loss scale of the first step."""
    min_loss_scale: float = 1.0
    """Dynamic loss scaling: the loss scale never goes below this."""
    loss_scale_window: float = 1000
    """Dynamic loss scaling: the loss scale doubles after this many consecutive steps without overflow
    (Megatron-LM's float; counted in whole steps)."""
    hysteresis: int = 2
    """Dynamic loss scaling: overflowing steps tolerated before the loss scale is halved; after that each
    overflow halves it, until the scale next grows (--loss-scale-window clean steps) and restores the tolerance."""
    accumulate_allreduce_grads_in_fp32: bool = False
    """Accumulate and all-reduce gradients in fp32: always so here (--fp16 included) unless --grad-reduce-in-bf16."""
    grad_reduce_in_bf16: bool = False
    """With --bf16: accumulate and reduce gradients in bf16 (half the traffic; sums lose precision)."""

    # Megatron-LM's schedule and optimizer flags (same names, defaults and units). The schedule counts
    # samples, as Megatron-LM's does: iteration flags are multiplied by --global-batch-size.
    optimizer: str = flag("adam", choices=["adam", "sgd"])
    """Optimizer: Adam with decoupled weight decay (AdamW), or SGD with --sgd-momentum."""
    sgd_momentum: float = 0.9
    """SGD momentum (--optimizer sgd)."""
    lr_warmup_fraction: Optional[float] = None
    """Fraction of the decay length (--lr-decay-iters / --lr-decay-samples) to warm up over; replaces
    --lr-warmup-iters / --lr-warmup-samples."""
    lr_warmup_samples: int = 0
    """Samples of linear warmup (with --train-samples)."""
    lr_warmup_init: float = 0.0
    """Learning rate at the start of the warmup."""
    lr_decay_samples: Optional[int] = None
    """Samples over which the learning rate decays (with --train-samples). Default: --train-samples."""
    lr_wsd_decay_style: str = flag("exponential", choices=["exponential", "linear", "cosine", "minus_sqrt"])
    """Shape of the final anneal of --lr-decay-style WSD."""
    lr_wsd_decay_iters: Optional[int] = None
    """--lr-decay-style WSD: iterations of the final anneal; the learning rate stays at --lr before it."""
    lr_wsd_decay_samples: Optional[int] = None
    """--lr-decay-style WSD with --train-samples: samples of the final anneal."""
    start_weight_decay: Optional[float] = None
    """Weight decay at the start of training (with --weight-decay-incr-style). Default: --weight-decay."""
    end_weight_decay: Optional[float] = None
    """Weight decay at the end of training (with --weight-decay-incr-style). Default: --weight-decay."""
    weight_decay_incr_style: str = flag("constant", choices=["constant", "linear", "cosine"])
    """How weight decay moves from --start-weight-decay to --end-weight-decay over training."""
    decoupled_lr: Optional[float] = None
    """A separate peak learning rate for the input embedding and output layer. Default: --lr."""
    decoupled_min_lr: Optional[float] = None
    """The minimum learning rate of the input embedding and output layer with --decoupled-lr."""

    @property
    def half_precision(self) -> bool:
        """Whether the model runs in half precision (--bf16 or --fp16: Float16Module, fp32 main weights)."""
        return self.bf16 or self.fp16


@dataclass
class DataConfig:
    """Where samples come from and how text becomes token ids."""

    data_path: Optional[List[str]] = flag(None, nargs="*")
    """Dataset prefixes (without .bin/.idx), optionally weighted: `w1 prefix1 w2 prefix2 ...`; split into
    training, validation and test samples by --split."""
    split: Optional[str] = None
    """Train/validation/test proportions of each --data-path dataset, comma-separated. Default: 969, 30, 1
    (not with the per-split data paths)."""
    data_args_path: Optional[str] = None
    """A text file holding the --data-path value (whitespace-separated), for blends too long for a command
    line; instead of --data-path."""
    train_data_path: Optional[List[str]] = flag(None, nargs="*")
    """Training datasets as one blend, as --data-path but not split: with --valid-data-path and
    --test-data-path, instead of --data-path and --split."""
    valid_data_path: Optional[List[str]] = flag(None, nargs="*")
    """Validation datasets as one blend (whole datasets; see --train-data-path)."""
    test_data_path: Optional[List[str]] = flag(None, nargs="*")
    """Test datasets as one blend, evaluated with --eval-iters global batches at the end of training (as
    Megatron-LM does)."""
    per_split_data_args_path: Optional[str] = None
    """A JSON file {"train": [...], "valid": [...], "test": [...]} holding the --train/valid/test-data-path
    values (each a list of strings or one whitespace-separated string); instead of those flags."""
    dataloader_type: str = flag("single", choices=["single", "cyclic", "external"])
    """single: each data-parallel rank reads its consecutive micro-batches of each global batch in order
    (Megatron-LM's pretraining sampler); cyclic: a random permutation per epoch of the dataset (Megatron-LM's
    random sampler, seeded by the epoch number), repeating over epochs; external is refused (it hands
    Megatron-LM the dataset as the user's own data loader)."""
    data_sharding: bool = flag(True, action=argparse.BooleanOptionalAction)
    """--dataloader-type cyclic: each data-parallel rank permutes its own contiguous share of the samples
    (Megatron-LM's default); --no-data-sharding: one permutation of all samples, dealt out to the ranks."""
    num_dataset_builder_threads: int = 1
    """Threads per rank that build the blended datasets' indices (megatron-core's dataset builder; rank 0
    builds first with up to twice as many on GPUs)."""
    mock_data: bool = False
    """Train on megatron-core's synthetic dataset (no files needed; use with --tokenizer-type NullTokenizer)."""
    data_cache_path: Optional[str] = None
    """Where dataset index caches are written. Default: beside the data."""
    num_workers: int = 0
    """Data-loader worker processes (a torch DataLoader reads and collates samples in them); 0 reads in the
    training process."""
    mmap_bin_files: bool = flag(True, action=argparse.BooleanOptionalAction)
    """Memory-map the datasets' .bin files (--no-mmap-bin-files reads them with file reads instead)."""
    tokenizer_type: Optional[str] = flag(None, choices=list(TOKENIZER_TYPES))
    """Tokenizer type (Megatron-LM's names; megatron_mile.data.tokenizers says what each one does)."""
    tokenizer_model: Optional[str] = None
    """tokenizer.json (HuggingFaceTokenizer), .model file (SentencePieceTokenizer, GPTSentencePieceTokenizer,
    Llama2Tokenizer) or JSON vocabulary (TikTokenizer)."""
    tiktoken_pattern: Optional[str] = flag(None, choices=sorted(TIKTOKEN_PATTERNS))
    """TikTokenizer: its pre-tokenisation regex, v1 or v2 (required there; other tokenizers do not read it,
    as in Megatron-LM)."""
    tiktoken_num_special_tokens: int = 1000
    """TikTokenizer: ids 0 .. N-1 are special tokens (<unk>, <s>, </s>, fillers); the vocabulary's follow."""
    vocab_file: Optional[str] = None
    """GPT2BPETokenizer vocabulary (vocab.json)."""
    merge_file: Optional[str] = None
    """GPT2BPETokenizer merges (merges.txt)."""
    vocab_size: Optional[int] = None
    """Vocabulary size for NullTokenizer (ids before its EOD) and TikTokenizer (default 2**17)."""
    eod_mask_loss: bool = False
    """Loss mask 0 where the input token is the end-of-document token (the next document's first token is not
    predictable from the previous one): no loss there and no part in the MiLe / focal weights' sum."""
    reset_position_ids: bool = False
    """Restart the position ids at 0 after each end-of-document token (needs --position-embedding-type
    learned_absolute: megatron-core's rotary embeddings do not read position ids)."""
    reset_attention_mask: bool = False
    """Let tokens attend only to earlier tokens of their own document (block-diagonal causal mask built by
    the data loader; megatron-core's local attention without the fused masked softmax)."""
    create_attention_mask_in_dataloader: bool = flag(True, action=argparse.BooleanOptionalAction)
    """Build each sample's [1, s, s] attention mask in the data loader for the model (Megatron-LM's default);
    --no-create-attention-mask-in-dataloader leaves causal masking to the attention kernel."""
