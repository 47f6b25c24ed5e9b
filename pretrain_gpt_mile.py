"""Pretrain a GPT / LLaMA model with the MiLe, focal or cross-entropy loss on megatron-core.

    torchrun --nproc_per_node 2 pretrain_gpt_mile.py --tensor-model-parallel-size 2 \
        --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 \
        --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope \
        --untie-embeddings-and-output-weights --micro-batch-size 4 --global-batch-size 8 \
        --train-iters 100 --lr 3e-4 --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 \
        --loss-type mile

Flags follow Megatron-LM's names (`python pretrain_gpt_mile.py --help`). This script only names the
providers; the training loop lives in megatron_mile.training.
"""

import sys

from megatron_mile import known_warnings

known_warnings.install()  # before megatron-core is imported: most of its known warnings come at import

from megatron_mile.model import build_model  # noqa: E402
from megatron_mile.training.cli import main  # noqa: E402
from megatron_mile.training.data import build_datasets  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], model_provider=build_model, dataset_provider=build_datasets))
