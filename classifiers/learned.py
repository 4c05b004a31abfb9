"""The learned scorer: fitted weights evaluated directly on the hot path.

Scoring one prompt is two parts added in log-odds, then calibrated:
- lexical: `classifiers.features.featurize` plus a gather-and-sum over the hashed weights
  (TF-IDF folded in) and a 69-term dot product;
- semantic: the mean fitted weight of the prompt's WordPiece tokens (`classifiers.semantic`),
  with a few pseudo-tokens at the average training prompt, which equals a logistic
  regression on the prompt's (shrunk) mean static MiniLM vector.
Tens of microseconds in all, instead of the ~1 ms of scikit-learn's per-call input
validation. Loading never imports scikit-learn.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt

from classifiers import features as F
from classifiers.artifact import FORMAT, FORMAT_VERSION, feature_spec, sigmoid
from classifiers.base import TextScorer
from classifiers.semantic import TokenWeights

_SUM = np.add.reduce
# score_many encodes the unseen chunks of this many texts in one tokenizer call.
_PRIME_BATCH = 1024


class ArtifactError(ValueError):
    """The artifact file is not one this code can score with."""


class LearnedScorer(TextScorer):
    """Calibrated probability that a prompt needs the teacher, from a trained artifact."""

    name = "learned"

    def __init__(self, artifact: dict[str, Any]) -> None:
        self.metadata: dict[str, Any] = dict(artifact["metadata"])
        idf = np.asarray(artifact["idf"], np.float64)
        # Per occurrence: weight * idf goes to the numerator, idf**2 to the block's norm.
        self._wi: npt.NDArray[np.float64] = np.asarray(artifact["ngram_weights"], np.float64) * idf
        self._idf2: npt.NDArray[np.float64] = idf * idf
        # The cues' training mean, kept for explanations (scoring folds it into the offset).
        self.cue_mean: npt.NDArray[np.float64] = np.asarray(artifact["cue_mean"], np.float64)
        cue_std = np.asarray(artifact["cue_std"], np.float64)
        cue_w = np.asarray(artifact["cue_weights"], np.float64)
        self._cue_w: npt.NDArray[np.float64] = cue_w / cue_std
        # Standardising the cues is folded into the weights and the intercept.
        self._offset = float(artifact["intercept"]) - float(np.dot(self.cue_mean, self._cue_w))
        self._calib_a, self._calib_b = (float(v) for v in artifact["calibration"])
        self.semantic = TokenWeights(str(artifact["tokenizer_json"]), np.asarray(artifact["token_weights"]))
        self._semantic_offset = float(artifact["semantic_offset"])
        self._semantic_prior = float(artifact["semantic_prior_tokens"])
        self._semantic_pull = self._semantic_prior * float(artifact["semantic_center"])

    @classmethod
    def load(cls, path: Path) -> LearnedScorer:
        """Load an artifact written by `classifiers.train.save`; fail clearly on a mismatch."""
        with warnings.catch_warnings():
            # An artifact holding a pickled scikit-learn object from another version would
            # raise InconsistentVersionWarning; matching on the message avoids importing
            # scikit-learn at gateway start.
            warnings.filterwarnings("error", message=r".*Trying to unpickle estimator")
            try:
                artifact = joblib.load(path)
            except Warning as exc:
                raise ArtifactError(f"{path}: built with another scikit-learn: {exc}") from exc
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - a file that is no artifact fails anywhere in unpickling
                raise ArtifactError(
                    f"{path}: not a readable classifier artifact ({type(exc).__name__})"
                ) from exc
        if not isinstance(artifact, dict) or artifact.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not a {FORMAT} artifact")
        if artifact.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: format version {artifact.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; retrain with `triage train --out {path}`"
            )
        spec = artifact["metadata"].get("features")
        if spec != feature_spec():
            raise ArtifactError(
                f"{path}: trained with features {spec}, this code computes {feature_spec()}; "
                f"retrain with `triage train --out {path}`"
            )
        try:
            return cls(artifact)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactError(
                f"{path}: a {FORMAT} artifact with missing or malformed parts ({exc!r})"
            ) from exc

    def lexical(self, text: str) -> float:
        """The n-gram and cue model's log-odds."""
        return self._lexical(*F.featurize_parts(text))

    def _lexical_from(self, f: F.Features) -> float:
        """The n-gram and cue model's log-odds for computed features."""
        return self._lexical(f.char_idx, f.word_idx, f.cues)

    def _lexical(self, char_idx: F.I64, word_idx: F.I64, cues: F.F64) -> float:
        z = self._offset + float(np.dot(cues, self._cue_w))
        for idx in (char_idx, word_idx):
            if len(idx):
                # add.reduce is what ndarray.sum() runs, without its Python-level wrapper.
                z += float(_SUM(self._wi[idx])) / math.sqrt(float(_SUM(self._idf2[idx])))
        return z

    def semantic_part(self, text: str) -> float:
        """The semantic model's share of the log-odds (already scaled by the fitted mix)."""
        total, n = self.semantic.totals(text)
        return self._semantic_offset + (total + self._semantic_pull) / (n + self._semantic_prior)

    def decision(self, text: str) -> float:
        """The combined raw log-odds (before calibration)."""
        return self.lexical(text) + self.semantic_part(text)

    def calibrate(self, z: float) -> float:
        """Map raw log-odds to the calibrated probability."""
        p = sigmoid(self._calib_a * z + self._calib_b)
        return p if math.isfinite(p) else 0.5

    def score_text(self, text: str) -> float:
        """Probability in [0, 1] that `text` needs the teacher."""
        return self.calibrate(self.decision(text))

    def score_many(self, texts: Iterable[str]) -> list[float]:
        """Score many texts: the same scores as `score_text` on each, in order.

        Each slice of texts first has its unseen short chunks tokenized in one `encode_batch`
        call: one call per prompt costs a fixed ~0.1 ms that then dominates the cold path.
        Its features come from one `featurize_many` call, for the same reason.
        """
        out: list[float] = []
        rest = iter(texts)
        while part := list(islice(rest, _PRIME_BATCH)):
            self.semantic.prime(part)
            feats = F.featurize_many(part)
            out.extend(
                self.calibrate(self._lexical_from(f) + self.semantic_part(t))
                for t, f in zip(part, feats, strict=True)
            )
        return out
