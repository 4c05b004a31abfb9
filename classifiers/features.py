"""Prompt features: hashed character and word n-grams plus hand-made cues, in numpy.

One function, `featurize`, turns a prompt into three parts:

- `char_idx`: hashed buckets of character 2..5-grams (one entry per occurrence),
- `word_idx`: hashed buckets of word unigrams and bigrams (one entry per occurrence),
- `cues`: a small dense vector a person would look at (length, constraints, steps, math
  notation, code, quantities, question type).

`featurize_many` gives the same arrays for a batch of prompts with a fixed number of numpy
calls, for bulk scoring.

Training builds a sparse matrix from these parts (`feature_matrix`); the hot path sums the
fitted weights at the same buckets (`classifiers.learned`). Both read the same arrays, so
the served score is the fitted model's score, not an approximation of it.

Hashes are polynomial over Unicode code points in uint64 arithmetic (wrapping), so they are
the same on every machine and every run, unlike Python's salted `hash()`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy import sparse

U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

# Feature cost is linear in text length; the ask and its constraints sit at the start, the
# question or the output format at the end, so long prompts keep a head and a tail.
HEAD_CHARS = 3_000
TAIL_CHARS = 1_000
CHAR_NGRAMS = (2, 3, 4, 5)
# 2**19 float64 weights = 4 MiB: small enough to stay mostly in cache on the hot path.
HASH_BITS = 19
N_BUCKETS = 1 << HASH_BITS

_P = np.uint64(0x100000001B3)  # FNV-1 64-bit prime: odd, so it has an inverse mod 2**64
_P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing spreads the top bits
_SHIFT = np.uint64(64 - HASH_BITS)
_CHAR_SALT = np.array([0x51 * (n + 1) for n in CHAR_NGRAMS], dtype=np.uint64)
_UNI_SALT = np.uint64(0xA5A5)
_BI_SALT = np.uint64(0x5A5A)
_BI_MUL = np.uint64(0xC2B2AE3D27D4EB4F)

_MAX_LEN = HEAD_CHARS + TAIL_CHARS + 1 + max(CHAR_NGRAMS)
# Rows of `_char_grams`' table that are kept (sizes in CHAR_NGRAMS), and their salts.
_CHAR_ROWS = np.array([size - 1 for size in CHAR_NGRAMS])
_CHAR_SALT_COL = _CHAR_SALT.reshape(-1, 1)
# `featurize_parts` reads every size's n-gram ends as one strided view: row i starts at
# position CHAR_NGRAMS[i] of the prefix sums, one past row i-1's start.
assert CHAR_NGRAMS == tuple(range(CHAR_NGRAMS[0], CHAR_NGRAMS[0] + len(CHAR_NGRAMS)))


def _ascii_table(chars: str) -> npt.NDArray[np.bool_]:
    table = np.zeros(129, dtype=np.bool_)
    for ch in chars:
        table[ord(ch)] = True
    return table


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
# Index 128 stands for every non-ASCII code point: letters of other scripts are word chars.
_WORD = _ascii_table(_ALNUM)
_WORD[128] = True
_DIGIT = _ascii_table("0123456789")


# Cue word groups (lower case). Counts of these are what a person skims for.
CUE_WORDS: dict[str, tuple[str, ...]] = {
    "constraint": (
        "must",
        "should",
        "exactly",
        "least",
        "most",
        "without",
        "only",
        "ensure",
        "never",
        "always",
        "each",
        "every",
        "require",
        "requires",
        "required",
        "limit",
        "format",
        "include",
        "avoid",
        "cannot",
        "no",
        "not",
        "don",
        "within",
        "maximum",
        "minimum",
    ),
    "step": (
        "step",
        "steps",
        "first",
        "then",
        "next",
        "finally",
        "after",
        "before",
        "explain",
        "why",
        "compare",
        "derive",
        "analyze",
        "analyse",
        "design",
        "implement",
        "optimize",
        "optimise",
        "debug",
        "justify",
        "evaluate",
        "reason",
        "discuss",
        "plan",
        "detail",
    ),
    "math": (
        "prove",
        "proof",
        "theorem",
        "lemma",
        "integral",
        "derivative",
        "equation",
        "solve",
        "compute",
        "calculate",
        "probability",
        "matrix",
        "polynomial",
        "integer",
        "prime",
        "sum",
        "product",
        "remainder",
        "divisible",
        "real",
        "function",
        "graph",
        "triangle",
        "area",
        "radius",
        "expression",
        "simplify",
        "factor",
        "percent",
        "ratio",
    ),
    "code": (
        "def",
        "class",
        "return",
        "import",
        "print",
        "code",
        "python",
        "javascript",
        "java",
        "sql",
        "algorithm",
        "array",
        "list",
        "string",
        "int",
        "void",
        "const",
        "let",
        "var",
        "script",
        "regex",
        "api",
        "bug",
        "error",
        "compile",
        "program",
        "test",
        "assert",
    ),
    "simple": (
        "thanks",
        "thank",
        "hello",
        "hi",
        "hey",
        "please",
        "translate",
        "summarize",
        "rewrite",
        "fix",
        "spell",
        "synonym",
        "define",
        "name",
        "joke",
        "poem",
        "short",
    ),
}
# The first word says what kind of ask this is.
QUESTION_WORDS = (
    "what",
    "who",
    "when",
    "where",
    "which",
    "why",
    "how",
    "is",
    "are",
    "can",
    "does",
    "do",
    "write",
    "explain",
    "describe",
    "list",
    "give",
    "tell",
    "create",
    "generate",
    "find",
    "solve",
    "prove",
    "calculate",
    "compute",
    "let",
    "if",
    "given",
    "implement",
    "translate",
)
# Characters counted as cues (after lower-casing; digits are counted before folding).
CUE_CHARS = "?\n$\\=+-*/^{}();`#_<>%[]|:,."

_CUE_CODES = np.array([ord(c) for c in CUE_CHARS], dtype=np.int64)
# A line's first character and the one after it, as the cues read them from the lowered text
# (before digits fold, so "0" is any ASCII digit): a list item, or an option "a)" to "e.".
_LIST_LINE = re.compile(r"\n(?=[-*0-9])")
_CHOICE_LINE = re.compile(r"\n(?=[a-e][).])")

N_CUES = 6 + len(CUE_WORDS) + len(CUE_CHARS) + len(QUESTION_WORDS) + 1


@dataclass(frozen=True)
class Features:
    """The features of one prompt (see the module docstring)."""

    char_idx: I64
    word_idx: I64
    cues: F64


def _encode(text: str) -> U64:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


def word_hash(word: str) -> int:
    """The polynomial hash `featurize` gives a lower-case word (for cue tables)."""
    h = 0
    p = 1
    for ch in word:
        h = (h + ord(ch) * p) % (1 << 64)
        p = p * 0x100000001B3 % (1 << 64)
    return h


@lru_cache(maxsize=1)
def _powers() -> tuple[U64, U64]:
    """P**k and P**-k mod 2**64 for every position of a capped text."""
    pw = np.empty(_MAX_LEN, dtype=np.uint64)
    pinv = np.empty(_MAX_LEN, dtype=np.uint64)
    pw[0] = pinv[0] = 1
    pw[1:] = _P
    pinv[1:] = _P_INV
    # uint64 array products wrap mod 2**64, which is the arithmetic we want.
    return np.cumprod(pw), np.cumprod(pinv)


@lru_cache(maxsize=1)
def _cue_tables() -> tuple[U64, I64, dict[int, int]]:
    """Sorted cue-word hashes with their group ids, and first-word hash -> question-type id."""
    pairs = sorted((word_hash(w), g) for g, words in enumerate(CUE_WORDS.values()) for w in set(words))
    hashes = np.array([h for h, _ in pairs], dtype=np.uint64)
    groups = np.array([g for _, g in pairs], dtype=np.int64)
    first = {word_hash(w): i for i, w in enumerate(QUESTION_WORDS)}
    return hashes, groups, first


@lru_cache(maxsize=1)
def _cue_lookup() -> tuple[U64, I64]:
    """`_cue_tables`' hashes and groups, ending in a sentinel above every hash (group: one past
    the last), so a search never needs clipping: a word matching it counts in a dropped bin."""
    hashes, groups, _ = _cue_tables()
    sentinel = np.iinfo(np.uint64).max
    return np.append(hashes, np.uint64(sentinel)), np.append(groups, len(CUE_WORDS))


def clip(text: str) -> str:
    """A long prompt's head and tail (the part n-grams and tokens are taken from)."""
    if len(text) <= HEAD_CHARS + TAIL_CHARS:
        return text
    return text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]


