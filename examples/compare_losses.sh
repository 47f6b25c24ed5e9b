#!/usr/bin/env bash
# Losses compared on the embedded sample corpus (by default cross-entropy vs focal loss vs MiLe), on 2 CPU cores:
# the same seed, data, model and compute for each; each checkpoint evaluated per token-frequency bucket
# (high / medium / low: the tokens covering 80% / 15% / 5% of training occurrences) and per domain on the
# held-out split; a markdown + JSON table and PNG plots of the lm loss curves and the bucket perplexities.
# Environment: OUT (runs/compare_losses), LOSSES (the runs, below), TRAIN_ITERS (300), NPROC (2), TP (1),
# MASTER_PORT (29531).

# LOSSES: which runs, by name (default the paper's three). Each name's flags:
#   cross_entropy, focal (gamma 1), mile (gamma 1, sigma 1), dft (w = p_target),
#   mile_zloss (MiLe + z-loss 1e-4), cross_entropy_ls (label smoothing 0.1), mile_ls (MiLe + label smoothing 0.1),
#   entropy_selection / ce_selection (train on the 60% highest-entropy / highest-cross-entropy tokens of each
#   micro-batch, Rho-1's share; docs/mile-loss.md).
LOSSES="${LOSSES:-cross_entropy focal mile}"
loss_flags() {  # NAME -> the loss flags of that run
  case "$1" in
    cross_entropy) echo "--loss-type cross_entropy" ;;
    focal) echo "--loss-type focal --focal-gamma 1.0" ;;
    mile) echo "--loss-type mile --mile-gamma 1.0 --mile-sigma 1.0" ;;
    dft) echo "--loss-type dft" ;;
    mile_zloss) echo "--loss-type mile --mile-gamma 1.0 --mile-sigma 1.0 --z-loss-coeff 1e-4" ;;
    cross_entropy_ls) echo "--loss-type cross_entropy --label-smoothing 0.1" ;;
    mile_ls) echo "--loss-type mile --mile-gamma 1.0 --mile-sigma 1.0 --label-smoothing 0.1" ;;
    entropy_selection) echo "--loss-type entropy_selection --selection-fraction 0.6" ;;
    ce_selection) echo "--loss-type ce_selection --selection-fraction 0.6" ;;
    *) echo "LOSSES: unknown run '$1' (known: cross_entropy focal mile dft mile_zloss cross_entropy_ls mile_ls"\
" entropy_selection ce_selection)" >&2
       return 1 ;;
  esac
}
for name in $LOSSES; do loss_flags "$name" > /dev/null || exit 2; done  # every name checked before any work

OUT="${OUT:-runs/compare_losses}"
source "$(dirname "${BASH_SOURCE[0]}")/_compare_common.sh"
for name in $LOSSES; do
  # shellcheck disable=SC2046  # the flags are words
  train_and_evaluate "$name" $(loss_flags "$name")
done

plot_results "Losses compared: ${LOSSES// / vs } (sample corpus, $TRAIN_ITERS steps)" \
  "Same seed, data, model and compute; lm loss is plain cross-entropy for every run. Perplexity per bucket on the held-out data/sample/val.jsonl.zst, by the target token's training-data frequency."
