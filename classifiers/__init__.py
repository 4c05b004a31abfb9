"""Complexity scorers: how likely a request is to need the teacher model."""

from classifiers.base import Scorer, prompt_text
from classifiers.registry import load_scorer

__all__ = ["Scorer", "load_scorer", "prompt_text"]
