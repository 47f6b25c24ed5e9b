# Shared launcher of examples/pretrain_llama_*.sh (sourced, not run). The recipe script sets:
#   RECIPE_ARGS   model shape + parallel layout + batch flags (megatron_mile/planning/recipes.py, same flags)
#   WARMUP_ITERS  TRAIN_ITERS
# Environment (all optional except the tokenizer and the data):
#   TOKENIZER_MODEL  LLaMA SentencePiece tokenizer.model (vocabulary 32000)                 [required]
#   DATA_PREFIX      --output-prefix given to tools/preprocess_data.py --split-by-domain: the Pile
#                    domain blend is built from it by tools/pile_blend.py              [or DATA_PATH]
#   DATA_PATH        a ready --data-path list ("w1 prefix1 w2 prefix2 ..."), instead of DATA_PREFIX
#   LOSS_TYPE        mile (default) | focal | cross_entropy: the paper's baselines
#   CHECKPOINT_DIR   --save/--load directory (default: checkpoints/<recipe>-<loss>)
#   FP8=1            FP8 GEMMs in the transformer layers (Transformer Engine; H100 and newer)
#   FUSED_LM_HEAD=1  output layer + loss fused, without materialising the logits (--fused-lm-head)
#   RECOMPUTE        selective | full: activation recomputation (off by default: every recipe fits an 80 GB
#                    GPU without it, and with flash attention selective recomputation saves ~6%; docs/scale.md)
#   EXIT_DURATION_IN_MINS  stop, save and exit 0 before this many minutes (a job's wall-time limit less the
#                    time of a save); SIGTERM (Slurm's warning before a pre-emption or the time limit) does the
#                    same at any time: every recipe runs with --exit-signal-handler (docs/scale.md)
#   SHUTDOWN_TIMEOUT (600): seconds torchrun waits for its workers to save after a SIGTERM before killing them
#   GPUS_PER_NODE (8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (6000): torchrun
#   DRY_RUN=1        print the torchrun command instead of running it
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the LLaMA SentencePiece tokenizer.model}"
if [[ -z "${DATA_PATH:-}" ]]; then
  : "${DATA_PREFIX:?set DATA_PREFIX to the --output-prefix of tools/preprocess_data.py --split-by-domain, or DATA_PATH to a --data-path list}"
  # The Pile's 22 domains with the paper's sampling weights, renormalised over the domains present.
  DATA_PATH="$("$PYTHON" "$REPO/tools/pile_blend.py" --output-prefix "$DATA_PREFIX")"
fi
read -r -a DATA_ARGS <<< "$DATA_PATH"

LOSS_TYPE="${LOSS_TYPE:-mile}"
case "$LOSS_TYPE" in
  mile) LOSS_ARGS=(--loss-type mile --mile-gamma 1.0 --mile-sigma 1.0) ;;
  focal) LOSS_ARGS=(--loss-type focal --focal-gamma 1.0) ;;
  cross_entropy) LOSS_ARGS=(--loss-type cross_entropy) ;;
  *) echo "LOSS_TYPE must be mile, focal or cross_entropy, got '$LOSS_TYPE'" >&2; exit 2 ;;
esac

# Delayed scaling over a 1024-step amax history, e4m3 forward / e5m2 gradients (Megatron-LM's usual FP8
# settings). The output layer stays bf16 and the loss fp32.
KERNEL_ARGS=()
if [[ "${FP8:-0}" == 1 ]]; then
  KERNEL_ARGS=(--fp8-format hybrid --fp8-amax-history-len 1024 --fp8-amax-compute-algo max)
fi
if [[ "${FUSED_LM_HEAD:-0}" == 1 ]]; then
  KERNEL_ARGS+=(--fused-lm-head)
fi
RECOMPUTE_ARGS=()
case "${RECOMPUTE:-}" in
  "") ;;
  selective) RECOMPUTE_ARGS=(--recompute-activations) ;;
  full) RECOMPUTE_ARGS=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
  *) echo "RECOMPUTE must be selective or full, got '$RECOMPUTE'" >&2; exit 2 ;;
esac

CHECKPOINT_DIR="${CHECKPOINT_DIR:-$REPO/checkpoints/${RECIPE_NAME}-${LOSS_TYPE}}"
# Pre-emption and wall-time limits: on SIGTERM every rank finishes its step, the run saves and exits 0; the
# next job (same --save/--load) resumes exactly there.
EXIT_ARGS=(--exit-signal-handler)
if [[ -n "${EXIT_DURATION_IN_MINS:-}" ]]; then
  EXIT_ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_IN_MINS")
fi

# The paper's optimisation (docs/scale.md): Adam (0.9, 0.95), lr 3e-4 with cosine decay to 0, weight
# decay 0.1, clipping 1.0, bf16, init std 0.01, LLaMA tokenizer. Transformer Engine layers: fused norms and
# attention on GPUs, and sequence parallelism with RMSNorm (6.7B) needs them.
# As Megatron-LM's H100 LLaMA recipes: every recipe uses the distributed optimizer, so its gradient
# reduce-scatter and parameter all-gather overlap backward and forward (the MiLe normalisation stays exact:
# docs/scale.md), and the causal mask is left to the attention kernel (no [s, s] mask per sample).
# --eod-mask-loss: the token after a document's EOD cannot be predicted from the document before it.
TRAIN_ARGS=(
  --transformer-impl transformer_engine
  --overlap-grad-reduce --overlap-param-gather --no-create-attention-mask-in-dataloader --eod-mask-loss
  --lr 3e-4 --min-lr 0 --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS" --train-iters "$TRAIN_ITERS"
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --bf16 --init-method-std 0.01
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --data-path "${DATA_ARGS[@]}" --num-workers 2
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000
  --log-interval 10 --eval-interval 1000 --eval-iters 10 --tensorboard-dir "$CHECKPOINT_DIR/tensorboard"
)

# megatron's tensor-parallel layers expect one CUDA work queue, so that a communication kernel is queued
# before the compute it overlaps with (Megatron-LM's examples set it too).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

CMD=(
  torchrun --nproc_per_node "${GPUS_PER_NODE:-8}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-6000}"
  --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}"
  "$REPO/pretrain_gpt_mile.py" "${RECIPE_ARGS[@]}" "${TRAIN_ARGS[@]}" "${EXIT_ARGS[@]}" "${LOSS_ARGS[@]}"
  "${KERNEL_ARGS[@]}" "${RECOMPUTE_ARGS[@]}"
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"
  echo
else
  exec "${CMD[@]}"
fi
