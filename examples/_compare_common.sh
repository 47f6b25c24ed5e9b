# Shared by examples/compare_losses.sh and examples/sweep_gamma.sh (sourced, not run): train small LLaMAs on
# the embedded sample corpus with the same seed, data, model and compute, differing only in their loss flags;
# evaluate each with tools/eval_token_buckets.py on the held-out data/sample/val.jsonl.zst; tabulate and plot
# them with tools/plot_comparison.py.
# Environment: OUT (output folder, set by the caller), TRAIN_ITERS (300), NPROC (2 processes),
# TP (1: the NPROC processes are data parallel; 2 = tensor parallel), MASTER_PORT (29531).
# A finished run (its summary and bucket JSON present, same flags and iterations) is reused, not retrained.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
MILE_EXTRAS=eval source tools/setup_env.sh  # matplotlib for the plots comes with the eval extra
# Quiet logs: torchrun's note that it sets OMP_NUM_THREADS=1 anyway, and library deprecation warnings.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning"

TRAIN_ITERS="${TRAIN_ITERS:-300}"
NPROC="${NPROC:-2}"
TP="${TP:-1}"
MASTER_PORT="${MASTER_PORT:-29531}"
mkdir -p "$OUT"
START_SECONDS=$SECONDS

echo "== preparing the sample corpus (one dataset per Pile domain)"
DATA_DIR="$OUT/data"
PREPARE_VALIDATION=1
source examples/_prepare_sample_data.sh  # sets TOKENIZER, DATA_PATH, VALID_DATA_PATH

# The same model, data order, batch and schedule for every run: only the loss flags differ.
# 4 layers x 256 hidden (about 7.4 M parameters, 4.2 M of them the untied 8,192-token embeddings), 128-token samples,
# 16 per step: a run of 300 steps sees about 0.6 M tokens (a third of the sample corpus).
COMMON_FLAGS=(
  --tensor-model-parallel-size "$TP"
  --num-layers 4 --hidden-size 256 --ffn-hidden-size 688 --num-attention-heads 4
  --seq-length 128 --max-position-embeddings 128
  --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope
  --untie-embeddings-and-output-weights --init-method-std 0.02 --hidden-dropout 0.0 --attention-dropout 0.0
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$TRAIN_ITERS"
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters "$(( TRAIN_ITERS / 10 ))"
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234
  --data-path "${DATA_PATH[@]}" --split 98,2,0 --data-cache-path "$DATA_DIR/cache" "${TOKENIZER[@]}"
  --log-interval 25 --eval-interval 100 --eval-iters 4 --no-progress
)
RUN_NAMES=()

_log_filter() {  # keep the logs readable: drop python warnings and checkpoint-writer notes
  grep --line-buffered -v -E "UserWarning|warnings.warn|Unable to save" || true
}

train_and_evaluate() {  # NAME LOSS_FLAGS...: train $OUT/NAME, then evaluate its checkpoint per bucket
  local name="$1"; shift
  local dir="$OUT/$name"
  local flags="${COMMON_FLAGS[*]} $*"
  RUN_NAMES+=("$name")
  if [ -f "$dir/buckets.json" ] && [ -f "$dir/checkpoints/summary.json" ] && [ "$(cat "$dir/flags.txt" 2>/dev/null)" = "$flags" ]; then
    echo "== $name: reusing the finished run in $dir"
    return
  fi
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "== $name: training ($*), $TRAIN_ITERS iterations on $NPROC processes (TP=$TP)"
  torchrun --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" pretrain_gpt_mile.py "${COMMON_FLAGS[@]}" "$@" \
    --save "$dir/checkpoints" --save-interval "$TRAIN_ITERS" --tensorboard-dir "$dir/tensorboard" \
    2>&1 | _log_filter | tee "$dir/train.log"
  echo "== $name: perplexity per token-frequency bucket on the held-out data"
  torchrun --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" tools/eval_token_buckets.py \
    --load "$dir/checkpoints" --tensor-model-parallel-size "$TP" --valid-data-path "${VALID_DATA_PATH[@]}" \
    --output-json "$dir/buckets.json" 2>&1 | _log_filter | tee "$dir/eval.log"
  echo "$flags" > "$dir/flags.txt"  # written last: marks the run as finished
}

plot_results() {  # TITLE DESCRIPTION: tables and plots of every run trained above, in $OUT
  local runs=()
  for name in "${RUN_NAMES[@]}"; do
    runs+=(--run "$name" "$OUT/$name/checkpoints/summary.json" "$OUT/$name/buckets.json")
  done
  python tools/plot_comparison.py "${runs[@]}" --output-dir "$OUT" --title "$1" --description "$2"
  echo "== done in $(( SECONDS - START_SECONDS )) s"
  echo "   table: $OUT/results.md ($OUT/results.json)"
  echo "   plots: $OUT/lm_loss.png $OUT/bucket_perplexity.png"
  echo "   TensorBoard (loss curves, entropy and weight histograms): tensorboard --logdir $OUT"
}
