"""Tokenizers with Megatron-LM's names: ids, EOD, vocabulary size, errors, and the full round trip
text -> tools/preprocess_data.py -> .bin/.idx -> megatron-core IndexedDataset -> ids -> text for each type.

Every tokenizer is made in the test (a byte-level BPE trained with the tokenizers library, a SentencePiece
model trained with sentencepiece's trainer, GPT-2 vocab.json/merges.txt written from the BPE), and every
expected id sequence comes from an independent reference: a pure-Python GPT-2 BPE encoder written here,
SentencePiece's own processor, or plain integer parsing.
"""

import json

import pytest
import regex

from megatron_mile.data.cli import preprocess_main
from megatron_mile.data.tokenizers import TokenizerError, build_tokenizer

# The model-shape flags a run requires (as in Megatron-LM); tiny, since only the tokenizer matters here.
SHAPE = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "1"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was not amused!",
    "Python's standard library is very extensive, offering a wide range of facilities.",
    "Tokenizers split text into pieces; each piece maps to an integer id, 42 or 1337.",
    "Mixed case, numbers like 3.14159 and symbols (#, %, &) all need byte-level coverage.",
    "A second sentence follows the first. Then a third one arrives, rather late.",
    "Emoji and accents: café, naïve, Zürich, 東京, 🙂 are encoded as bytes.",
] * 20
TEXTS = [
    "The lazy dog jumps over the quick brown fox.",
    "Accents: café and naïve; numbers 2718 and symbols #%&.",
    "",
    "Zürich and 東京 🙂 are far apart.",
]


# ---- an independent GPT-2 byte-level BPE encoder (the published algorithm, written for this test) ----------

GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _byte_to_char():
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceGPT2:
    def __init__(self, vocab_file, merge_file):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(merge_file, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n") if line and not line.startswith("#version")]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.b2c = _byte_to_char()

    def _bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            first, second = next((a, b) for a, b in zip(parts, parts[1:]) if self.ranks.get((a, b)) == rank)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text):
        ids = []
        for piece in GPT2_PATTERN.findall(text):
            word = "".join(self.b2c[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[p] for p in self._bpe(word)]
        return ids


# ---- tokenizers made in the test --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from megatron_mile.data.tokenizer_training import save_tokenizer, train_byte_level_bpe

    d = tmp_path_factory.mktemp("tokenizers")
    bpe = train_byte_level_bpe(CORPUS, vocab_size=400, min_frequency=2)
    save_tokenizer(bpe, str(d / "hf"), gpt2_files=True)

    import sentencepiece as spm

    with open(d / "sp_corpus.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(d / "sp_corpus.txt"), model_prefix=str(d / "sp"), vocab_size=360,
                                   character_coverage=1.0, byte_fallback=True, num_threads=1,
                                   minloglevel=2)
    return d


def test_gpt2_tokenizer_matches_reference_bpe(tok_dir):
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(tok_dir / "hf" / "vocab.json"),
                          merge_file=str(tok_dir / "hf" / "merges.txt"))
    ref = ReferenceGPT2(tok_dir / "hf" / "vocab.json", tok_dir / "hf" / "merges.txt")
    vocab = json.load(open(tok_dir / "hf" / "vocab.json", encoding="utf-8"))
    assert tok.vocab_size == len(vocab)
    assert tok.eod == vocab["<|endoftext|>"]
    for text in TEXTS + CORPUS[:6] + ["  leading spaces\n\nand\ttabs  "]:
        assert tok.tokenize(text) == ref.encode(text)
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize_batch(TEXTS) == [ref.encode(t) for t in TEXTS]


def test_huggingface_tokenizer_file_or_directory(tok_dir):
    ref = ReferenceGPT2(tok_dir / "hf" / "vocab.json", tok_dir / "hf" / "merges.txt")
    for model in (tok_dir / "hf", tok_dir / "hf" / "tokenizer.json"):
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(model))
        assert tok.vocab_size == 400
        assert tok.eod == json.load(open(tok_dir / "hf" / "vocab.json"))["<|endoftext|>"]
        # No added special tokens: the byte-level BPE alone.
        assert tok.tokenize_batch(TEXTS) == [ref.encode(t) for t in TEXTS]


