"""Turn JSON-lines corpora into Megatron indexed datasets (``.bin``/``.idx``), fast and atomically.

Output is byte-identical to Megatron-LM's tools/preprocess_data.py for the same input and tokenizer:
one document per JSON line, the tokenizer's ids without added special tokens, the EOD id appended to each
non-empty document with ``append_eod``, an empty document recorded in the document index with no
sequence, uint16 tokens below 65,500 vocabulary entries (else int32). With ``split_sentences`` each
sentence is a sequence and the EOD id ends the last sentence of a document.

Where it differs, on purpose:
- Speed: no torch or megatron import anywhere in the pipeline (see indexed_writer.py); workers receive
  batches of raw lines, parse and encode a whole batch in one tokenizer call, and return compact numpy
  arrays; ``workers == 1`` encodes in-process instead of paying for a pool.
- Bad input does not crash the run: a line that is not UTF-8, not JSON, not an object, or lacks a key is
  skipped (it gets no document-index entry), counted, and reported with its line number; ``strict`` makes
  any of them fatal. Empty texts are reported too but still get their (empty) document-index entry, as
  Megatron-LM writes them, so that clean corpora stay byte-identical.
- Every token id is checked against the tokenizer's vocabulary (a tokenizer file can number a token past
  its own size): such an id stops the run with the tokenizer file and the id named.
- Pile helpers: keep only some ``meta.pile_set_name`` domains, or write one dataset per domain.
- Outputs appear only complete (temporary names, renamed at the end); Ctrl-C, SIGTERM or even SIGKILL of
  the tool ends its workers too (worker_pool.py).
"""

from __future__ import annotations

import os

# The tokenizers library would otherwise start a thread pool per process: with one process per core
# that oversubscribes the CPU, and after fork() it prints a warning. Parallelism here is the worker pool.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import itertools
import multiprocessing
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_mile.data.indexed_writer import IndexedDatasetWriter, dtype_for_vocab
from megatron_mile.data.preprocess_report import (
    BAD_INPUT_REASONS,
    EXAMPLES_PER_REASON,
    ProgressLog,
    summary_lines,
)
from megatron_mile.data.readers import InputProgress, iter_lines, iter_texts, parse_line, pile_set_name, resolve_inputs
from megatron_mile.data.tokenizers import build_tokenizer
from megatron_mile.data.worker_pool import WorkerDied, WorkerPool


class PreprocessError(RuntimeError):
    """The run cannot produce a dataset; the message says why and what to change."""


@dataclass
class PreprocessConfig:
    """Settings of one preprocessing run (the tool's flags, in Megatron-LM's spelling)."""

    input: str
    """A .jsonl/.jsonl.zst/.jsonl.gz file, a directory of them, or a glob."""
    output_prefix: str
    """Outputs are {output_prefix}[_{domain}]_{key}_{document|sentence}.bin/.idx."""
    tokenizer: dict
    """Keyword arguments of megatron_mile.data.tokenizers.build_tokenizer."""
    json_keys: Sequence[str] = ("text",)
    """JSON keys to tokenize; one dataset per key."""
    split_sentences: bool = False
    """One sequence per sentence (nltk Punkt) instead of one per document."""
    keep_newlines: bool = False
    """With split_sentences: keep the whitespace (newlines) after each sentence."""
    append_eod: bool = False
    """Append the tokenizer's EOD id to every non-empty document."""
    workers: int = 1
    """Encoding processes; 1 encodes in this process."""
    log_interval: int = 1000
    """Print progress every this many documents, at most every preprocess_report.PROGRESS_MIN_SECONDS."""
    pile_domains: Optional[Sequence[str]] = None
    """Keep only documents whose meta.pile_set_name is one of these."""
    split_by_domain: bool = False
    """Write one dataset per meta.pile_set_name."""
    strict: bool = False
    """Treat any bad input line as fatal."""
    punkt_dir: Optional[str] = None
    """A punkt_tab model (see sentences.find_punkt_dir); None trains Punkt on the input."""
    lang: str = "english"
    """Punkt model language under punkt_dir."""
    punkt_train_chars: int = 4_000_000
    """Characters of input text used to train Punkt when no punkt_dir is given."""
    batch_lines: int = 256
    """Lines per work unit sent to a worker."""
    batch_bytes: int = 2 << 20
    """Bytes per work unit (whichever limit is reached first)."""


