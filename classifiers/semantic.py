"""The semantic half of the scorer at run time: a prompt's mean per-token weight.

Training (`classifiers.train`) fits a logistic regression on a prompt's static MiniLM vector,
the mean of its WordPiece tokens' rows in the table that `classifiers.static_embed` distils.
A linear model of a mean is the mean of a linear model: `w . mean(v_t) = mean(w . v_t)`, so
the artifact keeps one number per vocabulary token (30,522 floats) instead of the table, and
serving needs only `tokenizers` and this module.

The tokenizer is the costly part: `tokenizers` spends ~0.7 ms on a 1,100-character prompt,
most of it tracking alignments that are not needed here. BERT's normaliser and pre-tokenizer
never join across whitespace, so a text's tokens are the concatenation of its whitespace
chunks' tokens (tests check this on every training prompt), and each chunk's weight sum and
token count are cached. A prompt then costs a split, one dictionary lookup per chunk and one
C-level sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from classifiers.features import clip

__all__ = ["TokenWeights", "bare_tokenizer", "clip", "encodable", "split_chunks"]

F64 = npt.NDArray[np.float64]

# Python's str.split() also splits on these C0/C1 controls, which BERT's normaliser deletes
# instead ("a\x0cb" is one word to BERT): they are dropped before splitting.
DELETED_SPACES = "\x0b\x0c\x1c\x1d\x1e\x1f\x85"
_DELETE = str.maketrans("", "", DELETED_SPACES)
# The cache starts over past this many chunks, and longer chunks are never cached, so its
# memory stays bounded whatever clients send (about 30 MB at the bound).
CACHE_ENTRIES = 200_000
CACHE_KEY_CHARS = 48


def encodable(text: str) -> str:
    """The text with lone surrogates replaced: the tokenizer takes only valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def split_chunks(text: str) -> list[str]:
    """Whitespace chunks of the clipped text, as BERT's pre-tokenizer would see them."""
    text = clip(text)
    for char in DELETED_SPACES:
        # Seven substring scans cost a tenth of one regex character-class search.
        if char in text:
            text = text.translate(_DELETE)
            break
    return text.split()


def bare_tokenizer(tokenizer_json: str) -> Tokenizer:
    """The WordPiece tokenizer without truncation or padding (a bag of tokens needs neither)."""
    tok = Tokenizer.from_str(tokenizer_json)
    # The shipped tokenizer.json truncates and pads at 128 tokens: silent truncation would
    # drop the tail that the clip deliberately kept.
    tok.no_truncation()
    tok.no_padding()
    return tok


class TokenWeights:
    """Mean of fitted per-token weights over a prompt's WordPiece tokens."""

    def __init__(self, tokenizer_json: str, weights: F64) -> None:
        """A tokenizer.json string and one weight per vocabulary id."""
        self._tok = bare_tokenizer(tokenizer_json)
        vocab = self._tok.get_vocab_size()
        if len(weights) != vocab:
            raise ValueError(f"{len(weights)} token weights for a {vocab}-token vocabulary")
        self._weights = np.asarray(weights, dtype=np.float64)
        # chunk -> weight sum + 1j * token count: one complex number, so that a prompt's
        # totals come from a single C-level sum() over its chunks.
        self._cache: dict[str, complex] = {}

    def _encode(self, chunks: list[str]) -> dict[str, complex]:
        """Weight sum and count of each chunk; short chunks also go into the cache."""
        w = self._weights
        cache = self._cache
        out: dict[str, complex] = {}
        encoded = self._tok.encode_batch([encodable(c) for c in chunks], add_special_tokens=False)
        for chunk, enc in zip(chunks, encoded, strict=True):
            ids = enc.ids
            out[chunk] = value = complex(float(w[ids].sum()) if ids else 0.0, len(ids))
            if len(chunk) <= CACHE_KEY_CHARS:
                cache[chunk] = value
        return out

    def totals(self, text: str) -> tuple[float, int]:
        """(sum of token weights, number of tokens) of the clipped text."""
        chunks = split_chunks(text)
        cache = self._cache
        try:
            total = sum(map(cache.__getitem__, chunks))
        except KeyError:
            fresh = self._encode([c for c in dict.fromkeys(chunks) if c not in cache])
            total = sum(fresh[c] if c in fresh else cache[c] for c in chunks)
            if len(cache) > CACHE_ENTRIES:
                self._cache = {}
        return float(total.real), int(total.imag)

    def prime(self, texts: Sequence[str]) -> None:
        """Put the texts' unseen cacheable chunks into the cache, in one tokenizer call.

        For bulk scoring: one call per prompt costs a fixed ~0.1 ms that then dominates the
        cold path. Only when a chunk is tokenized changes, not its value. Near the cache bound
        this does nothing and `totals` encodes (and starts the cache over) as usual.
        """
        cache = self._cache
        unseen = [
            c
            for c in dict.fromkeys(chain.from_iterable(map(split_chunks, texts)))
            if len(c) <= CACHE_KEY_CHARS and c not in cache
        ]
        if unseen and len(cache) + len(unseen) <= CACHE_ENTRIES:
            self._encode(unseen)

    def contributions(self, text: str) -> list[tuple[str, float, int]]:
        """Each distinct token of the text with its weight and count (for explanations)."""
        ids: list[int] = []
        chunks = [encodable(c) for c in split_chunks(text)]
        for enc in self._tok.encode_batch(chunks, add_special_tokens=False):
            ids.extend(enc.ids)
        counts: dict[int, int] = {}
        for tid in ids:
            counts[tid] = counts.get(tid, 0) + 1
        return [(self._tok.id_to_token(t) or "?", float(self._weights[t]), c) for t, c in counts.items()]
