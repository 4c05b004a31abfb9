"""Why the learned scorer gave a prompt its score: its log-odds split into named features.

`LearnedScorer.decision` is a sum, so it splits exactly:

    decision = lexical offset + char n-grams + word n-grams + cues
             + semantic offset + tokens

- a char or word n-gram occurrence adds its bucket's weight * idf over its block's norm
  (the root of the summed squared idf of every occurrence in the block, as TF-IDF's L2
  normalisation does), so an n-gram's share depends on the rest of the prompt;
- a cue adds its value times its weight; with the training mean of the cues, the mean is
  subtracted here and added back to the offset, so a cue reads as "pushed up or down compared
  with the average training prompt" rather than a large share that the offset cancels;
- a WordPiece token adds its weight * count / (number of tokens + the prior's pseudo-tokens);
  the pseudo-tokens' share (the pull toward an average prompt) is part of the semantic offset.

Feature buckets are hashes, so the n-gram strings are recomputed here in `featurize`'s order
and checked against its buckets one for one. Offline only: nothing here is on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from classifiers import features as F
from classifiers.learned import LearnedScorer

__all__ = [
    "GROUPS",
    "Contribution",
    "Explanation",
    "char_bucket",
    "char_ngrams",
    "cue_names",
    "explain",
    "format_explanation",
    "word_bucket",
    "word_ngrams",
]

F64 = npt.NDArray[np.float64]

# Featurize pads each text with n-1 zero code points, so "end of text" is this character.
END = "\x00"
GROUPS = ("char n-grams", "word n-grams", "cues", "tokens")
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Contribution:
    """One named feature's share of the log-odds (summed over its `count` occurrences)."""

    name: str
    value: float
    count: int = 1


@dataclass(frozen=True)
class Explanation:
    """A learned score split into offsets and per-feature contributions that add up to it.

    `groups` maps each of `GROUPS` to every contribution of that kind, largest |value|
    first; `top` is how many of each sign the `top_*` helpers and the formatter show.
    """

    probability: float
    log_odds: float
    lexical: float
    semantic: float
    lexical_offset: float
    semantic_offset: float
    cues_centered: bool
    groups: dict[str, tuple[Contribution, ...]] = field(default_factory=dict)
    top: int = 8

    def total(self, group: str) -> float:
        """The summed contribution of one group."""
        return math.fsum(c.value for c in self.groups[group])

    def top_positive(self, group: str) -> list[tuple[str, float]]:
        """The features of `group` that pushed the score up most, as (name, contribution)."""
        return [(c.name, c.value) for c in self.groups[group] if c.value > 0][: self.top]

    def top_negative(self, group: str) -> list[tuple[str, float]]:
        """The features of `group` that pushed the score down most, as (name, contribution)."""
        return [(c.name, c.value) for c in self.groups[group] if c.value < 0][: self.top]


def _folded(text: str) -> str:
    """The text featurize reads: head and tail kept, lower case, ASCII digits as "0"."""
    return "".join("0" if "0" <= ch <= "9" else ch for ch in F.lowered(text))


def char_ngrams(text: str) -> list[str]:
    """Every char n-gram occurrence, in the order of `featurize(text).char_idx`.

    Each size's block runs over every position, so grams near the end carry `END` padding.
    """
    s = _folded(text)
    padded = s + END * (max(F.CHAR_NGRAMS) - 1)
    return [padded[i : i + n] for n in F.CHAR_NGRAMS for i in range(len(s))]


def _is_word_char(ch: str) -> bool:
    # featurize counts every non-ASCII code point as a word character (other scripts' letters).
    return ord(ch) > 127 or ch.isascii() and (ch.isalnum() or ch == "_")


def _words(text: str) -> list[str]:
    """Maximal runs of word characters of the folded text, as featurize splits them."""
    words: list[str] = []
    current: list[str] = []
    for ch in _folded(text):
        if _is_word_char(ch):
            current.append(ch)
        elif current:
            words.append("".join(current))
            current = []
    if current:
        words.append("".join(current))
    return words


def word_ngrams(text: str) -> list[str]:
    """Every word n-gram occurrence in the order of `featurize(text).word_idx`.

    Unigrams first, then each consecutive pair as "first second".
    """
    words = _words(text)
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def _bucket(h: int, salt: int) -> int:
    return (((h + salt) & _M64) * int(F._MIX) & _M64) >> int(F._SHIFT)


def char_bucket(gram: str) -> int:
    """The hashed bucket featurize gives one char n-gram (its length picks the salt)."""
    salt = int(F._CHAR_SALT[F.CHAR_NGRAMS.index(len(gram))])
    return _bucket(F.word_hash(gram), salt)


def word_bucket(gram: str) -> int:
    """The hashed bucket featurize gives one word unigram, or a bigram "first second"."""
    if " " not in gram:
        return _bucket(F.word_hash(gram), int(F._UNI_SALT))
    a, b = gram.split(" ")
    return _bucket((F.word_hash(a) * int(F._BI_MUL) + F.word_hash(b)) & _M64, int(F._BI_SALT))


