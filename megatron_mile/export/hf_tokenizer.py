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
    (directory / "tokenizer.json").write_text(encoding_as_trained(tokenizer.to_json()))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.token_text(tokenizer.eod),
        "model_max_length": model_max_length,
        # Decoding must give back the text the tokenizer's own decoder gives (no space clean-up).
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Post-processors whose only effect on token ids is adding special tokens (BOS/EOS, [CLS]/[SEP] and the like).
_SPECIAL_TOKEN_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def encoding_as_trained(tokenizer_json: str) -> str:
    """`tokenizer_json` changed so that its default encoding gives the ids training used.

    Training encodes without added special tokens (megatron_mile.data.tokenizers: add_special_tokens=False),
    while transformers and lm-eval encode with them: a post-processor that adds e.g. a BOS (as LLaMA's
    tokenizer.json does) would put before every text a token the model never saw there, and lower every
    log-likelihood. Such post-processors are dropped (inside a Sequence too); the others (ByteLevel's offset
    trimming) change no ids and stay. Raises ExportError when the result still adds tokens.
    """
    from tokenizers import Tokenizer

    data = json.loads(tokenizer_json)
    data["post_processor"] = _without_special_tokens(data.get("post_processor"))
    result = json.dumps(data, ensure_ascii=False)
    tokenizer = Tokenizer.from_str(result)
    probe = "Hello world, this is a test.\nA second line."
    if tokenizer.encode(probe).ids != tokenizer.encode(probe, add_special_tokens=False).ids:
        raise ExportError("the tokenizer's post-processor adds tokens that training never saw and cannot be "
                          "removed automatically; pass a tokenizer.json without it with --tokenizer")
    return result


def _without_special_tokens(processor):
    if processor is None or processor.get("type") in _SPECIAL_TOKEN_PROCESSORS:
        return None
    if processor.get("type") == "Sequence":
        kept = [p for p in map(_without_special_tokens, processor.get("processors", [])) if p is not None]
        return dict(processor, processors=kept) if kept else None
    return processor

