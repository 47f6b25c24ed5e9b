"""The tokenizer files of an exported Hugging Face model, from the tokenizer the run trained with.

Written: tokenizer.json (the `tokenizers` library's format) and tokenizer_config.json naming
"PreTrainedTokenizerFast" (transformers 5 writes "TokenizersBackend", which older releases cannot load;
PreTrainedTokenizerFast loads in both) with the end-of-document token as EOS.

Sources, in order: `--tokenizer <tokenizer.json>`; else the run's saved --tokenizer-type/--tokenizer-model:
HuggingFaceTokenizer (its tokenizer.json is copied), GPT2BPETokenizer (vocab.json + merges.txt serialised
as a tokenizer.json); NullTokenizer runs have no tokenizer (their text is ids), so no files are written;
SentencePiece models need converting first (pass the result with --tokenizer).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_mile.config import DataConfig
from megatron_mile.data.tokenizers import GPT2BPETokenizer, HuggingFaceTokenizer, TokenizerError
from megatron_mile.export.hf_llama import ExportError


@dataclass
class TokenizerToExport:
    tokenizer: object
    """Our tokenizer object (megatron_mile.data.tokenizers), or None when there is none to export."""
    note: str
    """One line saying what is exported and from where."""

    @property
    def eos_token_id(self) -> Optional[int]:
        return None if self.tokenizer is None else self.tokenizer.eod


def _load(data: DataConfig, override: Optional[str]):
    """(our tokenizer object or None, where it came from)."""
    if override is not None:
        try:
            return HuggingFaceTokenizer(override), override
        except TokenizerError as error:
            raise ExportError(f"--tokenizer: {error}") from None
    kind = data.tokenizer_type
    try:
        if kind == "HuggingFaceTokenizer":
            return HuggingFaceTokenizer(data.tokenizer_model), data.tokenizer_model
        if kind == "GPT2BPETokenizer":
            return GPT2BPETokenizer(data.vocab_file, data.merge_file), f"{data.vocab_file} + {data.merge_file}"
    except (TokenizerError, OSError) as error:
        # Saved paths are as the run gave them, often relative to its working directory.
        raise ExportError(
            f"the run's tokenizer ({kind}) cannot be read from {os.getcwd()}: {error}. Pass its tokenizer.json "
            "with --tokenizer"
        ) from None
    if kind == "NullTokenizer":
        return None, "NullTokenizer"
    raise ExportError(
        f"the run used a {kind}, which is not converted here: convert it to a Hugging Face tokenizer.json "
        "(e.g. with transformers' converters) and pass it with --tokenizer"
    )


def prepare_tokenizer(data: DataConfig, override: Optional[str], vocab_size: int) -> TokenizerToExport:
    """Find and read the tokenizer to export, and check it has the model's vocabulary size.

    Done before the weights are loaded, so that a wrong tokenizer fails at once. Raises ExportError when
    the tokenizer cannot be read or its size differs from the model's real vocabulary (token ids would
    then mean other tokens than the model was trained on).
    """
    tokenizer, source = _load(data, override)
    if tokenizer is None:
        return TokenizerToExport(None, f"no tokenizer files: the run used {source} (token ids as text); pass "
                                       "--tokenizer <tokenizer.json> to add one")
    if tokenizer.vocab_size != vocab_size:
        raise ExportError(
            f"the tokenizer {source} has {tokenizer.vocab_size} tokens, the checkpoint's model {vocab_size}: it is "
            "not the tokenizer the model was trained with"
        )
    eos = tokenizer.token_text(tokenizer.eod)
    return TokenizerToExport(tokenizer, f"tokenizer from {source} (EOS {eos!r} = id {tokenizer.eod})")


def write_tokenizer_files(directory: Path, prepared: TokenizerToExport, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json into `directory` (nothing when there is no tokenizer)."""
    if prepared.tokenizer is None:
        return
    tokenizer = prepared.tokenizer
    (directory / "tokenizer.json").write_text(tokenizer.to_json())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.token_text(tokenizer.eod),
        "model_max_length": model_max_length,
        # Decoding must give back the text the tokenizer's own decoder gives (no space clean-up).
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
