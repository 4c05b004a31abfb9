"""Every wire format the gateway speaks, by name and by client path.

Adding an API means adding its module here and one line in `FORMATS`.
"""

from __future__ import annotations

from router.config import ApiName
from router.endpoints.base import Prompt, WireFormat
from router.endpoints.chat import ChatFormat, CompletionsFormat
from router.endpoints.embeddings import EmbeddingsFormat
from router.endpoints.messages import MessagesFormat
from router.endpoints.responses import ResponsesFormat

__all__ = [
    "BY_PATH",
    "FORMATS",
    "Prompt",
    "WireFormat",
]

FORMATS: dict[ApiName, WireFormat] = {
    f.name: f
    for f in (
        ChatFormat(),
        CompletionsFormat(),
        ResponsesFormat(),
        MessagesFormat(),
        EmbeddingsFormat(),
    )
}
BY_PATH: dict[str, WireFormat] = {f.path: f for f in FORMATS.values()}