def test_huggingface_eos_from_tokenizer_config(tok_dir, tmp_path):
    import shutil

    shutil.copy(tok_dir / "hf" / "tokenizer.json", tmp_path / "tokenizer.json")
    vocab = json.load(open(tok_dir / "hf" / "vocab.json", encoding="utf-8"))
    some_token = next(t for t, i in vocab.items() if i == 300)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": some_token}}))
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path)).eod == 300


def test_sentencepiece_tokenizer_megatron_specials(tok_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "sp.model"))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tok_dir / "sp.model"))
    n = sp.get_piece_size()
    # Megatron-LM appends <CLS>, <SEP>, <EOD>, <MASK>, then <PAD> (this model has no pad piece); <s>/</s> exist.
    assert sp.pad_id() == -1 and sp.bos_id() >= 0 and sp.eos_id() >= 0
    assert tok.vocab_size == n + 5
    assert tok.eod == n + 2
    for text in TEXTS:
        assert tok.tokenize(text) == sp.encode_as_ids(text)
    assert tok.tokenize_batch(TEXTS) == [sp.encode_as_ids(t) for t in TEXTS]
    assert tok.tokenize("one<EOD>two") == sp.encode_as_ids("one") + [n + 2] + sp.encode_as_ids("two")


@pytest.mark.parametrize("kind, bos", [("GPTSentencePieceTokenizer", False), ("Llama2Tokenizer", True)])
def test_sentencepiece_model_as_it_is_with_or_without_bos(tok_dir, kind, bos):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "sp.model"))
    tok = build_tokenizer(kind, tokenizer_model=str(tok_dir / "sp.model"))
    # No added tokens: the model's pieces are the vocabulary; EOD is its EOS piece.
    assert (tok.vocab_size, tok.eod) == (sp.get_piece_size(), sp.eos_id())
    prefix = [sp.bos_id()] if bos else []
    for text in TEXTS + ["one<EOD>two"]:  # Megatron's special strings are plain text here
        assert tok.tokenize(text) == prefix + sp.encode_as_ids(text)
        assert tok.detokenize(tok.tokenize(text)) == sp.decode_ids(sp.encode_as_ids(text))
    assert tok.tokenize_batch(TEXTS) == [prefix + sp.encode_as_ids(t) for t in TEXTS]


