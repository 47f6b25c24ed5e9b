"""Sentence splitting with nltk's Punkt, fully offline.

nltk only loads Punkt models in the ``punkt_tab`` text format (four files per language) and cannot fetch
one without network access. So either the user points ``--punkt-dir`` at a ``punkt_tab`` model they
have, or :func:`train_punkt` learns the parameters from the corpus's own text with nltk's unsupervised
PunktTrainer (Punkt is designed to be trained on the text it will split).

``keep_newlines`` reproduces Megatron-LM's option of the same name: the whitespace after a sentence end
stays with that sentence instead of being dropped, so newlines survive splitting.
"""

from __future__ import annotations

import os
from typing import Iterable, List

from nltk.tabdata import PunktDecoder, TabEncoder
from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer, PunktTrainer

PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")

# Texts are split in slices of this many characters (as Megatron-LM does), which bounds Punkt's memory on
# pathological single-line documents.
_MAX_SPLIT_CHARS = 1_000_000


class _KeepWhitespaceLanguageVars(PunktLanguageVars):
    """Punkt language variables whose sentence-end context swallows the following whitespace.

    The stock pattern looks ahead over ``\\s+`` to the next token, so the whitespace between two
    sentences belongs to neither and is lost. Matching it inside the context (``\\s*`` before the
    lookahead) attaches it to the sentence that ends there.
    """

    _period_context_fmt = r"""
        \S*                           # the word carrying the candidate sentence end
        %(SentEndChars)s              # the candidate sentence end
        \s*                           # whitespace after it, kept with this sentence
        (?=(?P<after_tok>
            %(NonWord)s               # either punctuation follows
            |
            (?P<next_tok>\S+)         # or the next token, with no whitespace left to skip
        ))"""


def find_punkt_dir(punkt_dir: str, lang: str = "english") -> str:
    """The directory holding the four punkt_tab files: ``punkt_dir`` itself, ``punkt_dir/<lang>``, or
    ``punkt_dir/tokenizers/punkt_tab/<lang>`` (an nltk data root).

    Raises:
        FileNotFoundError: none of these holds a complete model; the message lists what is missing.
    """
    candidates = [punkt_dir, os.path.join(punkt_dir, lang), os.path.join(punkt_dir, "tokenizers", "punkt_tab", lang)]
    for candidate in candidates:
        if all(os.path.isfile(os.path.join(candidate, name)) for name in PUNKT_FILES):
            return candidate
    raise FileNotFoundError(
        f"--punkt-dir {punkt_dir!r}: no punkt_tab model for {lang!r} there; expected the files "
        f"{', '.join(PUNKT_FILES)} in one of {candidates}. Leave --punkt-dir out to train Punkt on the input."
    )


def load_punkt(punkt_dir: str, lang: str = "english") -> PunktParameters:
    """Load Punkt parameters from a punkt_tab model directory (see :func:`find_punkt_dir`)."""
    model_dir = find_punkt_dir(punkt_dir, lang)
    decoder = PunktDecoder()
    params = PunktParameters()

    def _open(name):
        return open(os.path.join(model_dir, name), encoding="utf-8")

    with _open("collocations.tab") as f:
        params.collocations = set(decoder.tab2tups(f))
    with _open("sent_starters.txt") as f:
        params.sent_starters = decoder.txt2set(f)
    with _open("abbrev_types.txt") as f:
        params.abbrev_types = decoder.txt2set(f)
    with _open("ortho_context.tab") as f:
        params.ortho_context = decoder.tab2intdict(f)
    return params


def save_punkt(params: PunktParameters, model_dir: str) -> str:
    """Write ``params`` as a punkt_tab model into ``model_dir`` (created if needed); returns it."""
    os.makedirs(model_dir, exist_ok=True)
    encoder = TabEncoder()
    contents = {
        "collocations.tab": encoder.tups2tab(sorted(params.collocations)),
        "sent_starters.txt": encoder.set2txt(sorted(params.sent_starters)),
        "abbrev_types.txt": encoder.set2txt(sorted(params.abbrev_types)),
        "ortho_context.tab": encoder.ivdict2tab(dict(sorted(params.ortho_context.items()))),
    }
    for name, text in contents.items():
        with open(os.path.join(model_dir, name), "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return model_dir


def train_punkt(texts: Iterable[str], max_chars: int = 4_000_000) -> PunktParameters:
    """Train Punkt on up to ``max_chars`` characters of ``texts`` (unsupervised)."""
    trainer = PunktTrainer()
    seen = 0
    for text in texts:
        if seen >= max_chars:
            break
        text = text[: max_chars - seen]
        trainer.train(text, finalize=False)
        seen += len(text)
    if seen == 0:
        raise ValueError("no text to train the sentence splitter on; pass --punkt-dir with a punkt_tab model")
    trainer.finalize_training()
    return trainer.get_params()


def make_splitter(params: PunktParameters, keep_newlines: bool = False) -> PunktSentenceTokenizer:
    """A Punkt sentence tokenizer using ``params``."""
    if keep_newlines:
        return PunktSentenceTokenizer(params, lang_vars=_KeepWhitespaceLanguageVars())
    return PunktSentenceTokenizer(params)


def split_sentences(splitter: PunktSentenceTokenizer, text: str) -> List[str]:
    """The sentences of ``text``, splitting slices of at most 1,000,000 characters independently."""
    out: List[str] = []
    for start in range(0, len(text), _MAX_SPLIT_CHARS):
        out.extend(splitter.tokenize(text[start:start + _MAX_SPLIT_CHARS]))
    return out
