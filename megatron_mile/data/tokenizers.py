"""Tokenizers with Megatron-LM's type names and interface, built offline and without torch.

The training code and the preprocessing tool both call :func:`build_tokenizer` with the parsed
``--tokenizer-type/--tokenizer-model/--vocab-file/--merge-file/--vocab-size`` flags. Every tokenizer
exposes Megatron-LM's interface: ``vocab_size``, ``eod``, ``tokenize(text) -> list[int]`` (no added
special tokens), ``detokenize(ids) -> str``, plus ``tokenize_batch(texts)`` for throughput.

What matches Megatron-LM, and why it matters: the ids written to ``.bin`` files, the EOD id and the
vocabulary size (which picks the on-disk dtype) must be the same as Megatron-LM's tokenizers produce,
so that data preprocessed here trains the same as data preprocessed there.

- ``HuggingFaceTokenizer``: a ``tokenizer.json`` (or a directory holding one) loaded with the
  ``tokenizers`` library directly; vocab size counts added tokens, like ``len(AutoTokenizer)``.
- ``SentencePieceTokenizer``: Megatron-LM's wrapper appends ``<CLS> <SEP> <EOD> <MASK>`` (and
  pad/bos/eos when the model has none) after the model's pieces; EOD is ``<EOD>``; those special
  strings in the text map to their ids.
- ``GPTSentencePieceTokenizer`` and ``Llama2Tokenizer``: a SentencePiece ``.model`` as it is (no added
  tokens: the vocabulary is the model's pieces), EOD is the model's EOS piece; ``Llama2Tokenizer`` puts the
  model's BOS before every text it tokenizes (Megatron-LM's text-completion default), the other adds nothing.
- ``TikTokenizer``: a tiktoken BPE vocabulary (``--tokenizer-model``: JSON list of ``{"rank", "token_bytes",
  "token_str"}``) under ``--tiktoken-pattern`` v1/v2; ``--tiktoken-num-special-tokens`` ids come first
  (``<unk>``, ``<s>``, ``</s>``, then fillers), the vocabulary is ``--vocab-size`` (default 2**17); EOD is
  ``</s>``. Needs the optional ``tiktoken`` package.
- ``GPT2BPETokenizer``: GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; EOD is
  ``<|endoftext|>``.
- ``NullTokenizer``: the text is whitespace-separated integer ids; EOD is ``--vocab-size`` and the
  vocabulary has ``--vocab-size + 1`` entries.

Heavy libraries are imported inside the constructors so that importing this module stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "TikTokenizer", "GPT2BPETokenizer", "NullTokenizer")
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# The pre-tokenisation regexes Megatron-LM's TikTokenizer offers (--tiktoken-pattern): the ids depend on them.
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
TIKTOKEN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
MAX_TIKTOKEN_VOCAB_BYTES = 512 * 1024 * 1024  # a 200k-token vocabulary file is ~20 MB

# End-of-document candidates for a bare tokenizer.json, which (unlike a transformers directory) does not
# say which token is EOS. Checked in this order.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[EOS]")


class TokenizerError(ValueError):
    """A tokenizer could not be built from the given flags; the message names the flag to fix."""


def add_tokenizer_args(parser):
    """Add Megatron-LM's tokenizer flags to ``parser`` and return it.

    Only the flags this project's tokenizers use: --tokenizer-type, --tokenizer-model, --vocab-file,
    --merge-file, --vocab-size, --tiktoken-pattern, --tiktoken-num-special-tokens.
    """
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, default=None, choices=TOKENIZER_TYPES,
                       help="Which tokenizer to use.")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="HuggingFaceTokenizer: tokenizer.json or a directory holding one; "
                            "SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer: the .model file; "
                            "TikTokenizer: its JSON vocabulary.")
    group.add_argument("--vocab-file", type=str, default=None, help="GPT2BPETokenizer: vocab.json.")
    group.add_argument("--merge-file", type=str, default=None, help="GPT2BPETokenizer: merges.txt.")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: number of ids before the EOD id; TikTokenizer: the vocabulary size.")
    group.add_argument("--tiktoken-pattern", type=str, default=None, choices=sorted(TIKTOKEN_PATTERNS),
                       help="TikTokenizer: the pre-tokenisation regex.")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids reserved for special tokens before the vocabulary's.")
    return parser


def build_tokenizer(tokenizer_type: Optional[str], *, tokenizer_model: Optional[str] = None,
                    vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                    vocab_size: Optional[int] = None, tiktoken_pattern: Optional[str] = None,
                    tiktoken_num_special_tokens: int = 1000, **unused):
    """Build the tokenizer named by ``tokenizer_type`` (Megatron-LM's --tokenizer-type names).

    Extra keyword arguments are accepted and ignored so that ``build_tokenizer(**vars(args))``-style
    calls with a full training namespace work.

    Raises:
        TokenizerError: unknown type, a required flag missing, or a file that does not exist.
    """
    if tokenizer_type is None:
        raise TokenizerError(f"--tokenizer-type is required; choose one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(_require(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type in SENTENCEPIECE_TYPES:
        path = _require(tokenizer_model, "--tokenizer-model", tokenizer_type)
        _require_file(path, "--tokenizer-model")
        classes = {"SentencePieceTokenizer": SentencePieceTokenizer,
                   "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer, "Llama2Tokenizer": Llama2Tokenizer}
        return classes[tokenizer_type](path)
    if tokenizer_type == "TikTokenizer":
        path = _require(tokenizer_model, "--tokenizer-model", tokenizer_type)
        pattern = _require(tiktoken_pattern, "--tiktoken-pattern (v1 or v2)", tokenizer_type)
        return TikTokenizer(path, pattern, vocab_size, tiktoken_num_special_tokens)
    if tokenizer_type == "GPT2BPETokenizer":
        vocab = _require(vocab_file, "--vocab-file", tokenizer_type)
        merges = _require(merge_file, "--merge-file", tokenizer_type)
        _require_file(vocab, "--vocab-file")
        _require_file(merges, "--merge-file")
        return GPT2BPETokenizer(vocab, merges)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(_require(vocab_size, "--vocab-size", tokenizer_type))
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type!r} is not supported here; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def tokenizer_kwargs_from_args(args) -> dict:
    """The keyword arguments of :func:`build_tokenizer` taken from an argparse namespace."""
    return {
        "tokenizer_type": getattr(args, "tokenizer_type", None),
        "tokenizer_model": getattr(args, "tokenizer_model", None),
        "vocab_file": getattr(args, "vocab_file", None),
        "merge_file": getattr(args, "merge_file", None),
        "vocab_size": getattr(args, "vocab_size", None),
        "tiktoken_pattern": getattr(args, "tiktoken_pattern", None),
        "tiktoken_num_special_tokens": getattr(args, "tiktoken_num_special_tokens", 1000),
    }


def _require(value, flag: str, tokenizer_type: str):
    if value is None:
        raise TokenizerError(f"{tokenizer_type} needs {flag}")
    return value


def _require_file(path: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path!r}: no such file")


class _BaseTokenizer:
    """Shared behaviour: batch encoding falls back to a loop over ``tokenize``.

    ``unique_identifiers`` names the tokenizer and its files, as Megatron's tokenizers do: megatron-core's
    datasets put it in the hash that names their cached sample indices.
    """

    vocab_size: int
    eod: int

    def _identify(self, *paths, **options) -> None:
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [str(p) for p in paths]}
        self.unique_identifiers.update({k: str(v) for k, v in options.items()})

    def tokenize(self, text: str) -> List[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, without added special tokens."""
        return [self.tokenize(t) for t in texts]

    @property
    def eos(self) -> int:
        return self.eod


class _RustBPETokenizer(_BaseTokenizer):
    """A ``tokenizers.Tokenizer`` underneath: encode in one Rust call per batch."""

    def __init__(self, tok) -> None:
        self._tok = tok
        # encode_batch_fast skips offset tracking, which the data pipeline never needs.
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab(self) -> dict:
        return self._tok.get_vocab(with_added_tokens=True)

    def to_json(self) -> str:
        """This tokenizer as a Hugging Face tokenizer.json (the export writes it beside the model)."""
        return self._tok.to_str()

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of one id (e.g. the EOD token's string)."""
        return self._tok.id_to_token(int(token_id))


class HuggingFaceTokenizer(_RustBPETokenizer):
    """A Hugging Face ``tokenizer.json``, loaded offline with the ``tokenizers`` library.

    EOD is the ``eos_token`` of a ``tokenizer_config.json`` beside the file when there is one, else the
    first of ``<|endoftext|>``, ``</s>``, ... present in the vocabulary.
    """

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise TokenizerError(
                f"--tokenizer-model {path!r}: expected a tokenizer.json file or a directory holding one"
            )
        try:
            tok = Tokenizer.from_file(json_path)
        except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
            raise TokenizerError(f"--tokenizer-model {json_path!r} is not a valid tokenizer.json: {err}") from None
        super().__init__(tok)
        self._identify(json_path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._find_eod(os.path.dirname(json_path))

    def _find_eod(self, directory: str) -> int:
        candidates = list(_EOD_CANDIDATES)
        config = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):  # transformers writes AddedToken objects as dicts
                eos = eos.get("content")
            if isinstance(eos, str):
                candidates.insert(0, eos)
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise TokenizerError(
            f"the tokenizer in {directory or '.'!r} has no end-of-document token: none of "
            f"{candidates} is in its vocabulary; retrain it with one (tools/train_tokenizer.py adds <|endoftext|>)"
        )


class GPT2BPETokenizer(_RustBPETokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` and ``merges.txt``; EOD is ``<|endoftext|>``."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        # GPT-2's own tokenizer: the ByteLevel pre-tokenizer's regex is GPT-2's, no prefix space, no
        # post-processing, and an unknown byte sequence cannot occur (all 256 bytes are in the vocab).
        tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        super().__init__(tok)
        self._identify(vocab_file, merge_file)
        with open(vocab_file, encoding="utf-8") as f:
            encoder = json.load(f)
        if "<|endoftext|>" not in encoder:
            raise TokenizerError(f"--vocab-file {vocab_file!r} has no <|endoftext|> token, which GPT2BPETokenizer uses as EOD")
        self.eod = encoder["<|endoftext|>"]
        self.vocab_size = len(encoder)


class SentencePieceTokenizer(_BaseTokenizer):
    """A SentencePiece ``.model`` with Megatron-LM's special tokens appended after the model's pieces."""

    _SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self._identify(model_file)
        n = self._sp.get_piece_size()
        self._vocab = {self._sp.id_to_piece(i): i for i in range(n)}
        self._special = {}
        for token in self._SPECIALS:
            self._add_special(token)
        # pad/bos/eos: the model's own piece when it defines one, else a new <PAD>/<BOS>/<EOS>.
        for piece_id, fallback in ((self._sp.pad_id(), "<PAD>"), (self._sp.bos_id(), "<BOS>"),
                                   (self._sp.eos_id(), "<EOS>")):
            self._add_special(self._sp.id_to_piece(piece_id) if 0 <= piece_id < n else fallback)
        self._inv_special = {i: t for t, i in self._special.items()}
        self.vocab_size = len(self._vocab)
        self.eod = self._special["<EOD>"]

    def _add_special(self, token: str) -> None:
        if token not in self._vocab:
            self._vocab[token] = len(self._vocab)
        self._special[token] = self._vocab[token]

    @property
    def vocab(self) -> dict:
        return self._vocab

    def tokenize(self, text: str) -> List[int]:
        # Special-token strings inside the text become their ids (Megatron-LM's behaviour); the text
        # between them is encoded by the model. Fast path: most texts contain none.
        if not any(t in text for t in self._special):
            return self._sp.encode_as_ids(text)
        ids: List[int] = []
        start = 0
        while True:
            hits = [(text.find(t, start), t) for t in self._special]
            hits = [(pos, t) for pos, t in hits if pos >= 0]
            if not hits:
                break
            pos, token = min(hits)
            ids.extend(self._sp.encode_as_ids(text[start:pos]))
            ids.append(self._special[token])
            start = pos + len(token)
        ids.extend(self._sp.encode_as_ids(text[start:]))
        return ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if not any(s in t for t in texts for s in self._special):
            return self._sp.encode(list(texts), out_type=int)
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Sequence[int]) -> str:
        pieces: List[str] = []
        run: List[int] = []
        for i in ids:
            i = int(i)
            if i in self._inv_special:
                pieces.append(self._sp.decode_ids(run) + " " + self._inv_special[i] + " ")
                run = []
            else:
                run.append(i)
        pieces.append(self._sp.decode_ids(run))
        return "".join(pieces)


class GPTSentencePieceTokenizer(_BaseTokenizer):
    """A SentencePiece ``.model`` as it is: its pieces are the vocabulary, EOD is its EOS piece, and texts are
    encoded without added tokens (special-token strings in a text are plain text)."""

    add_bos = False

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self._identify(model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.bos, self.eod = self._sp.bos_id(), self._sp.eos_id()
        if self.eod < 0 or (self.add_bos and self.bos < 0):
            missing = "BOS" if self.eod >= 0 else "EOS"
            raise TokenizerError(f"--tokenizer-model {model_file!r} defines no {missing} piece, which "
                                 f"{type(self).__name__} needs; use SentencePieceTokenizer (its own <EOD>)")

    @property
    def vocab(self) -> dict:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts), out_type=int, add_bos=self.add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode_ids([int(i) for i in ids])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """GPTSentencePieceTokenizer that puts the model's BOS before every text it tokenizes (Llama 2)."""

    add_bos = True


def read_tiktoken_vocab(path: str, max_vocab: Optional[int] = None) -> Dict[bytes, int]:
    """{token bytes: rank} of a tiktoken vocabulary file (a JSON list of {"rank", "token_bytes" (base64),
    "token_str"}, ranks 0, 1, ... in order, the first 256 the single bytes), its first `max_vocab` entries.

    The file is data: it is read as UTF-8 JSON of at most MAX_TIKTOKEN_VOCAB_BYTES and every entry checked.
    Raises TokenizerError naming --tokenizer-model and the first bad entry.
    """
    flag = f"--tokenizer-model {path!r}"
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag}: no such file")
    if os.path.getsize(path) > MAX_TIKTOKEN_VOCAB_BYTES:
        raise TokenizerError(f"{flag}: larger than {MAX_TIKTOKEN_VOCAB_BYTES:,} bytes; not a tiktoken vocabulary")
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{flag}: not a JSON tiktoken vocabulary ({error})") from None
    if not isinstance(entries, list):
        raise TokenizerError(f"{flag}: expected a JSON list of {{'rank', 'token_bytes', 'token_str'}} entries")
    ranks: Dict[bytes, int] = {}
    for index, entry in enumerate(entries[:max_vocab]):
        try:
            keys = set(entry) if isinstance(entry, dict) else set()
            if keys != {"rank", "token_bytes", "token_str"} or entry["rank"] != index:
                raise ValueError("expected {'rank': %d, 'token_bytes': ..., 'token_str': ...}" % index)
            token = base64.b64decode(entry["token_bytes"], validate=True)
            if (index < 256 and token != bytes([index])) or token in ranks:
                raise ValueError("the first 256 entries must be the single bytes, and no token may repeat")
        except (ValueError, TypeError, binascii.Error) as error:
            raise TokenizerError(f"{flag}: entry {index}: {error}") from None
        ranks[token] = index
    return ranks


class TikTokenizer(_BaseTokenizer):
    """Megatron-LM's TikTokenizer: special tokens take ids 0 .. num_special_tokens - 1 (``<unk>``, ``<s>``,
    ``</s>``, then ``<SPECIAL_i>`` fillers), the vocabulary file's tokens follow; the vocabulary is exactly
    `vocab_size` ids (default 2**17). Texts are encoded without special tokens; EOD is ``</s>``."""

    def __init__(self, path: str, pattern: str, vocab_size: Optional[int] = None,
                 num_special_tokens: int = 1000) -> None:
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError("--tokenizer-type TikTokenizer needs the tiktoken package, which is not installed: "
                                 "pip install tiktoken") from None
        if pattern not in TIKTOKEN_PATTERNS:
            raise TokenizerError(f"--tiktoken-pattern {pattern!r}: choose v1 or v2")
        vocab_size = 2 ** 17 if vocab_size is None else int(vocab_size)
        if not len(TIKTOKEN_SPECIAL_TOKENS) <= num_special_tokens < vocab_size:
            raise TokenizerError(f"--tiktoken-num-special-tokens {num_special_tokens} must lie in "
                                 f"[{len(TIKTOKEN_SPECIAL_TOKENS)}, --vocab-size {vocab_size})")
        ranks = read_tiktoken_vocab(path, max_vocab=vocab_size - num_special_tokens)
        if len(ranks) != vocab_size - num_special_tokens:
            raise TokenizerError(f"--tokenizer-model {path!r} holds {len(ranks)} tokens; --vocab-size {vocab_size} "
                                 f"minus {num_special_tokens} special tokens needs {vocab_size - num_special_tokens}")
        specials = list(TIKTOKEN_SPECIAL_TOKENS) + [f"<SPECIAL_{i}>" for i in range(3, num_special_tokens)]
        self._model = tiktoken.Encoding(
            name=os.path.basename(os.path.dirname(os.path.abspath(path))), pat_str=TIKTOKEN_PATTERNS[pattern],
            mergeable_ranks={token: rank + num_special_tokens for token, rank in ranks.items()},
            special_tokens={token: index for index, token in enumerate(specials)})
        self._identify(path, pattern=pattern, vocab_size=vocab_size, num_special_tokens=num_special_tokens)
        self.vocab_size = vocab_size
        self.bos, self.eod = 1, 2

    def tokenize(self, text: str) -> List[int]:
        return self._model.encode_ordinary(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._model.encode_ordinary_batch(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.decode([int(i) for i in ids])


class NullTokenizer(_BaseTokenizer):
    """Text that already holds ids, separated by whitespace; EOD is ``vocab_size`` (the flag value)."""

    def __init__(self, vocab_size: int) -> None:
        self._n = int(vocab_size)
        self._identify(vocab_size=self._n)
        self.vocab_size = self._n + 1
        self.eod = self._n

    def tokenize(self, text: str) -> List[int]:
        # Any whitespace separates ids (Megatron-LM splits on single spaces); an empty text has no ids.
        try:
            return [int(x) for x in text.split()]
        except ValueError as err:
            raise ValueError(f"NullTokenizer expects whitespace-separated integer ids: {err}") from None

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(x)) for x in ids)
