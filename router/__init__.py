"""Triage: an OpenAI-compatible gateway that routes requests to distilled students or the teacher."""

__version__ = "0.1.0"
