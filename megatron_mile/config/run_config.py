"""RunConfig: every section of one training run, the defaults that depend on other fields (finalize), and
the start-up check of the whole (validate, in megatron_mile.config.checks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from megatron_mile import kernels
from megatron_mile.config.checks import ConfigError, config_problems, rampup_problems
from megatron_mile.config.layers import KernelConfig, RecomputeConfig
from megatron_mile.config.sections import DataConfig, LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_mile.config.training import TrainingConfig
from megatron_mile.training.batch_size import train_iters_for_samples


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)

    SECTIONS = ("model", "parallel", "loss", "optimizer", "data", "training", "kernels", "recompute")
    # Log lines for the Megatron-LM flags the run set that the project provides by construction
    # (megatron_mile.megatron_lm_flags); not a section: they configure nothing.
    notes: List[str] = field(default_factory=list)

    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model and one data shard: TP * PP * CP."""
        p = self.parallel
        return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size()

    def finalize(self, world_size: int, gpu_available: Optional[bool] = None,
                 kernel_support: Optional[kernels.KernelSupport] = None) -> None:
        """Fill defaults that depend on other fields (done before validate).

        gpu_available / kernel_support: the machine the run is for, as validate takes them (default: this
        one's); they decide the default --transformer-impl.
        """
        m, t = self.model, self.training
        if self.kernels.transformer_impl is None:
            self._resolve_transformer_impl(gpu_available, kernel_support)
        if self.parallel.sequence_parallel and self.parallel.tensor_model_parallel_size == 1:
            # As Megatron-LM: sequence parallelism splits activations over TP ranks; with one it is turned off.
            self.parallel.sequence_parallel = False
            self.notes.append("--sequence-parallel turned off: it needs --tensor-model-parallel-size > 1 "
                              "(as Megatron-LM does)")
        if t.exit_signal_handler and t.exit_signal is None:
            t.exit_signal = "SIGTERM"  # Megatron-LM's default --exit-signal
        if m.use_rotary_position_embeddings:
            m.position_embedding_type = "rope"  # as Megatron-LM: the older spelling wins
        if m.use_rope_scaling and m.rope_scaling_factor is None:
            m.rope_scaling_factor = 8.0  # Megatron-LM's default --rope-scaling-factor
        if m.use_flash_attn and m.attention_backend == "auto":
            m.attention_backend = "flash"
            self.notes.append("--use-flash-attn: --attention-backend flash (megatron-core's FlashAttention via "
                              "Transformer Engine)")
        # Unset required flags (a config built without parse_args, e.g. a model only) stay unset.
        if m.ffn_hidden_size is None and m.hidden_size is not None:
            m.ffn_hidden_size = 4 * m.hidden_size
        if m.max_position_embeddings is None:
            m.max_position_embeddings = m.seq_length
        if not m.group_query_attention:
            m.num_query_groups = m.num_attention_heads
        dp = max(1, self.data_parallel_size(world_size))
        if t.global_batch_size is None and t.micro_batch_size is not None:
            t.global_batch_size = t.micro_batch_size * dp
        d = self.data
        per_split = any((d.train_data_path, d.valid_data_path, d.test_data_path, d.per_split_data_args_path))
        if d.split is None and not per_split:
            d.split = "969, 30, 1"  # Megatron-LM's (legacy) default with --data-path
        if d.tokenizer_type is None and d.vocab_file and d.merge_file:
            d.tokenizer_type = "GPT2BPETokenizer"  # as Megatron-LM's GPT-3 script: a BPE vocabulary and merges
        if d.tiktoken_pattern is not None and d.tokenizer_type != "TikTokenizer":
            self.notes.append(f"--tiktoken-pattern {d.tiktoken_pattern}: only TikTokenizer reads it; unused with "
                              f"--tokenizer-type {d.tokenizer_type} (as in Megatron-LM)")
        if t.train_samples is not None and t.train_iters is None:
            # As Megatron-LM: whole global batches, the ramp's smaller ones first with --rampup-batch-size.
            # A ramp that validate will refuse is not counted (megatron's calculator asserts on it).
            ramp = t.rampup_batch_size if not rampup_problems(t) else None
            t.train_iters = train_iters_for_samples(t.train_samples, t.global_batch_size, ramp)
        o = self.optimizer
        if o.lr_decay_iters is None and t.train_samples is None:
            o.lr_decay_iters = t.train_iters
        if o.start_weight_decay is None:
            o.start_weight_decay = o.weight_decay
        if o.end_weight_decay is None:
            o.end_weight_decay = o.weight_decay

    def _resolve_transformer_impl(self, gpu_available: Optional[bool],
                                  kernel_support: Optional[kernels.KernelSupport]) -> None:
        """The default --transformer-impl: Megatron-LM's transformer_engine where it can run (Transformer
        Engine installed, a GPU visible), megatron-core's local layers otherwise; noted in the log."""
        if gpu_available is None:
            from megatron_mile import device  # imports torch: only where the caller did not say

            gpu_available = device.gpu_available()
        support = kernel_support or kernels.detect_kernel_support(gpu_available)
        if gpu_available and support.transformer_engine:
            self.kernels.transformer_impl = "transformer_engine"
            why = "Transformer Engine is installed and a GPU is visible"
        else:
            self.kernels.transformer_impl = "local"
            why = ("no GPU is visible" if not gpu_available else "Transformer Engine is not installed") + (
                "; Megatron-LM's default transformer_engine needs both")
        self.notes.append(f"--transformer-impl {self.kernels.transformer_impl} (the default here: {why})")

    def validate(self, world_size: int, gpu_available: bool,
                 kernel_support: Optional[kernels.KernelSupport] = None, extra_problems: Sequence[str] = ()) -> None:
        """Raise ConfigError listing every invalid setting or combination, each with its fix.

        kernel_support: the optional GPU packages to check kernel flags against (default: this machine's,
        detected without importing them); KernelSupport.full() checks a script meant for a GPU cluster.
        extra_problems: found by the caller (e.g. refused Megatron-LM flags), reported in the same message.
        """
        problems = config_problems(self, world_size, gpu_available, kernel_support, extra_problems)
        if problems:
            raise ConfigError(
                "invalid configuration:\n" + "\n".join(f"  - {problem}" for problem in problems)
            )
