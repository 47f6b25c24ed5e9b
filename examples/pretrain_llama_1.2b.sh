#!/usr/bin/env bash
# MiLe paper, 1.2B LLaMA: 16 layers, hidden 2048, 8 heads, FFN 8192, seq 1024, global batch 1024
# sequences, 100k steps (~105B tokens), warmup 1000. Paper: 32 GPUs (NNODES=4).
#
# Layout: pure data parallelism (TP 1, PP 1), micro-batch 8, distributed optimizer.
# tools/plan_memory.py --recipe 1.2b (H100 80 GB, 32 GPUs): weights 2.24 + fp32 grads 4.49 + optimizer
# 0.42 + activations 10.57 + logits/loss 1.13 = 18.9 GiB per GPU; on one node (8 GPUs) the optimizer
# shards grow to 1.7 GiB: still far below 80 GB. TP would only add communication.
#
#   TOKENIZER_MODEL=/data/llama/tokenizer.model DATA_PREFIX=/data/pile/pile bash examples/pretrain_llama_1.2b.sh
#   NNODES=4 NODE_RANK=0..3 MASTER_ADDR=node0 MASTER_PORT=6000 ... (multi-node, run on every node)
# Environment variables: examples/_launch_common.sh.
set -euo pipefail
RECIPE_NAME=1.2b
RECIPE_ARGS=(
  --num-layers 16 --hidden-size 2048 --num-attention-heads 8 --ffn-hidden-size 8192
  --seq-length 1024 --max-position-embeddings 1024
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear
  --position-embedding-type rope --untie-embeddings-and-output-weights
  --hidden-dropout 0 --attention-dropout 0
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --micro-batch-size 8
  --global-batch-size 1024 --use-distributed-optimizer
)
WARMUP_ITERS=1000
TRAIN_ITERS=100000
source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
