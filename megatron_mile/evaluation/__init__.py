"""Evaluation of trained checkpoints beyond the training loop's validation loss.

- token_buckets: token-frequency counts over indexed datasets and the paper's high / medium / low buckets.
- datasets: the training ranges counted and the per-domain validation datasets scored.
- bucket_perplexity: forward-only scoring per target bucket and domain at any TP / PP / DP layout.
- report: the console table and the JSON file.
- cli: tools/eval_token_buckets.py.
- comparison: tools/plot_comparison.py (tables and plots over several runs).
"""