@dataclass
class PreprocessResult:
    """What a run read, wrote and skipped."""

    outputs: Dict[str, str] = field(default_factory=dict)
    """Dataset prefix written, keyed by '{domain}/{key}' ('/{key}' without domains)."""
    lines: int = 0
    documents: int = 0
    tokens: int = 0
    sequences: int = 0
    bytes: int = 0
    filtered: int = 0
    domain_documents: Counter = field(default_factory=Counter)
    bad: Counter = field(default_factory=Counter)
    bad_examples: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0
    punkt_source: Optional[str] = None


def sanitize_domain(name: str) -> str:
    """A file-name-safe form of a Pile domain name: 'Wikipedia (en)' -> 'Wikipedia_en'."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    if not cleaned:
        raise PreprocessError(f"domain name {name!r} has no letters or digits to name a file after")
    return cleaned


def dataset_prefix(output_prefix: str, key: str, split_sentences: bool, domain: Optional[str] = None) -> str:
    """The dataset prefix Megatron-LM's naming gives one key (and, here, one domain)."""
    level = "sentence" if split_sentences else "document"
    middle = f"_{sanitize_domain(domain)}" if domain is not None else ""
    return f"{output_prefix}{middle}_{key}_{level}"


# ---------------------------------------------------------------------------------------------------------
# Worker side. Globals hold per-process state set once by _init_worker (a tokenizer is not cheap to pickle).

_W: dict = {}


def _init_worker(tokenizer_kwargs: dict, options: dict, punkt_params) -> None:
    _W.clear()
    _W.update(options)
    _W["tokenizer"] = build_tokenizer(**tokenizer_kwargs)
    _W["dtype"] = dtype_for_vocab(_W["tokenizer"].vocab_size)
    _W["tokenizer_source"] = tokenizer_source(tokenizer_kwargs)
    if punkt_params is not None:
        from megatron_mile.data.sentences import make_splitter  # nltk: only when sentences are split

        _W["splitter"] = make_splitter(punkt_params, options["keep_newlines"])
    else:
        _W["splitter"] = None


def tokenizer_source(tokenizer_kwargs: dict) -> str:
    """The tokenizer file (or flags) a tokenizer was built from, for messages."""
    path = tokenizer_kwargs.get("tokenizer_model") or tokenizer_kwargs.get("vocab_file")
    if path:
        return str(path)
    return f"{tokenizer_kwargs.get('tokenizer_type')} (--vocab-size {tokenizer_kwargs.get('vocab_size')})"


def _checked_ids(ids: np.ndarray) -> np.ndarray:
    """int64 token ids -> the dataset dtype, refusing any id outside the tokenizer's vocabulary.

    Why: a tokenizer file can map a token to an id at or past its own size (a gap in the vocabulary, an
    added token numbered beyond it). Such an id would embed past the model's vocabulary, or not fit the
    dtype chosen from the vocabulary size. One vectorised min/max per batch.
    """
    vocab_size = _W["tokenizer"].vocab_size
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = int(ids[(ids >= vocab_size) | (ids < 0)][0])
        dtype = _W["dtype"]
        fits = bad <= np.iinfo(dtype).max and bad >= 0
        raise PreprocessError(
            f"the tokenizer {_W['tokenizer_source']} produced token id {bad}, outside its vocabulary of "
            f"{vocab_size:,} entries (ids 0..{vocab_size - 1:,})"
            + ("" if fits else f", which the dataset's {dtype.name} tokens cannot even store")
            + (": the text holds ids past --vocab-size; raise --vocab-size or fix the input"
               if _W["tokenizer_source"].startswith("NullTokenizer") else
               ": the tokenizer file numbers a token past its own size; fix or re-train the tokenizer"))
    return ids.astype(_W["dtype"])