def _char_grams(codes: U64, pw: U64) -> U64:
    """Salted, mixed hashes of every character n-gram: row i for size CHAR_NGRAMS[i], column j
    for the gram starting at j, with n-1 zeros padded after the end (so the last grams of a
    text are marked as endings)."""
    n = len(codes)
    padded = np.zeros(n + max(CHAR_NGRAMS), dtype=np.uint64)
    padded[:n] = codes
    # Row k holds h_k[j] = sum_{i<=k} codes[j+i] * P**i; salting and mixing the kept rows at
    # once saves a dozen small numpy calls per prompt on the hot path.
    grams = np.empty((max(CHAR_NGRAMS), n), dtype=np.uint64)
    grams[0] = codes
    for k in range(1, max(CHAR_NGRAMS)):
        np.multiply(padded[k : n + k], pw[k], out=grams[k])
        grams[k] += grams[k - 1]
    rows: U64 = grams[_CHAR_ROWS]
    rows += _CHAR_SALT_COL
    rows *= _MIX
    rows >>= _SHIFT
    return rows


def _word_hashes(codes: U64, small: U64, pw: U64, pinv: U64) -> tuple[U64, I64]:
    """Hashes and start positions of the maximal runs of word characters, via prefix sums
    (a word's hash does not depend on where it starts: the sum is multiplied by P**-start)."""
    n = len(codes)
    is_word = np.zeros(n + 2, dtype=np.int8)
    is_word[1:-1] = _WORD[small]
    edges = is_word[1:] - is_word[:-1]
    starts = (edges == 1).nonzero()[0]
    ends = (edges == -1).nonzero()[0]
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(codes * pw[:n], out=prefix[1:])
    words: U64 = (prefix[ends] - prefix[starts]) * pinv[starts]
    return words, starts


