"""Text normalisation (LibriSpeech style) and the character tokenizer.

`normalize()` is the one definition used for training targets, references and hypotheses in
evaluation: upper case A-Z, apostrophes inside words, single spaces, digits spelled out.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from num2words import num2words

BLANK = "<blank>"
VOCAB: tuple[str, ...] = (BLANK, " ", "'", *(chr(c) for c in range(ord("A"), ord("Z") + 1)))
BLANK_ID = 0
SPACE_ID = 1

_ABBREVIATIONS = {
    "MR": "MISTER",
    "MRS": "MISSUS",
    "DR": "DOCTOR",
    "ST": "SAINT",
    "MESSRS": "MESSIEURS",
}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_ABBREV_RE = re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.", re.IGNORECASE)
_MONEY_RE = re.compile(r"\$(\d[\d,]*(?:\.\d+)?)")
_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_NUMBER_RE = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_NOT_ALLOWED_RE = re.compile(r"[^A-Z' ]+")
_STRAY_APOSTROPHE_RE = re.compile(r"(?<![A-Z])'|'(?![A-Z])")


def _spell_number(match: re.Match[str]) -> str:
    token = match.group(0).replace(",", "")
    if "." in token:
        return " " + num2words(float(token)) + " "
    value = int(token)
    as_year = len(token) == 4 and 1100 <= value <= 2099 and "," not in match.group(0)
    return " " + num2words(value, to="year" if as_year else "cardinal") + " "


def normalize(text: str) -> str:
    """Normalise free text to the model's alphabet, LibriSpeech style.

    >>> normalize("Mr. Smith paid $5 on the 21st of May, 1878!")
    'MISTER SMITH PAID FIVE DOLLARS ON THE TWENTY FIRST OF MAY EIGHTEEN SEVENTY EIGHT'
    """
    text = unicodedata.normalize("NFKD", text.translate(_QUOTES))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _ABBREV_RE.sub(lambda m: _ABBREVIATIONS[m.group(1).upper()], text)
    text = text.replace("&", " and ").replace("%", " percent ")
    text = _MONEY_RE.sub(lambda m: m.group(1) + " dollars", text)
    text = _ORDINAL_RE.sub(lambda m: " " + num2words(int(m.group(1)), to="ordinal") + " ", text)
    text = _NUMBER_RE.sub(_spell_number, text)
    text = _NOT_ALLOWED_RE.sub(" ", text.upper())
    text = _STRAY_APOSTROPHE_RE.sub(" ", text)
    return " ".join(text.split())


class Tokenizer:
    """Characters <-> ids. id 0 is the CTC blank; the text must already be normalised."""

    def __init__(self, vocab: Sequence[str] = VOCAB) -> None:
        if len(vocab) < 2 or vocab[BLANK_ID] != BLANK or vocab[SPACE_ID] != " ":
            raise ValueError(f"vocabulary must start with {BLANK!r} and ' ', got {list(vocab[:2])}")
        self.vocab = tuple(vocab)
        self._ids = {ch: i for i, ch in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in self._ids or ch == BLANK})
        if unknown:
            raise ValueError(f"characters outside the vocabulary: {unknown!r} (normalize() the text first)")
        return [self._ids[ch] for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i != BLANK_ID)


def ctc_min_frames(text: str) -> int:
    """Fewest CTC output frames that can spell `text`: one per character, plus a blank between
    each pair of equal neighbours (CTC merges repeats)."""
    return len(text) + sum(a == b for a, b in zip(text, text[1:], strict=False))
