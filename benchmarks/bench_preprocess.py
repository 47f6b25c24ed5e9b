#!/usr/bin/env python
"""Wall-clock benchmark of tools/preprocess_data.py on the sample corpus, at 1 and 2 workers.

Also times a baseline that reproduces Megatron-LM's tools/preprocess_data.py algorithm (Megatron-LM's
``megatron.training`` package is not installable from PyPI, so its tool cannot run here as is): it
imports torch and megatron.core, builds the tokenizer in the parent and in every pool worker, sends
one JSON line at a time through ``multiprocessing.Pool.imap(..., chunksize=32)``, encodes each document
with its own tokenizer call, and writes with megatron-core's IndexedDatasetBuilder. Its import cost is
lower than the real tool's (no megatron.training, transformers or triton), so the measured speed-up is a
conservative estimate. The benchmark checks that both produce byte-identical .bin/.idx files.

Each configuration runs ``--repeats`` times in a fresh process; the table reports the fastest and the
median wall time (the fastest is the least disturbed by other load on a shared machine).

    python benchmarks/bench_preprocess.py [--copies 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _harness import markdown_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "sample", "train.jsonl.zst")
TOKENIZER = os.path.join(REPO, "data", "sample", "tokenizer.json")

BASELINE = r'''
import json, multiprocessing, sys, time
start = time.time()
import torch  # noqa: F401  (Megatron-LM's tool imports torch through megatron.core)
import megatron.core  # noqa: F401
from megatron.core.datasets import indexed_dataset
from tokenizers import Tokenizer

path, tok_file, prefix, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

class Encoder:
    def initializer(self):
        Encoder.tok = Tokenizer.from_file(tok_file)
        Encoder.eod = Encoder.tok.token_to_id("<|endoftext|>")

    def encode(self, line):
        text = json.loads(line)["text"]
        ids = Encoder.tok.encode(text, add_special_tokens=False).ids
        lens = [len(ids)] if ids else []
        if ids:
            ids.append(Encoder.eod)
            lens[-1] += 1
        return ids, lens, len(line)

if __name__ == "__main__":
    enc = Encoder()
    tok = Tokenizer.from_file(tok_file)
    pool = multiprocessing.Pool(workers, initializer=enc.initializer)
    with open(path, "r", encoding="utf-8") as fin:
        docs = pool.imap(enc.encode, fin, 32)
        builder = indexed_dataset.IndexedDatasetBuilder(
            prefix + ".bin", dtype=indexed_dataset.DType.optimal_dtype(tok.get_vocab_size()))
        for ids, lens, _ in docs:
            builder.add_document(ids, lens)
        builder.finalize(prefix + ".idx")
    pool.close()
    pool.join()
'''


def _timed(cmd, env) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def _same(a: str, b: str) -> bool:
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=2,
                        help="Concatenate the sample corpus this many times (2 gives about 13 MB of JSON lines).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    import zstandard

    env = dict(os.environ, PYTHONPATH=REPO)
    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        with open(SAMPLE, "rb") as f:
            raw = zstandard.ZstdDecompressor().stream_reader(f).read()
        jsonl = os.path.join(work, "corpus.jsonl")
        with open(jsonl, "wb") as f:
            for _ in range(args.copies):
                f.write(raw)
        zst = jsonl + ".zst"
        with open(zst, "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(raw * args.copies))
        baseline_script = os.path.join(work, "baseline.py")
        with open(baseline_script, "w") as f:
            f.write(BASELINE)
        size_mb = os.path.getsize(jsonl) / 2**20
        print(f"corpus: {args.copies} x data/sample/train.jsonl.zst = {size_mb:.1f} MB of JSON lines; "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")

        ours = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", TOKENIZER, "--append-eod"]
        rows = []
        for workers in args.workers:
            configs = [("this project, .jsonl", lambda p: ours + ["--input", jsonl, "--output-prefix", p,
                                                                   "--workers", str(workers)]),
                       ("this project, .jsonl.zst", lambda p: ours + ["--input", zst, "--output-prefix", p,
                                                                       "--workers", str(workers)])]
            if not args.no_baseline:
                configs.append(("Megatron-LM algorithm (reproduced)",
                                lambda p: [sys.executable, baseline_script, jsonl, TOKENIZER, p + "_text_document",
                                           str(workers)]))
            times = {}
            for name, make in configs:
                prefix = os.path.join(work, f"{len(rows)}_{len(times)}")
                times[name] = [_timed(make(prefix), env) for _ in range(args.repeats)]
                times[name + "/prefix"] = prefix + "_text_document"
            if not args.no_baseline:
                base = times["Megatron-LM algorithm (reproduced)/prefix"]
                for name in ("this project, .jsonl", "this project, .jsonl.zst"):
                    if not _same(times[name + "/prefix"], base):
                        print(f"ERROR: {name} output differs from the baseline's", file=sys.stderr)
                        return 1
            for name, _ in configs:
                t = times[name]
                rows.append((workers, name, min(t), statistics.median(t)))
        print()
        base = {w: b for w, n, b, _ in rows if n.startswith("Megatron")}
        table = [(workers, name, f"{best:.2f}", f"{median:.2f}", f"{size_mb / best:.1f}",
                  f"{base[workers] / best:.2f}x" if workers in base else "-")
                 for workers, name, best, median in rows]
        print(markdown_table(["workers", "tool", "best wall (s)", "median wall (s)", "MB/s (best)",
                              "speed-up vs baseline (best)"], table, align="rlrrrr"))
        if not args.no_baseline:
            print("\noutputs: byte-identical .bin/.idx across all tools")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
