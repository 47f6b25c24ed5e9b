"""Command lines of the data tools (tools/*.py are thin wrappers around these ``*_main`` functions).

Each ``main(argv)`` returns a process exit status and prints errors as one ``error: ...`` line instead
of a traceback, because every error raised here already says what is wrong and what to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from megatron_mile.data.merge import find_prefixes, merge_datasets
from megatron_mile.data.pile import BlendError, blend_data_path, discover_domain_prefixes, load_weights
from megatron_mile.data.preprocess import PreprocessConfig, run_preprocess
from megatron_mile.data.readers import iter_texts, resolve_inputs
from megatron_mile.data.tokenizer_training import save_tokenizer, train_byte_level_bpe
from megatron_mile.data.tokenizers import add_tokenizer_args, tokenizer_kwargs_from_args


def _fail(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 1


# -- preprocess_data --------------------------------------------------------------------------------------


def preprocess_parser() -> argparse.ArgumentParser:
    """Megatron-LM's tools/preprocess_data.py flags, plus this project's Pile and robustness flags."""
    parser = argparse.ArgumentParser(
        description="Tokenize JSON-lines corpora (.jsonl, .jsonl.zst, .jsonl.gz, a directory or glob) into "
                    "Megatron indexed datasets {output_prefix}[_{domain}]_{key}_{document|sentence}.bin/.idx.")
    add_tokenizer_args(parser)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True,
                       help="A .jsonl/.jsonl.zst/.jsonl.gz file, a directory of them, or a quoted glob.")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (one dataset each).")
    group.add_argument("--split-sentences", action="store_true", help="One sequence per sentence (nltk Punkt).")
    group.add_argument("--keep-newlines", action="store_true",
                       help="With --split-sentences: keep the newlines between sentences.")
    group.add_argument("--lang", type=str, default="english", help="Punkt model language under --punkt-dir.")
    group.add_argument("--punkt-dir", type=str, default=None,
                       help="A punkt_tab model directory (or an nltk data root holding one). Without it, Punkt is "
                            "trained on the input's own text.")
    group.add_argument("--pile-domains", nargs="+", default=None, metavar="DOMAIN",
                       help="Keep only documents whose meta.pile_set_name is one of these (quote names with spaces).")
    group.add_argument("--split-by-domain", action="store_true",
                       help="Write one dataset per meta.pile_set_name: {output_prefix}_{Domain}_{key}_document.")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true", help="Append the EOD token to every non-empty document.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True, help="Path of the outputs without suffix.")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1, help="Encoding processes (default 1).")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Documents between progress lines (which also come at most every 5 s).")
    group.add_argument("--strict", action="store_true",
                       help="Fail (non-zero exit, no output) on the first bad input line instead of skipping it.")
    return parser


def preprocess_main(argv: Optional[List[str]] = None) -> int:
    args = preprocess_parser().parse_args(argv)
    if args.tokenizer_type is None:
        return _fail("--tokenizer-type is required")
    config = PreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, tokenizer=tokenizer_kwargs_from_args(args),
        json_keys=args.json_keys, split_sentences=args.split_sentences, keep_newlines=args.keep_newlines,
        append_eod=args.append_eod, workers=args.workers, log_interval=args.log_interval,
        pile_domains=args.pile_domains, split_by_domain=args.split_by_domain, strict=args.strict,
        punkt_dir=args.punkt_dir, lang=args.lang)
    try:
        run_preprocess(config)
    except KeyboardInterrupt:
        print("interrupted; no output dataset was written", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, LookupError) as err:
        return _fail(err)
    return 0


# -- merge_datasets ---------------------------------------------------------------------------------------


def merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Concatenate Megatron indexed datasets into one (atomic write).")
    parser.add_argument("--input", type=str, required=True, help="Directory holding the .bin/.idx pairs to merge.")
    parser.add_argument("--output-prefix", type=str, required=True, help="Path of the merged dataset without suffix.")
    parser.add_argument("--prefixes", nargs="+", default=None,
                        help="Merge only these dataset prefixes (names inside --input), in this order; "
                             "default: every pair in --input, sorted by name.")
    return parser


def merge_main(argv: Optional[List[str]] = None) -> int:
    args = merge_parser().parse_args(argv)
    try:
        prefixes = find_prefixes(args.input, args.prefixes)
        writer = merge_datasets(prefixes, args.output_prefix)
    except (OSError, ValueError) as err:
        return _fail(err)
    print(f"Merged {len(prefixes)} datasets ({writer.num_documents:,} documents, {writer.num_tokens:,} tokens) "
          f"into {args.output_prefix}.bin/.idx")
    return 0


# -- pile_blend -------------------------------------------------------------------------------------------


def pile_blend_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Print Megatron's --data-path blend ('w1 prefix1 w2 prefix2 ...') for per-domain datasets, "
                    "with the Pile sampling weights renormalised over the domains present.")
    parser.add_argument("--domain", nargs=2, action="append", metavar=("NAME", "PREFIX"), default=[],
                        help="A Pile domain name and its dataset prefix; repeat per domain.")
    parser.add_argument("--output-prefix", type=str, default=None,
                        help="Instead of --domain: find the datasets tools/preprocess_data.py --split-by-domain "
                             "wrote under this prefix.")
    parser.add_argument("--json-key", type=str, default="text", help="With --output-prefix: the dataset's JSON key.")
    parser.add_argument("--weights", type=str, default=None,
                        help="JSON object of domain -> weight (default: the MiLe paper's Pile weights).")
    parser.add_argument("--format", choices=("args", "json"), default="args",
                        help="'args': one line to paste after --data-path; 'json': a JSON list.")
    return parser


def pile_blend_main(argv: Optional[List[str]] = None) -> int:
    args = pile_blend_parser().parse_args(argv)
    try:
        weights = load_weights(args.weights)
        domains = dict(args.domain)
        if args.output_prefix is not None:
            domains.update(discover_domain_prefixes(args.output_prefix, weights, args.json_key))
            if not domains:
                raise BlendError(f"no per-domain dataset found under {args.output_prefix!r} "
                                 "(expected {prefix}_{Domain}_{key}_document.bin/.idx)")
        if not domains:
            raise BlendError("give --domain NAME PREFIX (repeatable) or --output-prefix")
        blend = blend_data_path(domains, weights)
    except (OSError, ValueError) as err:
        return _fail(err)
    print(json.dumps(blend) if args.format == "json" else " ".join(blend))
    return 0


# -- train_tokenizer --------------------------------------------------------------------------------------


def train_tokenizer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer (tokenizer.json, EOD "
                                                 "<|endoftext|>) on JSON-lines corpora, offline.")
    parser.add_argument("--input", type=str, required=True,
                        help="A .jsonl/.jsonl.zst/.jsonl.gz file, a directory of them, or a quoted glob.")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys holding the text.")
    parser.add_argument("--output-dir", type=str, required=True, help="Where tokenizer.json is written.")
    parser.add_argument("--vocab-size", type=int, default=16000, help="Vocabulary size, special tokens included.")
    parser.add_argument("--min-frequency", type=int, default=2, help="Minimum pair count for a merge.")
    parser.add_argument("--gpt2-files", action="store_true",
                        help="Also write vocab.json and merges.txt (for --tokenizer-type GPT2BPETokenizer).")
    return parser


def train_tokenizer_main(argv: Optional[List[str]] = None) -> int:
    args = train_tokenizer_parser().parse_args(argv)
    try:
        resolve_inputs(args.input)
        count = {"docs": 0}

        def texts():
            for text in iter_texts(args.input, tuple(args.json_keys)):
                count["docs"] += 1
                yield text

        tok = train_byte_level_bpe(texts(), args.vocab_size, args.min_frequency)
        if count["docs"] == 0:
            raise ValueError(f"--input {args.input!r}: no text under keys {args.json_keys} to train on")
        written = save_tokenizer(tok, args.output_dir, args.gpt2_files)
    except (OSError, ValueError) as err:
        return _fail(err)
    print(f"Trained on {count['docs']:,} texts: vocabulary {tok.get_vocab_size():,}; wrote {', '.join(written)}")
    return 0
