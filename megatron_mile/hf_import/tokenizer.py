"""The tokenizer of an imported model: found in the Hugging Face directory, checked, and copied beside the
checkpoint, where training reads it (--tokenizer-type HuggingFaceTokenizer --tokenizer-model <save>/tokenizer.json).

Only a `tokenizer.json` is taken. Why not a SentencePiece `tokenizer.model` alone: this project's
SentencePieceTokenizer appends Megatron-LM's special tokens after the model's pieces, so its vocabulary is
larger than the model's and the ids of those tokens would meet untrained rows. tokenizer_config.json and
special_tokens_map.json go along: the end-of-document token is the config's eos_token.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List

from megatron_mile.data.tokenizers import HuggingFaceTokenizer, TokenizerError
from megatron_mile.hf_import.hf_config import HFImportError

TOKENIZER_FILE = "tokenizer.json"
# Copied when present: what transformers' and this project's loaders read besides tokenizer.json.
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass(frozen=True)
class ImportedTokenizer:
    files: List[Path]
    """The files to copy into the save directory."""
    vocab_size: int
    """Tokens, added ones included: the real vocabulary of the imported model."""
    note: str
    """One line: where it came from and its end-of-document token."""

    @staticmethod
    def flags(save_dir: Path) -> List[str]:
        """The tokenizer flags of a training run on the imported checkpoint in `save_dir`."""
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(Path(save_dir) / TOKENIZER_FILE)]


def find_tokenizer(hf_dir: Path) -> ImportedTokenizer:
    """The tokenizer files of `hf_dir`, read once with this project's tokenizer to learn its size and EOD.

    Raises HFImportError when there is no tokenizer.json or it cannot be used (no end-of-document token).
    """
    hf_dir = Path(hf_dir)
    path = hf_dir / TOKENIZER_FILE
    if not path.is_file():
        has_sentencepiece = (hf_dir / "tokenizer.model").is_file()
        raise HFImportError(
            f"{hf_dir} has no {TOKENIZER_FILE}"
            + (" (only a SentencePiece tokenizer.model, which this project would extend with Megatron-LM's special "
               "tokens)" if has_sentencepiece else "")
            + ": save the model's fast tokenizer there first (AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
    try:
        tokenizer = HuggingFaceTokenizer(str(path))
    except TokenizerError as error:
        raise HFImportError(f"{path}: {error}") from None
    files = [path] + [hf_dir / name for name in COMPANION_FILES if (hf_dir / name).is_file()]
    eos = tokenizer.token_text(tokenizer.eod)
    return ImportedTokenizer(files, tokenizer.vocab_size,
                             f"tokenizer {path} ({tokenizer.vocab_size} tokens, end of document {eos!r} = id "
                             f"{tokenizer.eod})")


def copy_tokenizer(tokenizer: ImportedTokenizer, directory: Path) -> None:
    """Copy the tokenizer's files into `directory` (contents only: the mode is the directory writer's)."""
    for source in tokenizer.files:
        shutil.copyfile(source, Path(directory) / source.name)
