"""The paper's three LLaMA models as training flags, and the layout each runs with on 80 GB GPUs.

The shapes and batch sizes are the MiLe paper's (468M, 1.2B, 6.7B; vocabulary 32000, untied embeddings,
RMSNorm, SwiGLU, rope). The layouts are ours, chosen with tools/plan_memory.py so that every rank stays well
inside an 80 GB H100/A100 (see docs/scale.md for the tables). examples/pretrain_llama_*.sh pass exactly
these flags (tests/test_examples.py checks it), plus optimizer, data and loss flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

LLAMA = ("--normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear "
         "--position-embedding-type rope --untie-embeddings-and-output-weights "
         "--hidden-dropout 0 --attention-dropout 0").split()


@dataclass(frozen=True)
class Recipe:
    """Model, batch and layout flags of one paper model, and the GPU count the paper used."""

    name: str
    shape_flags: List[str]
    layout_flags: List[str]
    world_size: int

    @property
    def flags(self) -> List[str]:
        return self.shape_flags + LLAMA + self.layout_flags + ["--bf16", "--vocab-size", "32000"]


RECIPES: Dict[str, Recipe] = {
    # 468M: small enough for pure data parallelism; micro-batch 8 keeps activations near 10 GB.
    "468m": Recipe(
        "468m",
        "--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 4096 "
        "--seq-length 1024 --max-position-embeddings 1024".split(),
        "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --micro-batch-size 8 "
        "--global-batch-size 1024 --use-distributed-optimizer".split(),
        16,
    ),
    # 1.2B: still data parallel; the distributed optimizer shards the 14 GB of Adam states over 32 ranks.
    "1.2b": Recipe(
        "1.2b",
        "--num-layers 16 --hidden-size 2048 --num-attention-heads 8 --ffn-hidden-size 8192 "
        "--seq-length 1024 --max-position-embeddings 1024".split(),
        "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --micro-batch-size 8 "
        "--global-batch-size 1024 --use-distributed-optimizer".split(),
        32,
    ),
    # 6.7B: TP 2 inside a node halves weights and fp32 gradients (40 GB at TP 1) and leaves room for
    # micro-batch 2 at seq 2048; sequence parallelism splits the norms' activations over the TP pair.
    "6.7b": Recipe(
        "6.7b",
        "--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --ffn-hidden-size 11008 "
        "--seq-length 2048 --max-position-embeddings 2048".split(),
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel "
        "--micro-batch-size 2 --global-batch-size 2048 --use-distributed-optimizer".split(),
        128,
    ),
}
