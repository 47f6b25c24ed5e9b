#!/usr/bin/env bash
# Cross-entropy vs focal loss vs MiLe on the embedded sample corpus, on 2 CPU cores in well under 30 minutes:
# the same seed, data, model and compute for the three; each checkpoint evaluated per token-frequency bucket
# (high / medium / low: the tokens covering 80% / 15% / 5% of training occurrences) and per domain on the
# held-out split; a markdown + JSON table and PNG plots of the lm loss curves and the bucket perplexities.
# Environment: OUT (runs/compare_losses), TRAIN_ITERS (300), NPROC (2), TP (1), MASTER_PORT (29531).
OUT="${OUT:-runs/compare_losses}"
source "$(dirname "${BASH_SOURCE[0]}")/_compare_common.sh"

train_and_evaluate cross_entropy --loss-type cross_entropy
train_and_evaluate focal --loss-type focal --focal-gamma 1.0
train_and_evaluate mile --loss-type mile --mile-gamma 1.0 --mile-sigma 1.0

plot_results "Cross-entropy vs focal vs MiLe (sample corpus, $TRAIN_ITERS steps)" \
  "Same seed, data, model and compute; lm loss is plain cross-entropy for every run. Perplexity per bucket on the held-out data/sample/val.jsonl.zst, by the target token's training-data frequency."
