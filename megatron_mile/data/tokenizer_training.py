"""Train a byte-level BPE tokenizer (GPT-2 style) on JSON-lines corpora with the ``tokenizers`` library.

The result is a single ``tokenizer.json`` usable with ``--tokenizer-type HuggingFaceTokenizer``; optionally
also ``vocab.json`` + ``merges.txt`` for ``--tokenizer-type GPT2BPETokenizer``. ``<|endoftext|>`` is added as
a special token (id 0) and serves as the end-of-document token. Everything runs offline.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from megatron_mile.atomic_io import atomic_path

EOD_TOKEN = "<|endoftext|>"


def new_byte_level_bpe():
    """An untrained GPT-2-style byte-level BPE tokenizer: GPT-2's pre-tokenization regex, no prefix space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                         special_tokens: Sequence[str] = (EOD_TOKEN,)):
    """Train and return a ``tokenizers.Tokenizer`` with ``vocab_size`` entries (specials included)."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"--vocab-size must be at least {256 + len(special_tokens)} (all bytes + special tokens)")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        # Every byte is in the vocabulary even if the corpus lacks it, so no text is ever unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# Beside tokenizer.json: transformers' AutoTokenizer (which Megatron-LM's HuggingFaceTokenizer uses) finds the
# end-of-document token here; without it the tokenizer has no EOS there.
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN,
                    "clean_up_tokenization_spaces": False}


def save_tokenizer(tok, output_dir: str, gpt2_files: bool = False) -> list:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (naming the EOD token as EOS), and with
    ``gpt2_files`` ``vocab.json``/``merges.txt``, to ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tokenizer.json")
    with atomic_path(path) as tmp:
        tok.save(str(tmp), pretty=False)
    config_path = os.path.join(output_dir, "tokenizer_config.json")
    with atomic_path(config_path) as tmp:
        tmp.write_text(json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True) + "\n")
    written = [path, config_path]
    if gpt2_files:
        written += tok.model.save(output_dir)
    return written
