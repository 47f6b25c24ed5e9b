"""The vocab-parallel loss of the working tree against the same package at an earlier git revision, in one process.

Both versions run on the same fp32 logits (4096 tokens x vocab 32000, TP 1, 2 threads), called the way the
model's loss hook calls them (reuse_logits_for_grad=True), alternating over the rounds; the figure is the
median forward+backward time per version and loss type. For a change to the loss itself, where the
difference between two separate runs would drown in this machine's drift.

    python benchmarks/bench_loss_revisions.py fa8f24c^            # the revision before the in-place exp
    python benchmarks/bench_loss_revisions.py HEAD~3 --rounds 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _harness import markdown_table

import megatron_mile.loss as current

LOSS_PACKAGE = "megatron_mile/loss"
TOKENS_SEQ, TOKENS_BATCH, VOCAB = 1024, 4, 32000
LOSS_TYPES = ("cross_entropy", "mile")


def _load_revision(revision: str, directory: str):
    """Import the loss package (LOSS_PACKAGE) as it was at `revision`, beside the installed one.

    The package's modules import each other by absolute name, so they are imported while the revision's
    copies stand in sys.modules under the real names; the installed modules are put back afterwards (the
    revision's functions keep the references they bound at import).
    """
    import importlib.util
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(["git", "-C", root, "archive", "--format=tar", revision, LOSS_PACKAGE], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: cannot read {LOSS_PACKAGE} at revision {revision!r} "
                 f"({archive.stderr.decode().strip()}); pass a commit of this repository that has it, e.g. HEAD~1")
    tar_path = os.path.join(directory, "loss.tar")
    with open(tar_path, "wb") as f:
        f.write(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(directory, filter="data")
    package_dir = os.path.join(directory, LOSS_PACKAGE)
    name = LOSS_PACKAGE.replace("/", ".")
    installed = {key: module for key, module in sys.modules.items() if key == name or key.startswith(name + ".")}
    for key in installed:
        del sys.modules[key]
    try:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        sys.modules.update(installed)
    return package


def _loss_call(package):
    """f(logits, target, loss_type) -> (ce, weight) in the package's API, as the model's loss hook calls it."""
    if hasattr(package, "LossSpec"):
        specs = {"cross_entropy": package.LossSpec("cross_entropy"), "mile": package.LossSpec("mile", 1.0, 1.0)}
        def call(logits, target, loss_type):
            out = package.vocab_parallel_weighted_cross_entropy(logits, target, specs[loss_type], VOCAB,
                                                                reuse_logits_for_grad=True)
            return out.loss, out.weight

        return call
    # Before the loss specification: the loss type and its parameters were positional arguments.
    return lambda logits, target, loss_type: package.vocab_parallel_weighted_cross_entropy(
        logits, target, loss_type, 1.0, 1.0, VOCAB, reuse_logits_for_grad=True)[:2]


def _time_once(loss_call, loss_type, base, target) -> float:
    leaf = base.clone().requires_grad_()
    logits = leaf.view_as(leaf)  # a non-leaf, as the output layer's logits are
    start = time.perf_counter()
    ce, weight = loss_call(logits, target, loss_type)
    (ce * weight).sum().backward()
    elapsed = time.perf_counter() - start
    del leaf, logits
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="git revision whose loss package is compared with the working tree's")
    parser.add_argument("--rounds", type=int, default=11, help="measured rounds (one more warms up)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(TOKENS_SEQ, TOKENS_BATCH, VOCAB, generator=gen) * 3  # [s, b, v]
    target = torch.randint(0, VOCAB, (TOKENS_SEQ, TOKENS_BATCH), generator=gen)  # [s, b]
    with tempfile.TemporaryDirectory() as directory:
        earlier = _load_revision(args.revision, directory)
        versions = {args.revision: _loss_call(earlier), "working tree": _loss_call(current)}
        times = {(name, loss): [] for name in versions for loss in LOSS_TYPES}
        for round_index in range(args.rounds + 1):
            order = list(versions.items()) if round_index % 2 == 0 else list(versions.items())[::-1]
            for name, loss_call in order:
                for loss in LOSS_TYPES:
                    seconds = _time_once(loss_call, loss, base, target)
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