def cue_names() -> list[str]:
    """A name for each of featurize's `N_CUES` dense cues, in order."""
    names = ["log chars", "log words", "log lines", "log numbers", "log list items", "log choices"]
    names += [f"log {group} words" for group in F.CUE_WORDS]
    names += [f"log {ch!r} count" for ch in F.CUE_CHARS]
    names += [f"first word {w!r}" for w in F.QUESTION_WORDS] + ["first word (other)"]
    assert len(names) == F.N_CUES
    return names


def _block(
    scorer: LearnedScorer, names: Sequence[str], idx: npt.NDArray[np.int64]
) -> tuple[Contribution, ...]:
    """Per-name contributions of one TF-IDF block (occurrences of a name aggregated)."""
    if len(names) != len(idx):
        raise AssertionError(f"{len(names)} n-gram names for {len(idx)} featurize buckets")
    if not len(idx):
        return ()
    norm = math.sqrt(float(scorer._idf2[idx].sum()))
    per = scorer._wi[idx] / norm
    value: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, v in zip(names, per.tolist(), strict=True):
        value[name] = value.get(name, 0.0) + v
        count[name] = count.get(name, 0) + 1
    return tuple(Contribution(n, value[n], count[n]) for n in value)


def _ranked(items: Sequence[Contribution]) -> tuple[Contribution, ...]:
    return tuple(sorted(items, key=lambda c: -abs(c.value)))


def explain(scorer: LearnedScorer, text: str, top: int = 8, cue_mean: F64 | None = None) -> Explanation:
    """Split `scorer.decision(text)` into named contributions.

    With `cue_mean` (`LearnedScorer.cue_mean`), cues are measured from the training mean; without
    it, each cue's raw value * weight is shown and the offset is the scorer's own.
    """
    f = F.featurize(text)
    chars = _block(scorer, char_ngrams(text), f.char_idx)
    words = _block(scorer, word_ngrams(text), f.word_idx)
    offset = scorer._offset
    base = np.zeros(F.N_CUES) if cue_mean is None else np.asarray(cue_mean, np.float64)
    cue_values = (f.cues - base) * scorer._cue_w
    offset += float(np.dot(base, scorer._cue_w))
    cues = tuple(
        Contribution(name, float(v)) for name, v in zip(cue_names(), cue_values, strict=True) if v != 0.0
    )
    tokens_seen = scorer.semantic.contributions(text)
    weight = sum(c for _, _, c in tokens_seen) + scorer._semantic_prior
    tokens = tuple(Contribution(t, w * c / weight, c) for t, w, c in tokens_seen)
    lexical = offset + math.fsum(c.value for part in (chars, words, cues) for c in part)
    semantic_offset = scorer._semantic_offset + scorer._semantic_pull / weight
    semantic = semantic_offset + math.fsum(c.value for c in tokens)
    z = lexical + semantic
    return Explanation(
        probability=scorer.calibrate(z),
        log_odds=z,
        lexical=lexical,
        semantic=semantic,
        lexical_offset=offset,
        semantic_offset=semantic_offset,
        cues_centered=cue_mean is not None,
        groups={
            "char n-grams": _ranked(chars),
            "word n-grams": _ranked(words),
            "cues": _ranked(cues),
            "tokens": _ranked(tokens),
        },
        top=top,
    )


_SHOWN = str.maketrans({END: "⊣", "\n": "⏎", "\t": "⇥", "\r": "␍"})
_NAME_WIDTH = 26


def _show(group: str, c: Contribution) -> str:
    """A feature as one terminal cell: value, quoted name, and how often it occurred."""
    name = c.name if group == "cues" else "'" + c.name.translate(_SHOWN) + "'"
    if len(name) > _NAME_WIDTH:
        name = name[: _NAME_WIDTH - 1] + "…"
    times = f" ×{c.count}" if c.count > 1 else ""
    return f"{c.value:+.3f} {name}{times}"


def format_explanation(e: Explanation) -> str:
    """The explanation as terminal lines: totals, then each group's top features up and down."""
    cue_note = " (from the training mean)" if e.cues_centered else ""
    lines = [
        f"log-odds {e.log_odds:+.3f} -> probability {e.probability:.3f}",
        f"  lexical  {e.lexical:+.3f} = offset {e.lexical_offset:+.3f}"
        f" + char n-grams {e.total('char n-grams'):+.3f}"
        f" + word n-grams {e.total('word n-grams'):+.3f} + cues{cue_note} {e.total('cues'):+.3f}",
        f"  semantic {e.semantic:+.3f} = offset {e.semantic_offset:+.3f} + tokens {e.total('tokens'):+.3f}",
    ]
    width = 12 + _NAME_WIDTH
    for group in GROUPS:
        up = [c for c in e.groups[group] if c.value > 0][: e.top]
        down = [c for c in e.groups[group] if c.value < 0][: e.top]
        lines.append(f"{group} ({len(e.groups[group])}), pushed up:".ljust(width + 2) + "pushed down:")
        for i in range(max(len(up), len(down))):
            left = _show(group, up[i]) if i < len(up) else ""
            right = _show(group, down[i]) if i < len(down) else ""
            lines.append(f"  {left:<{width}}{right}".rstrip())
    lines.append("(⊣ marks the end of the text, ⏎ a line break; digits are read as 0)")
    return "\n".join(lines)
