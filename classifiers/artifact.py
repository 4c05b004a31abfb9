"""The artifact format shared by training and scoring: identity, version, feature spec, I/O.

Kept free of scikit-learn so the gateway can load a model without importing it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import joblib

from classifiers import features as F

FORMAT = "triage-complexity"
# Bump when the artifact's keys or the meaning of its arrays change.
FORMAT_VERSION = 2


def feature_spec() -> dict[str, Any]:
    """The featurizer constants an artifact depends on (checked at load)."""
    return {
        "hash_bits": F.HASH_BITS,
        "char_ngrams": list(F.CHAR_NGRAMS),
        "head_chars": F.HEAD_CHARS,
        "tail_chars": F.TAIL_CHARS,
        "n_cues": F.N_CUES,
    }


def save(artifact: dict[str, Any], path: Path) -> None:
    """Write the artifact with joblib (compressed; same artifact -> same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    joblib.dump(artifact, buf, compress=("zlib", 3))
    path.write_bytes(buf.getvalue())


def sigmoid(z: float) -> float:
    """Logistic function that never overflows."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)