def _tokenize_all(texts: List[str]) -> Tuple[List[Optional[List[int]]], bool]:
    """Ids of each text; None for a text the tokenizer rejects (only NullTokenizer can)."""
    tok = _W["tokenizer"]
    try:
        return tok.tokenize_batch(texts), False
    except Exception:  # noqa: BLE001 - find out which text is at fault, one by one
        out = []
        for text in texts:
            try:
                out.append(tok.tokenize(text))
            except Exception:  # noqa: BLE001
                out.append(None)
        return out, True


def _encode_batch(work: Tuple[int, str, List[Tuple[int, bytes]]]):
    """Parse, filter, split and tokenize one batch of raw lines.

    Returns (batch_id, groups, stats): ``groups[domain][key] = (tokens, sequence_lengths,
    sequences_per_document)`` in input order, and ``stats`` with counts and bad-line reports.
    """
    batch_id, path, lines = work
    keys = _W["json_keys"]
    keep_domains = _W["pile_domains"]
    by_domain = _W["split_by_domain"]
    splitter = _W["splitter"]
    bad: List[Tuple[str, str]] = []  # (reason, "path:line")
    filtered = 0
    n_bytes = 0
    n_lines = 0

    # Pass 1: parse and select documents; collect every text to encode (sentences when splitting).
    docs: List[Tuple[Optional[str], int]] = []  # (domain group, line) per accepted document
    texts: List[str] = []
    pieces: List[List[Tuple[int, int]]] = []  # per doc: per key, (first text index, number of texts)
    for line_number, raw in lines:
        n_bytes += len(raw)
        if not raw.strip():
            continue  # blank lines carry no document
        n_lines += 1
        where = f"{path}:{line_number}"
        obj, error = parse_line(raw)
        if error is None and not isinstance(obj, dict):
            error = "not_an_object"
        if error is not None:
            bad.append((error, where))
            continue
        domain = None
        if keep_domains is not None or by_domain:
            domain = pile_set_name(obj)
            if domain is None:
                bad.append(("missing_domain", where))
                continue
            if keep_domains is not None and domain not in keep_domains:
                filtered += 1
                continue
        values = [obj.get(k) for k in keys]
        if not all(_is_text(v) for v in values):
            bad.append(("missing_key", where))
            continue
        spans = []
        for value in values:
            if not value or (isinstance(value, list) and not any(value)):
                bad.append(("empty_text", where))
            if isinstance(value, list):
                parts = value  # already split into sentences (Megatron-LM's "_ss" files hold such lists)
            else:
                parts = splitter_split(splitter, value) if splitter is not None else [value]
            spans.append((len(texts), len(parts)))
            texts.extend(parts)
        docs.append((domain if by_domain else None, line_number))
        pieces.append(spans)

    # Pass 2: one tokenizer call for the whole batch.
    ids, had_failures = _tokenize_all(texts) if texts else ([], False)

    # Pass 3: assemble per-group, per-key arrays in document order.
    eod = _W["tokenizer"].eod if _W["append_eod"] else None
    acc: Dict[Optional[str], Dict[str, Tuple[list, list, list]]] = {}
    for (group, line_number), spans in zip(docs, pieces):
        if had_failures and any(ids[i] is None for start, n in spans for i in range(start, start + n)):
            bad.append(("untokenizable", f"{path}:{line_number}"))
            continue
        per_key = acc.setdefault(group, {k: ([], [], []) for k in keys})
        for key, (start, n) in zip(keys, spans):
            tokens, lengths, counts = per_key[key]
            doc_lengths = []
            for i in range(start, start + n):
                sentence = ids[i]
                if sentence:  # sentences that tokenize to nothing are dropped, as Megatron-LM does
                    tokens.append(sentence)
                    doc_lengths.append(len(sentence))
            if doc_lengths and eod is not None:
                tokens.append([eod])
                doc_lengths[-1] += 1
            lengths.extend(doc_lengths)
            counts.append(len(doc_lengths))

    groups = {}
    for group, per_key in acc.items():
        groups[group] = {}
        for key, (tokens, lengths, counts) in per_key.items():
            # chain.from_iterable walks the nested lists in C; int64 holds any id, checked before narrowing.
            flat = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int64, count=sum(lengths))
            groups[group][key] = (_checked_ids(flat), np.asarray(lengths, np.int32), np.asarray(counts, np.int64))
    stats = {"bytes": n_bytes, "lines": n_lines, "filtered": filtered, "bad": bad}
    return batch_id, groups, stats