def lowered(text: str) -> str:
    """The clipped, lower-cased text that n-grams are taken from (digits not yet folded)."""
    # Lower-casing can lengthen a text ("İ" becomes two code points): clip again after it.
    return clip(clip(text).lower())


def featurize(text: str) -> Features:
    """Features of one prompt; bounded work for any input length or content."""
    char_idx, word_idx, cues = featurize_parts(text)
    return Features(char_idx=char_idx, word_idx=word_idx, cues=cues)


def featurize_parts(text: str) -> tuple[I64, I64, F64]:
    """`featurize`'s three arrays (char_idx, word_idx, cues), for the scorer's hot path.

    The same numbers, bit for bit, as `featurize_many` gives, from about half as many numpy
    calls as hashing each n-gram size apart: one prefix sum gives every char n-gram's and
    every word's hash, both index blocks are mixed in one buffer, and the line cues are read
    from the text by regular expression. On a prompt of a few hundred characters each numpy
    call costs about a microsecond, far more than its arithmetic.
    """
    full_len = len(text)
    low = lowered(text)
    points = np.frombuffer(low.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = len(points)
    small = np.minimum(points, 128, dtype=np.intp)
    is_digit = _DIGIT[small]
    codes = points.astype(np.uint64)
    # Digits fold to "0": "17 apples" and "42 apples" are the same kind of ask.
    codes[is_digit] = 48
    cue_counts = np.bincount(small, minlength=129)

    # prefix[j] = sum_{i<j} codes[i] * P**i, flat past the end (the zeros padded after a
    # text). The run codes[a:b] then hashes to (prefix[b] - prefix[a]) * P**-a: the same
    # value, mod 2**64, as the polynomial sum_k codes[a+k] * P**k.
    pw, pinv = _powers()
    prefix = np.empty(n + max(CHAR_NGRAMS) + 1, dtype=np.uint64)
    prefix[0] = 0
    np.add.accumulate(codes * pw[:n], out=prefix[1 : n + 1])
    prefix[n + 1 :] = prefix[n]

    # Words: maximal runs of word characters. The edges of the runs alternate, a start first.
    is_word = np.zeros(n + 2, dtype=np.bool_)
    is_word[1:-1] = _WORD[small]
    edges = (is_word[1:] != is_word[:-1]).nonzero()[0]
    starts = edges[0::2]
    words: U64 = (prefix[edges[1::2]] - prefix[starts]) * pinv[starts]
    nw = len(words)

    # Both blocks in one buffer: chars (one row per size, as `_char_grams`), then words.
    n_char = len(CHAR_NGRAMS) * n
    grams = np.empty(n_char + (2 * nw - 1 if nw else 0), dtype=np.uint64)
    rows = grams[:n_char].reshape(len(CHAR_NGRAMS), n)
    step = prefix.itemsize
    ends = np.ndarray(rows.shape, np.uint64, prefix, CHAR_NGRAMS[0] * step, (step, step))
    np.subtract(ends, prefix[:n], out=rows)
    rows *= pinv[:n]
    rows += _CHAR_SALT_COL
    if nw:
        np.add(words, _UNI_SALT, out=grams[n_char : n_char + nw])
        bigrams = grams[n_char + nw :]
        np.multiply(words[:-1], _BI_MUL, out=bigrams)
        bigrams += words[1:]
        bigrams += _BI_SALT
    grams *= _MIX
    grams >>= _SHIFT
    # Buckets are below 2**HASH_BITS: the same numbers read as int64.
    idx: I64 = grams.view(np.int64)

    # Cues.
    scale = full_len / n if n else 1.0
    hashes, groups = _cue_lookup()
    pos = hashes.searchsorted(words)
    group_counts = np.bincount(groups[pos[hashes[pos] == words]], minlength=len(CUE_WORDS) + 1)
    n_numbers = int(np.count_nonzero(is_digit[1:] > is_digit[:-1])) + int(n > 0 and is_digit[0])
    dense = np.empty(N_CUES)
    dense[0] = full_len
    dense[1] = nw * scale
    dense[2] = cue_counts[10] + 1
    dense[3] = n_numbers
    # Lines that open like a list item or an option ("1.", "-", "a)") count as steps/choices.
    dense[4] = len(_LIST_LINE.findall(low)) if "\n" in low else 0
    dense[5] = len(_CHOICE_LINE.findall(low)) if "\n" in low else 0
    dense[6 : 6 + len(CUE_WORDS)] = group_counts[:-1]
    at = 6 + len(CUE_WORDS)
    np.multiply(cue_counts[_CUE_CODES], scale, out=dense[at : at + len(CUE_CHARS)])
    at += len(CUE_CHARS)
    np.log1p(dense[:at], out=dense[:at])
    dense[at:] = 0.0
    if nw:
        dense[at + _cue_tables()[2].get(int(words[0]), len(QUESTION_WORDS))] = 1.0
    return idx[:n_char], idx[n_char:], dense


_GAP = max(CHAR_NGRAMS) - 1
# Power tables up to this many positions (8 MiB each) are kept between batches.
_KEEP_POWERS = 1 << 20
_big_powers: tuple[U64, U64] = (np.ones(0, np.uint64), np.ones(0, np.uint64))


def _powers_upto(size: int) -> tuple[U64, U64]:
    """P**k and P**-k mod 2**64 for k < size (at least); kept, grown by doubling, up to a cap."""
    global _big_powers
    pw, pinv = _big_powers
    if len(pw) < size:
        n = max(size, min(2 * len(pw), _KEEP_POWERS), _MAX_LEN)
        pw = np.empty(n, dtype=np.uint64)
        pinv = np.empty(n, dtype=np.uint64)
        pw[0] = pinv[0] = 1
        pw[1:] = _P
        pinv[1:] = _P_INV
        # uint64 array products wrap mod 2**64, as in `_powers`.
        pw, pinv = np.cumprod(pw), np.cumprod(pinv)
        if n <= _KEEP_POWERS:
            _big_powers = (pw, pinv)
    return pw, pinv


@lru_cache(maxsize=1)
def _question_table() -> tuple[U64, I64]:
    """Sorted first-word hashes with their question-type ids (the dict of `_cue_tables`)."""
    first = _cue_tables()[2]
    keys = sorted(first)
    return np.array(keys, dtype=np.uint64), np.array([first[k] for k in keys], dtype=np.int64)


def _exclusive_cumsum(a: I64) -> I64:
    out = np.zeros(len(a), dtype=np.int64)
    np.cumsum(a[:-1], out=out[1:])
    return out


def featurize_many(texts: Sequence[str]) -> list[Features]:
    """`featurize` of each text, equal array for array, with a fixed number of numpy calls.

    The lowered texts are laid end to end with `max(CHAR_NGRAMS) - 1` zeros after each, the
    padding `featurize` gives one text: n-gram hashes then read the same code points, zeros
    are no word characters, so words and digit runs never span two texts, and a word's
    prefix-sum hash is shift-invariant (multiplying by P**-start). Per-text counts are
    bincounts over (text, value).
    """
    m = len(texts)
    if m == 0:
        return []
    lows = [lowered(t) for t in texts]
    full = np.array([len(t) for t in texts], dtype=np.int64)
    n = np.array([len(t) for t in lows], dtype=np.int64)
    gap = "\0" * _GAP
    codes = _encode(gap.join(lows) + gap)
    span = n + _GAP
    total = int(span.sum())
    if len(codes) != total:
        raise ValueError("text encoding is not one code unit per code point")
    off = _exclusive_cumsum(span)
    tid = np.repeat(np.arange(m, dtype=np.int64), span)
    local = np.arange(total, dtype=np.int64) - off[tid]
    valid = local < n[tid]
    small = np.minimum(codes, 128)
    is_digit = _DIGIT[small]
    codes[is_digit] = 48
    vpos = valid.nonzero()[0]
    cue_counts = np.bincount(tid[vpos] * 129 + small[vpos].astype(np.int64), minlength=m * 129).reshape(
        m, 129
    )

    # Character n-grams, as in `featurize`, over the whole layout (each row one size).
    pw, pinv = _powers_upto(total)
    char_rows = _char_grams(codes, pw).astype(np.int64)

    # Words.
    words, starts = _word_hashes(codes, small, pw, pinv)
    uni = (((words + _UNI_SALT) * _MIX) >> _SHIFT).astype(np.int64)
    bi = (((words[:-1] * _BI_MUL + words[1:] + _BI_SALT) * _MIX) >> _SHIFT).astype(np.int64)
    wt = tid[starts]
    n_words = np.bincount(wt, minlength=m)
    wstart = _exclusive_cumsum(n_words)

    # Cues.
    scale = np.where(n > 0, full / np.maximum(n, 1), 1.0)
    hashes, groups, _ = _cue_tables()
    pos = np.minimum(np.searchsorted(hashes, words), len(hashes) - 1)
    hit = hashes[pos] == words
    n_groups = len(CUE_WORDS)
    group_counts = np.bincount(wt[hit] * n_groups + groups[pos[hit]], minlength=m * n_groups).reshape(
        m, n_groups
    )
    qtype = np.zeros((m, len(QUESTION_WORDS) + 1))
    has = (n_words > 0).nonzero()[0]
    firsts = words[wstart[has]]
    q_hashes, q_ids = _question_table()
    q_pos = np.minimum(np.searchsorted(q_hashes, firsts), len(q_hashes) - 1)
    qtype[has, np.where(q_hashes[q_pos] == firsts, q_ids[q_pos], len(QUESTION_WORDS))] = 1.0
    run_starts = is_digit.copy()
    run_starts[1:] &= ~is_digit[:-1]
    n_numbers = np.bincount(tid[run_starts], minlength=m)
    line_starts = (codes[:-1] == 10).nonzero()[0] + 1
    line_starts = line_starts[valid[line_starts]]
    lt = tid[line_starts]
    heads = codes[line_starts]
    after = codes[np.minimum(line_starts + 1, off[lt] + n[lt] - 1)]
    listy = np.bincount(lt[(heads == 45) | (heads == 42) | (heads == 48)], minlength=m)
    choice = np.bincount(lt[(heads >= 97) & (heads <= 101) & ((after == 41) | (after == 46))], minlength=m)
    dense = np.empty((m, N_CUES))
    dense[:, 0] = full
    dense[:, 1] = n_words * scale
    dense[:, 2] = cue_counts[:, 10] + 1
    dense[:, 3] = n_numbers
    dense[:, 4] = listy
    dense[:, 5] = choice
    dense[:, 6 : 6 + n_groups] = group_counts
    at = 6 + n_groups
    dense[:, at : at + len(CUE_CHARS)] = cue_counts[:, _CUE_CODES] * scale[:, None]
    at += len(CUE_CHARS)
    np.log1p(dense[:, :at], out=dense[:, :at])
    dense[:, at:] = qtype

    out: list[Features] = []
    for i, (o, k, a, w) in enumerate(
        zip(off.tolist(), n.tolist(), wstart.tolist(), n_words.tolist(), strict=True)
    ):
        out.append(
            Features(
                char_idx=char_rows[:, o : o + k].ravel(),
                word_idx=np.concatenate((uni[a : a + w], bi[a : a + max(w - 1, 0)])),
                cues=dense[i],
            )
        )
    return out


def document_frequency(feats: Sequence[Features]) -> npt.NDArray[np.int64]:
    """How many prompts hit each bucket (either block)."""
    df = np.zeros(N_BUCKETS, dtype=np.int64)
    for f in feats:
        df[np.unique(np.concatenate((f.char_idx, f.word_idx)))] += 1
    return df


def idf_weights(df: npt.NDArray[np.int64], n_docs: int) -> F64:
    """Smoothed IDF as scikit-learn's TfidfVectorizer computes it, rounded to float32.

    The rounding happens before training, so the artifact can store float32 and the hot
    path still reproduces the fitted model exactly.
    """
    idf: F64 = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
    rounded: F64 = idf.astype(np.float32).astype(np.float64)
    return rounded


def block_values(idx: I64, idf: F64) -> F64:
    """TF-IDF values of one block's occurrences, L2-normalised over the occurrences."""
    v = idf[idx]
    norm = float(np.sqrt(np.dot(v, v)))
    out: F64 = v / norm if norm > 0 else v
    return out


def feature_matrix(feats: Sequence[Features], idf: F64, cue_mean: F64, cue_std: F64) -> sparse.csr_matrix:
    """Rows of [hashed n-gram TF-IDF (N_BUCKETS) | standardised cues (N_CUES)].

    An n-gram seen k times contributes k * idf / norm to its bucket, where norm is the
    root of the summed squared idf over all occurrences in its block; the hot path
    (`classifiers.learned`) computes the same two sums per block.
    """
    indptr = [0]
    indices: list[I64] = []
    data: list[F64] = []
    cue_cols = np.arange(N_BUCKETS, N_BUCKETS + N_CUES, dtype=np.int64)
    for f in feats:
        parts_i = [f.char_idx, f.word_idx, cue_cols]
        parts_d = [
            block_values(f.char_idx, idf),
            block_values(f.word_idx, idf),
            (f.cues - cue_mean) / cue_std,
        ]
        indices.extend(parts_i)
        data.extend(parts_d)
        indptr.append(indptr[-1] + sum(len(p) for p in parts_i))
    matrix = sparse.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.array(indptr)),
        shape=(len(feats), N_BUCKETS + N_CUES),
    )
    # Repeated n-grams land in one bucket; summing them makes the matrix canonical.
    matrix.sum_duplicates()
    return matrix