def write_tiktoken_vocab(path, merges=(b"th", b"the", b" the")):
    """A tiktoken vocabulary file: the 256 single bytes, then `merges`."""
    import base64

    tokens = [bytes([i]) for i in range(256)] + list(merges)
    path.write_text(json.dumps([{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
                                for i, t in enumerate(tokens)]))
    return tokens


def test_tiktokenizer_needs_the_tiktoken_package(tmp_path):
    import importlib.util

    from megatron_mile.arguments import parse_args
    from megatron_mile.config import ConfigError

    if importlib.util.find_spec("tiktoken") is not None:
        pytest.skip("tiktoken is installed here")
    write_tiktoken_vocab(tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match="needs the tiktoken package, which is not installed: pip install tiktoken"):
        build_tokenizer("TikTokenizer", tokenizer_model=str(tmp_path / "vocab.json"), tiktoken_pattern="v2",
                        vocab_size=1259)
    with pytest.raises(ConfigError, match="needs the tiktoken package"):
        parse_args(["--mock-data", *SHAPE, "--train-iters", "1", "--tokenizer-type", "TikTokenizer", "--tokenizer-model",
                    str(tmp_path / "vocab.json"), "--tiktoken-pattern", "v2"])


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktokenizer_is_tiktokens_encoding_behind_the_special_ids(tmp_path, pattern):
    tiktoken = pytest.importorskip("tiktoken")
    from megatron_mile.data.tokenizers import TIKTOKEN_PATTERNS

    tokens = write_tiktoken_vocab(tmp_path / "vocab.json")
    tok = build_tokenizer("TikTokenizer", tokenizer_model=str(tmp_path / "vocab.json"), tiktoken_pattern=pattern,
                          vocab_size=len(tokens) + 10, tiktoken_num_special_tokens=10)
    reference = tiktoken.Encoding(name="reference", pat_str=TIKTOKEN_PATTERNS[pattern],
                                  mergeable_ranks={t: i + 10 for i, t in enumerate(tokens)}, special_tokens={})
    assert (tok.vocab_size, tok.eod) == (len(tokens) + 10, 2)
    for text in TEXTS + ["the theme of the thesis"]:
        assert tok.tokenize(text) == reference.encode_ordinary(text)
        assert tok.detokenize(tok.tokenize(text)) == text


@pytest.mark.parametrize("entries, message", [
    ("{", "not a JSON tiktoken vocabulary"),
    ("{}", "expected a JSON list"),
    ('[{"rank": 1, "token_bytes": "AA==", "token_str": ""}]', "entry 0"),
    ('[{"rank": 0, "token_bytes": "AQ==", "token_str": ""}]', "entry 0: the first 256 entries must be the single"),
    ('[{"rank": 0, "token_bytes": "not base64!", "token_str": ""}]', "entry 0"),
])
def test_tiktoken_vocabulary_files_are_checked(tmp_path, entries, message):
    from megatron_mile.data.tokenizers import read_tiktoken_vocab

    path = tmp_path / "vocab.json"
    path.write_text(entries)
    with pytest.raises(TokenizerError, match=message):
        read_tiktoken_vocab(str(path))
    write_tiktoken_vocab(path)
    assert read_tiktoken_vocab(str(path), max_vocab=257) == {**{bytes([i]): i for i in range(256)}, b"th": 256}


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert (tok.vocab_size, tok.eod) == (1001, 1000)
    assert tok.tokenize("5 17  999\n3") == [5, 17, 999, 3]
    assert tok.tokenize("") == []
    assert tok.detokenize([5, 17]) == "5 17"


@pytest.mark.parametrize("kwargs, flag", [
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nonexistent/tok"), "--tokenizer-model"),
    (dict(tokenizer_type="HuggingFaceTokenizer"), "--tokenizer-model"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nonexistent.model"), "--tokenizer-model"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nonexistent.json", merge_file="/x"), "--vocab-file"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=__file__), "--merge-file"),
    (dict(tokenizer_type="NullTokenizer"), "--vocab-size"),
    (dict(tokenizer_type="Llama2Tokenizer", tokenizer_model="/nonexistent.model"), "--tokenizer-model"),
    (dict(tokenizer_type="TikTokenizer", tokenizer_model="v.json"), "--tiktoken-pattern"),
    (dict(tokenizer_type=None), "--tokenizer-type"),
    (dict(tokenizer_type="BertWordPieceCase"), "--tokenizer-type"),
])
def test_missing_files_and_flags_name_the_flag(kwargs, flag):
    with pytest.raises(TokenizerError, match=flag):
        build_tokenizer(**kwargs)


def test_add_tokenizer_args_has_megatron_flags():
    import argparse

    from megatron_mile.data.tokenizers import add_tokenizer_args

    args = add_tokenizer_args(argparse.ArgumentParser()).parse_args(
        ["--tokenizer-type", "NullTokenizer", "--vocab-size", "7", "--tokenizer-model", "m",
         "--vocab-file", "v", "--merge-file", "g"])
    assert (args.tokenizer_type, args.vocab_size, args.tokenizer_model, args.vocab_file, args.merge_file) == \
        ("NullTokenizer", 7, "m", "v", "g")


# ---- full round trip per tokenizer type -------------------------------------------------------------------