def _is_text(value) -> bool:
    """A document text: a string, or a list of strings (sentences split beforehand)."""
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def splitter_split(splitter, text: str) -> List[str]:
    from megatron_mile.data.sentences import split_sentences  # nltk: only when sentences are split

    return split_sentences(splitter, text)


# ---------------------------------------------------------------------------------------------------------
# Parent side.


def _batches(files: List[str], batch_lines: int, batch_bytes: int,
             progress: Optional[InputProgress] = None) -> Iterator[Tuple[int, str, list]]:
    batch_id = 0
    for path in files:
        lines: List[Tuple[int, bytes]] = []
        size = 0
        for line_number, raw in iter_lines(path, progress):
            lines.append((line_number, raw))
            size += len(raw)
            if len(lines) >= batch_lines or size >= batch_bytes:
                yield batch_id, path, lines
                batch_id += 1
                lines, size = [], 0
        if lines:
            yield batch_id, path, lines
            batch_id += 1


def _prepare_punkt(config: PreprocessConfig, files: List[str], result: PreprocessResult, log):
    """Punkt parameters for sentence splitting: loaded from --punkt-dir, or trained on the input."""
    from megatron_mile.data import sentences  # nltk: imported only when sentences are split

    if config.punkt_dir is not None:
        params = sentences.load_punkt(config.punkt_dir, config.lang)
        result.punkt_source = sentences.find_punkt_dir(config.punkt_dir, config.lang)
        log(f"Sentence splitting with the punkt_tab model in {result.punkt_source}")
        return params
    log(f"No --punkt-dir given: training nltk's Punkt sentence splitter on up to "
        f"{config.punkt_train_chars:,} characters of the input's own text")
    start = time.time()
    texts = (t for f in files for t in iter_texts(f, tuple(config.json_keys)))
    params = sentences.train_punkt(texts, config.punkt_train_chars)
    model_dir = sentences.save_punkt(params, f"{config.output_prefix}_punkt_tab")
    result.punkt_source = "trained on input"
    log(f"Trained Punkt in {time.time() - start:.1f} s; saved the model to {model_dir} "
        f"(reuse it with --punkt-dir {model_dir})")
    return params


