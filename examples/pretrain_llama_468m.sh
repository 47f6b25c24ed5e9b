#!/usr/bin/env bash
# MiLe paper, 468M LLaMA: 24 layers, hidden 1024, 16 heads, FFN 4096, seq 1024, global batch 1024
# sequences, 100k steps (~105B tokens), warmup 1000. Paper: 16 GPUs (NNODES=2).
#
# Layout: pure data parallelism (TP 1, PP 1), micro-batch 8, distributed optimizer.
# tools/plan_memory.py --recipe 468m (H100 80 GB, 16 GPUs): weights 0.87 + fp32 grads 1.74 + optimizer
# 0.33 + activations 7.92 + logits/loss 1.06 = 11.9 GiB per GPU: fits with ample room.
#
#   TOKENIZER_MODEL=/data/llama/tokenizer.model DATA_PREFIX=/data/pile/pile bash examples/pretrain_llama_468m.sh
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 MASTER_PORT=6000 ... (multi-node, run on every node)
# Environment variables: examples/_launch_common.sh.
set -euo pipefail
RECIPE_NAME=468m
RECIPE_ARGS=(
  --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --ffn-hidden-size 4096
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
