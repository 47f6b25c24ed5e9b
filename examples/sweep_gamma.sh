#!/usr/bin/env bash
# MiLe's gamma in {0.5, 1, 2} against a cross-entropy baseline on the embedded sample corpus (the
# compare_losses.sh set-up: same seed, data, model and compute; per-bucket evaluation; table and plots).
# Environment: OUT (runs/sweep_gamma), TRAIN_ITERS (300), NPROC (2), TP (1), MASTER_PORT (29531).
# With OUT set to compare_losses.sh's folder, its cross_entropy and mile (gamma 1) runs are reused.
OUT="${OUT:-runs/sweep_gamma}"
source "$(dirname "${BASH_SOURCE[0]}")/_compare_common.sh"

train_and_evaluate cross_entropy --loss-type cross_entropy
train_and_evaluate mile_gamma0.5 --loss-type mile --mile-gamma 0.5 --mile-sigma 1.0
train_and_evaluate mile --loss-type mile --mile-gamma 1.0 --mile-sigma 1.0
train_and_evaluate mile_gamma2 --loss-type mile --mile-gamma 2.0 --mile-sigma 1.0

plot_results "MiLe gamma sweep vs cross-entropy (sample corpus, $TRAIN_ITERS steps)" \
  "MiLe weights (1 + entropy)^gamma; gamma = 0 would be cross-entropy. Same seed, data, model and compute; lm loss is plain cross-entropy for every run."