def run_preprocess(config: PreprocessConfig, log=print, progress=None) -> PreprocessResult:
    """Run one preprocessing job; returns its statistics.

    ``log`` gets the start-up and summary lines, ``progress`` the progress lines (default: stderr).

    Raises:
        PreprocessError: no input documents, nothing left to write, (strict) bad input, a token id outside
            the tokenizer's vocabulary, or a worker process that died.
        InputError / TokenizerError: unreadable input or unusable tokenizer flags.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the workers are ended and no output is left behind.
    """
    if progress is None:
        progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start = time.time()
    result = PreprocessResult()
    if config.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {config.workers}")
    if config.keep_newlines and not config.split_sentences:
        log("Note: --keep-newlines has no effect without --split-sentences")
    files = resolve_inputs(config.input)
    tokenizer = build_tokenizer(**config.tokenizer)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    if config.append_eod and tokenizer.eod is None:
        raise PreprocessError("--append-eod: the tokenizer has no end-of-document token")
    input_progress = InputProgress(files)
    log(f"Input: {len(files)} file(s), {input_progress.total_bytes / 2**20:,.1f} MB on disk; tokenizer "
        f"{config.tokenizer.get('tokenizer_type')} (vocab {tokenizer.vocab_size:,}, EOD {tokenizer.eod}, tokens "
        f"stored as {dtype.name}); {config.workers} worker(s)")
    punkt_params = _prepare_punkt(config, files, result, log) if config.split_sentences else None

    options = {
        "json_keys": list(config.json_keys),
        "pile_domains": set(config.pile_domains) if config.pile_domains else None,
        "split_by_domain": config.split_by_domain,
        "append_eod": config.append_eod,
        "keep_newlines": config.keep_newlines,
    }
    writers: Dict[Tuple[Optional[str], str], IndexedDatasetWriter] = {}
    pool = None
    # SIGTERM (a job scheduler, `timeout`) must clean up like Ctrl-C does: turn it into an exception.
    previous_term = signal.getsignal(signal.SIGTERM)

    def _on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    in_main_thread = multiprocessing.current_process().name == "MainProcess"
    if in_main_thread:
        try:
            signal.signal(signal.SIGTERM, _on_term)
        except ValueError:  # not the main thread of the interpreter
            in_main_thread = False
    try:
        work = _batches(files, config.batch_lines, config.batch_bytes, input_progress)
        if config.workers == 1:
            _init_worker(config.tokenizer, options, punkt_params)
            results = map(_encode_batch, work)
        else:
            pool = WorkerPool(config.workers, _init_worker, (config.tokenizer, options, punkt_params))
            results = pool.ordered_map(_encode_batch, work)
        progress_log = ProgressLog(progress, config.log_interval, input_progress)
        for _, groups, stats in results:
            _count_input(result, stats, config.strict)
            for group, per_key in groups.items():
                for key, (tokens, lengths, counts) in per_key.items():
                    writer = writers.get((group, key))
                    if writer is None:
                        prefix = dataset_prefix(config.output_prefix, key, config.split_sentences, group)
                        writer = writers[(group, key)] = IndexedDatasetWriter(prefix, dtype)
                    writer.add_batch(tokens, lengths, counts)
                n_docs = int(next(iter(per_key.values()))[2].size)
                result.documents += n_docs
                result.domain_documents[group] += n_docs
            progress_log.update(result.documents, result.bytes)

        if result.lines == 0:
            raise PreprocessError(f"--input {config.input!r} holds no documents (no non-blank lines)")
        if not writers:
            hint = ""
            if result.filtered:
                hint = f"; all {result.filtered} documents were filtered out by --pile-domains"
            raise PreprocessError(f"no document could be written{hint}; see the skipped-line report above"
                                  if not hint else f"no document could be written{hint}")
        for (group, key), writer in writers.items():
            writer.finalize()
            result.outputs[f"{group or ''}/{key}"] = writer.prefix
            result.tokens += writer.num_tokens
            result.sequences += writer.num_sequences
    except BaseException as error:
        if pool is not None:
            pool.stop()
            pool = None
        for writer in writers.values():
            writer.abort()
        _report(result, config, log, start, failed=True)
        if isinstance(error, WorkerDied):
            raise PreprocessError(f"{error}; rerun with fewer --workers or check the system log") from None
        raise
    finally:
        if pool is not None:
            pool.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_term)
    result.seconds = time.time() - start
    _report(result, config, log, start)
    return result


def _count_input(result: PreprocessResult, stats: dict, strict: bool) -> None:
    """Add one batch's input statistics to the result; with ``strict`` the first bad line is fatal."""
    result.bytes += stats["bytes"]
    result.lines += stats["lines"]
    result.filtered += stats["filtered"]
    for reason, where in stats["bad"]:
        result.bad[reason] += 1
        if len(result.bad_examples[reason]) < EXAMPLES_PER_REASON:
            result.bad_examples[reason].append(where)
    if strict and stats["bad"]:
        reason, where = stats["bad"][0]
        raise PreprocessError(f"--strict: bad input at {where}: {BAD_INPUT_REASONS[reason]}")


def _report(result: PreprocessResult, config: PreprocessConfig, log, start: float, failed: bool = False) -> None:
    show_domains = bool(config.split_by_domain or config.pile_domains)
    for line in summary_lines(result, time.time() - start, show_domains, failed, config.strict):
        log(line)
