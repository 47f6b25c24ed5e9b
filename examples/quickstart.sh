#!/usr/bin/env bash
# The main job on a fresh machine, end to end, on 2 CPU cores in a few minutes:
#   1. set up .venv (tools/setup_env.sh),
#   2. preprocess the embedded sample corpus (data/sample, Pile format) into one dataset per Pile domain,
#   3. blend the domains with the MiLe paper's Pile sampling weights,
#   4. train a small LLaMA (RMSNorm, SwiGLU, rope, untied embeddings) with the MiLe loss on 2 processes
#      with tensor parallelism (TP=2), validating as it goes,
#   5. print where the checkpoint, the TensorBoard logs and the summary are.
# Environment overrides: OUT (output dir, default runs/quickstart), TRAIN_ITERS (300), LOSS_TYPE (mile),
# NPROC (2).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
source tools/setup_env.sh

OUT="${OUT:-runs/quickstart}"
TRAIN_ITERS="${TRAIN_ITERS:-300}"
LOSS_TYPE="${LOSS_TYPE:-mile}"
NPROC="${NPROC:-2}"
WARMUP_ITERS=$(( TRAIN_ITERS / 10 ))

echo "== 1/3 preprocessing data/sample/train.jsonl.zst (one dataset per Pile domain)"
DATA_DIR="$OUT/data"
source examples/_prepare_sample_data.sh  # sets TOKENIZER and DATA_PATH

LOSS_FLAGS=(--loss-type "$LOSS_TYPE")
[ "$LOSS_TYPE" = mile ] && LOSS_FLAGS+=(--mile-gamma 1.0 --mile-sigma 1.0)
[ "$LOSS_TYPE" = focal ] && LOSS_FLAGS+=(--focal-gamma 1.0)

# One thread per process on 2 cores, as torchrun would choose; set here, torchrun prints no notice about it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "== 2/3 training a small LLaMA with --loss-type $LOSS_TYPE on $NPROC processes (TP=$NPROC)"
torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29517}" pretrain_gpt_mile.py \
  --tensor-model-parallel-size "$NPROC" \
  --num-layers 4 --hidden-size 256 --ffn-hidden-size 688 --num-attention-heads 4 \
  --seq-length 128 --max-position-embeddings 128 \
  --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope \
  --untie-embeddings-and-output-weights --init-method-std 0.02 \
  --hidden-dropout 0.0 --attention-dropout 0.0 \
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$TRAIN_ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS" \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234 \
  --data-path "${DATA_PATH[@]}" --split 98,2,0 --data-cache-path "$OUT/data/cache" "${TOKENIZER[@]}" \
  "${LOSS_FLAGS[@]}" \
  --log-interval 25 --log-throughput --eval-interval 100 --eval-iters 4 \
  --save "$OUT/checkpoints" --save-interval 100 --tensorboard-dir "$OUT/tensorboard" \
  2>&1 | tee "$OUT/train.log"

echo "== 3/3 done"
echo "   checkpoint:  $OUT/checkpoints (latest: $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))"
echo "   tensorboard: tensorboard --logdir $OUT/tensorboard"
echo "   summary:     $OUT/checkpoints/summary.json"
echo "   log:         $OUT/train.log"
