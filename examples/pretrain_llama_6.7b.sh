#!/usr/bin/env bash
# MiLe paper, 6.7B LLaMA: 32 layers, hidden 4096, 32 heads, FFN 11008, seq 2048, global batch 2048
# sequences (~4.2M tokens), 25k steps (~105B tokens), warmup 2000. Paper: 128 GPUs (NNODES=16).
#
# Layout: TP 2 inside a node with sequence parallelism, PP 1, micro-batch 2, distributed optimizer.
# tools/plan_memory.py --recipe 6.7b (H100 80 GB, 128 GPUs): weights 6.28 + fp32 grads 12.55 + optimizer
# 0.59 + activations 8.57 + logits/loss 0.40 = 28.4 GiB per GPU. At TP 1 weights and fp32 gradients alone
# take 37.7 GiB, leaving little room for activations at seq 2048; TP 2 halves them.
# Sequence parallelism needs Transformer Engine on GPUs (the training CLI refuses it on CPU).
#
#   TOKENIZER_MODEL=/data/llama/tokenizer.model DATA_PREFIX=/data/pile/pile bash examples/pretrain_llama_6.7b.sh
#   NNODES=16 NODE_RANK=0..15 MASTER_ADDR=node0 MASTER_PORT=6000 ... (multi-node; or the Slurm script
#   examples/slurm_pretrain_6.7b.sbatch)
# Environment variables: examples/_launch_common.sh.
set -euo pipefail
RECIPE_NAME=6.7b
RECIPE_ARGS=(
  --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --ffn-hidden-size 11008
  --seq-length 2048 --max-position-embeddings 2048
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear
  --position-embedding-type rope --untie-embeddings-and-output-weights
  --hidden-dropout 0 --attention-dropout 0
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel
  --micro-batch-size 2 --global-batch-size 2048 --use-distributed-optimizer
)
WARMUP_ITERS=2000
TRAIN_ITERS=25000
source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
