"""The tiny GPT / LLaMA models the tests train, save and compare: their flags, their config, their build.

Every test that needs a small model composes it from here, so that "a tiny LLaMA" means one thing:

- `model_flags`: the transformer's shape and architecture as pretrain_gpt_mile.py flags (LLaMA by default:
  RMSNorm, SwiGLU, no biases, rope, untied embeddings), dropout off unless asked;
- `mock_data_flags`: megatron's mock data with a NullTokenizer vocabulary;
- `tiny_config`: a finalised, validated RunConfig from such flags, at the TP/PP layout and world size of the
  calling process when megatron's parallel state is set up (a DistributedPool worker);
- `build_tiny_model`: the model chunks of this rank, seeded from the config as a training run seeds them;
- `layout_logits`: a model's full-vocabulary logits at any TP/PP layout, through megatron's schedules;
- `TINY_LLAMA` and `LOSS_FLAGS`: the 4-layer LLaMA that the training, kernel, bf16 and fused-head tests run,
  and the flags of each loss type.

pytest puts tests/ on sys.path (the tests are not a package), and the pool's spawned workers inherit it,
so worker bodies may use these too.
"""

from __future__ import annotations

from typing import List, Optional

from megatron_mile.arguments import build_parser, config_from_namespace, parse_args
from megatron_mile.config import RunConfig

# LLaMA's architecture in Megatron-LM's flags (untied embeddings separately: some tests tie them).
LLAMA_FLAGS = ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope"]


LOSS_FLAGS = {
    "cross_entropy": ["--loss-type", "cross_entropy"],
    "focal": ["--loss-type", "focal", "--focal-gamma", "2.0"],
    "mile": ["--loss-type", "mile", "--mile-gamma", "1.0", "--mile-sigma", "1.0"],
}


def model_flags(num_layers: int = 2, hidden_size: int = 32, num_attention_heads: int = 4, seq_length: int = 32,
                llama: bool = True, untie_embeddings: bool = True, dropout: float = 0.0) -> List[str]:
    """Shape flags; with `llama`, LLaMA's architecture; hidden and attention dropout both `dropout`."""
    flags = [
        "--num-layers", str(num_layers), "--hidden-size", str(hidden_size),
        "--num-attention-heads", str(num_attention_heads), "--seq-length", str(seq_length),
        "--hidden-dropout", str(dropout), "--attention-dropout", str(dropout),
    ]
    if llama:
        flags += LLAMA_FLAGS
    if untie_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    return flags


def mock_data_flags(vocab_size: int = 300) -> List[str]:
    """Megatron's mock GPT data, token ids from a NullTokenizer of `vocab_size` entries."""
    return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size)]


# The 4-layer LLaMA trained by tests/test_training.py and reused by the kernel, bf16 and fused-head tests:
# 3 steps of global batch 8 (micro-batches of 2) on mock data, weights large enough (std 0.25) that the
# losses move visibly.
TINY_LLAMA = model_flags(num_layers=4, hidden_size=64) + mock_data_flags(300) + (
    "--init-method-std 0.25 --lr 1e-3 --lr-warmup-iters 1 --lr-decay-style cosine --clip-grad 1.0 "
    "--weight-decay 0.1 --adam-beta2 0.95 --log-interval 100 --eval-iters 0 "
    "--micro-batch-size 2 --global-batch-size 8 --train-iters 3 --seed 7 --no-progress"
).split()


def tiny_config(flags: List[str], world_size: Optional[int] = None, validate: bool = True, **parse_kwargs) -> RunConfig:
    """parse_args(flags) at this process's layout: where megatron's parallel state is set up (a pool worker),
    its TP and PP sizes are added to the flags and the world size is torch.distributed's; otherwise
    `world_size` (default 1). Raises ConfigError as parse_args does; `validate=False` only finalises (a
    config that is no training run, e.g. a model saved without data)."""
    # megatron-core (seconds to import) only where a config is built: not at test collection.
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        flags = flags + [
            "--tensor-model-parallel-size", str(parallel_state.get_tensor_model_parallel_world_size()),
            "--pipeline-model-parallel-size", str(parallel_state.get_pipeline_model_parallel_world_size()),
        ]
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    if validate:
        return parse_args(flags, world_size=world_size, **parse_kwargs)
    config = config_from_namespace(build_parser().parse_args(flags))
    config.finalize(world_size)
    return config


def build_tiny_model(config: RunConfig, real_vocab_size: int) -> list:
    """This rank's model chunks (megatron_mile.model.build_model), the random state seeded from the config's
    seed first, as a training run does, so that every call with the same config builds the same weights."""
    # megatron-core's models (seconds to import) only where a model is built: not at test collection.
    from megatron_mile.model import build_model
    from megatron_mile.training.initialize import set_random_seeds

    set_random_seeds(config.training.seed)
    return build_model(config, real_vocab_size)


def layout_logits(chunks: list, input_ids):
    """Full-vocabulary logits [b, s, V_padded] of `input_ids` [b, s] through megatron's pipeline schedule, on the
    last pipeline stage (None elsewhere); the TP shards of the vocabulary are gathered. Collectives: the
    schedule's pipeline sends/receives and the TP all-gather of the logits."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    captured = []
    batch, seq = input_ids.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), positions, None)  # [b, s, V/tp] on the last stage

        def collect(output_tensor):
            captured.append(gather_from_tensor_model_parallel_region(output_tensor).detach().clone())
            return output_tensor.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return output, collect

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([input_ids]), model=chunks,
                                    num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True)
    return captured[0] if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None