def _flags(kind, tok_dir):
    if kind == "HuggingFaceTokenizer":
        return ["--tokenizer-model", str(tok_dir / "hf")]
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        return ["--tokenizer-model", str(tok_dir / "sp.model")]
    if kind == "GPT2BPETokenizer":
        return ["--vocab-file", str(tok_dir / "hf" / "vocab.json"), "--merge-file", str(tok_dir / "hf" / "merges.txt")]
    return ["--vocab-size", "5000"]


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                  "Llama2Tokenizer", "GPT2BPETokenizer", "NullTokenizer"])
def test_round_trip_through_megatron_indexed_dataset(kind, tok_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if kind == "NullTokenizer":
        texts = ["1 2 3", "", "4999 0 17 17"]
    elif "SentencePiece" in kind or kind == "Llama2Tokenizer":
        texts = ["The lazy dog jumps over the quick brown fox.", "", "A second sentence follows the first."]
    else:
        texts = TEXTS
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    rc = preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--append-eod",
                          "--tokenizer-type", kind, *_flags(kind, tok_dir)])
    assert rc == 0
    sentencepiece = "Sentence" in kind or kind == "Llama2Tokenizer"
    tok = build_tokenizer(kind, tokenizer_model=str(tok_dir / ("sp.model" if sentencepiece else "hf")),
                          vocab_file=str(tok_dir / "hf" / "vocab.json"), merge_file=str(tok_dir / "hf" / "merges.txt"),
                          vocab_size=5000)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.index.dtype.__name__ == "uint16"
    # One document-index entry per document; the empty one has no sequence (with Llama2Tokenizer, as in
    # Megatron-LM, it has one: the BOS that tokenize puts before every text, and the EOD).
    assert len(ds.document_indices) == len(texts) + 1
    sequences = iter(range(len(ds)))
    for i, text in enumerate(texts):
        start, end = ds.document_indices[i], ds.document_indices[i + 1]
        if not text and kind != "Llama2Tokenizer":
            assert start == end
            continue
        assert end - start == 1
        ids = ds[next(sequences)].tolist()
        assert ids[-1] == tok.eod
        assert tok.detokenize(ids[:-1]) == text
        assert ids[:-1] == tok.tokenize(text)


def test_train_tokenizer_tool(tmp_path):
    import gzip

    from megatron_mile.data.cli import train_tokenizer_main

    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in CORPUS:
            f.write(json.dumps({"text": text}) + "\n")
    assert train_tokenizer_main(["--input", str(tmp_path / "corpus.jsonl.gz"), "--output-dir", str(tmp_path / "tok"),
                                 "--vocab-size", "300", "--gpt2-files"]) == 0
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"))
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "tok" / "vocab.json"),
                           merge_file=str(tmp_path / "tok" / "merges.txt"))
    raw = json.load(open(tmp_path / "tok" / "tokenizer.json", encoding="utf-8"))
    assert raw["model"]["vocab"]["<|endoftext|>"] == tok.eod == gpt2.eod
    assert tok.vocab_size == gpt2.vocab_size == 300
    text = "Zürich: the quick brown fox, 3.14!"
    assert tok.tokenize(text) == gpt2.tokenize(text)
    assert tok.detokenize(tok.tokenize(text)) == text


def test_a_trained_tokenizer_names_its_end_of_document_token_for_transformers(tok_dir):
    """tools/train_tokenizer.py's output loads in transformers' AutoTokenizer (which Megatron-LM's
    HuggingFaceTokenizer uses) with <|endoftext|> as EOS, and encodes as the data pipeline does."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tok_dir / "hf")
    ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tok_dir / "hf" / "tokenizer.json"))
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eod == 0
    assert theirs(CORPUS[0])["input_ids"] == ours.tokenize(CORPUS[0])


@pytest.mark.parametrize("kind", ["GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_the_run_builds_the_named_sentencepiece_tokenizer(tok_dir, kind):
    import sentencepiece as spm

    from megatron_mile.arguments import parse_args
    from megatron_mile.config import ConfigError
    from megatron_mile.training.data import build_run_tokenizer

    base = ["--mock-data", *SHAPE, "--train-iters", "1", "--tokenizer-type", kind]
    with pytest.raises(ConfigError, match=f"{kind} needs --tokenizer-model"):
        parse_args(base)
    tok = build_run_tokenizer(parse_args(base + ["--tokenizer-model", str(tok_dir / "sp.model")]))
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "sp.model"))
    assert type(tok).__name__ == kind and (tok.vocab_size, tok.eod) == (sp.get_piece_size(), sp.eos_id())


def test_tiktoken_pattern_with_another_tokenizer_is_said_unused():
    from megatron_mile.arguments import parse_args

    base = ["--mock-data", *SHAPE, "--train-iters", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    config = parse_args(base + ["--tiktoken-pattern", "v2"])
    assert [n for n in config.notes if n.startswith("--tiktoken-pattern v2: only TikTokenizer reads it")]
    assert not [n for n in parse_args(base).notes if n.startswith("--tiktoken-pattern")]
