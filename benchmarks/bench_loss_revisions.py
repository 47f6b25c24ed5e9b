"""The vocab-parallel loss of the working tree against the same file at an earlier git revision, in one process.

Both versions run on the same fp32 logits (4096 tokens x vocab 32000, TP 1, 2 threads), called the way the
model's loss hook calls them (reuse_logits_for_grad=True), alternating over the rounds; the figure is the
median forward+backward time per version and loss type. For a change to the loss itself, where the
difference between two separate runs would drown in this machine's drift.

    python benchmarks/bench_loss_revisions.py fa8f24c^            # the revision before the in-place exp
    python benchmarks/bench_loss_revisions.py HEAD~3 --rounds 21
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _harness import markdown_table

from megatron_mile.loss import vocab_parallel as current

LOSS_FILE = "megatron_mile/loss/vocab_parallel.py"
TOKENS_SEQ, TOKENS_BATCH, VOCAB = 1024, 4, 32000
LOSS_TYPES = ("cross_entropy", "mile")


def _load_revision(revision: str, directory: str):
    """Import LOSS_FILE as it was at `revision` (a module of its own beside the installed one)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = subprocess.run(["git", "-C", root, "show", f"{revision}:{LOSS_FILE}"], capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"error: cannot read {LOSS_FILE} at revision {revision!r} ({shown.stderr.strip()}); "
                 "pass a commit of this repository that has the file, e.g. HEAD~1")
    source = shown.stdout
    path = os.path.join(directory, "vocab_parallel_at_revision.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("vocab_parallel_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time_once(module, loss_type, base, target) -> float:
    leaf = base.clone().requires_grad_()
    logits = leaf.view_as(leaf)  # a non-leaf, as the output layer's logits are
    start = time.perf_counter()
    ce, weight = module.vocab_parallel_weighted_cross_entropy(
        logits, target, loss_type, 1.0, 1.0, VOCAB, reuse_logits_for_grad=True
    )[:2]
    (ce * weight).sum().backward()
    elapsed = time.perf_counter() - start
    del leaf, logits
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="git revision whose loss file is compared with the working tree's")
    parser.add_argument("--rounds", type=int, default=11, help="measured rounds (one more warms up)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(TOKENS_SEQ, TOKENS_BATCH, VOCAB, generator=gen) * 3  # [s, b, v]
    target = torch.randint(0, VOCAB, (TOKENS_SEQ, TOKENS_BATCH), generator=gen)  # [s, b]
    with tempfile.TemporaryDirectory() as directory:
        earlier = _load_revision(args.revision, directory)
        versions = {args.revision: earlier, "working tree": current}
        times = {(name, loss): [] for name in versions for loss in LOSS_TYPES}
        for round_index in range(args.rounds + 1):
            order = list(versions.items()) if round_index % 2 == 0 else list(versions.items())[::-1]
            for name, module in order:
                for loss in LOSS_TYPES:
                    seconds = _time_once(module, loss, base, target)
                    if round_index:
                        times[(name, loss)].append(seconds)
    rows = []
    for loss in LOSS_TYPES:
        before = statistics.median(times[(args.revision, loss)]) * 1000
        after = statistics.median(times[("working tree", loss)]) * 1000
        rows.append((loss, f"{before:.1f}", f"{after:.1f}", f"{after / before:.2f}"))
    print(markdown_table(["loss", f"{args.revision} (ms)", "working tree (ms)", "ratio"], rows))


if __name__ == "__main__":
    sys.exit(main())
