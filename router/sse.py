"""Server-sent events from an upstream: a streamed body split into whole events, in linear time.

The body arrives in chunks of any size: one byte, or thousands of events in one
write. Each byte is searched for an event boundary at most twice and copied at
most twice, so a burst costs the same per event as a trickle. Events served from the
buffer never wait on the socket, so a long burst would keep the event loop to
itself; the stream therefore lets other tasks run every few milliseconds.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable

import aiohttp

from router.errors import UpstreamTooLarge, UpstreamUnavailable, map_upstream_errors

__all__ = ["MAX_EVENT_BYTES", "SSEStream"]

# No legitimate chunk of a completion stream comes near this.
MAX_EVENT_BYTES = 4 * 1024 * 1024
# Longest stretch of events served from the buffer before other tasks get a turn,
# checked every few events (a clock read costs about as much as a short event).
_SLICE_S = 0.005
_CHECK_EVERY = 16
_LINE_BREAKS = re.compile(rb"[\r\n]*")
_LINE_BREAK_BYTES = (0x0A, 0x0D)
_DONE = (b"data: [DONE]", b"data:[DONE]")


class SSEStream:
    """A streaming upstream response split into whole server-sent events.

    Events are yielded as raw bytes ending in a blank line (`\\n\\n`), so the
    client receives what the upstream sent; an event may also end in `\\r\\n\\r\\n`.
    `release` is called once when the stream is closed (the pool slot it holds).
    """

    _closed = True  # until __init__ completes, so __del__ has nothing to do

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        model: str,
        max_bytes: int = 32 * 1024 * 1024,
        release: Callable[[], None] | None = None,
    ) -> None:
        self.response = response
        self.model = model
        self.done = False  # saw `data: [DONE]`
        self._content = response.content
        self._max_bytes = max_bytes
        self._release = release
        self._loop = asyncio.get_running_loop()
        # The unread body is `_data[_start:]` followed by `_pieces` (one of the two is
        # empty); `_lf`/`_crlf` are the next `\\n\\n`/`\\r\\n\\r\\n` in `_data` from `_start`, or -1.
        self._data = b""
        self._start = 0
        self._lf = -1
        self._crlf = -1
        self._pieces: list[bytes] = []  # an event cut across reads, kept as received
        self._pieces_bytes = 0
        self._last3 = b""  # the pieces' last bytes, where a blank line may begin
        self._received = 0
        self._countdown = _CHECK_EVERY  # events until the next look at the clock
        self._slice_start = time.perf_counter()
        self._closed = False

    async def next_event(self) -> bytes | None:
        """The next complete event, or None at the end of the body."""
        while self._lf < 0 and self._crlf < 0:
            if len(self._data) - self._start + self._pieces_bytes > MAX_EVENT_BYTES:
                # An event that never ends would otherwise grow without bound.
                raise UpstreamUnavailable(
                    f"model {self.model!r} sent a stream event over {MAX_EVENT_BYTES} bytes"
                )
            with map_upstream_errors(self.model):
                chunk = await self._content.readany()
            if not chunk:
                return self._tail()
            self._received += len(chunk)
            if self._received > self._max_bytes:
                raise UpstreamTooLarge(f"model {self.model!r} sent a stream over {self._max_bytes} bytes")
            self._feed(chunk)
        self._countdown -= 1
        if not self._countdown:
            self._countdown = _CHECK_EVERY
            if time.perf_counter() - self._slice_start > _SLICE_S:
                # Before taking the event: a cancellation here loses nothing.
                await asyncio.sleep(0)
                self._slice_start = time.perf_counter()
        event = self._cut()
        if event.startswith(_DONE):
            self.done = True
        return event

    def buffered(self) -> bool:
        """Whether a whole event is already here (the next `next_event` will not wait)."""
        return self._lf >= 0 or self._crlf >= 0

    def _cut(self) -> bytes:
        """Take the event at `_start` (a boundary is known to follow it)."""
        data, lf, crlf = self._data, self._lf, self._crlf
        if crlf < 0 or 0 <= lf < crlf:
            event = data[self._start : lf + 2]
            end = lf + 2
        else:
            event = data[self._start : crlf] + b"\n\n"
            end = crlf + 4
        # Further line breaks belong to no event.
        if end < len(data) and data[end] in _LINE_BREAK_BYTES and (m := _LINE_BREAKS.match(data, end)):
            end = m.end()
        self._start = end
        # Search again only past a separator already used, so a form the stream
        # never uses is not looked for again on every event.
        if 0 <= lf < end:
            self._lf = data.find(b"\n\n", end)
        if 0 <= crlf < end:
            self._crlf = data.find(b"\r\n\r\n", end)
        return event

    def _feed(self, chunk: bytes) -> None:
        """Add a read. While it completes no event it is only searched (with the 3
        bytes before it, where a blank line may begin) and kept as a piece; the
        pieces are joined once, when their event is complete. So every byte is
        searched at most twice and copied at most twice, however the body is cut up.
        """
        data, start = self._data, self._start
        if self._pieces or start < len(data):
            last3 = self._last3 if self._pieces else data[max(start, len(data) - 3) :]
            if not (b"\n\n" in chunk or b"\r\n\r\n" in chunk or _has_boundary(last3 + chunk[:3])):
                if not self._pieces:
                    self._pieces.append(data[start:])
                    self._pieces_bytes = len(data) - start
                    self._data, self._start = b"", 0
                self._pieces.append(chunk)
                self._pieces_bytes += len(chunk)
                self._last3 = (last3 + chunk[-3:])[-3:]
                return
            chunk = b"".join([*self._pieces, chunk]) if self._pieces else data[start:] + chunk
            self._pieces.clear()
            self._pieces_bytes = 0
        self._data, self._start = chunk, 0
        self._lf = chunk.find(b"\n\n")
        self._crlf = chunk.find(b"\r\n\r\n")

    def _tail(self) -> bytes | None:
        """At the end of the body: what is left, as a last event, if anything."""
        tail = b"".join([self._data[self._start :], *self._pieces]).strip()
        self._data, self._start = b"", 0
        self._pieces.clear()
        self._pieces_bytes = 0
        if not tail:
            return None
        if tail.startswith(_DONE):
            self.done = True
        return tail + b"\n\n"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (event := await self.next_event()) is not None:
            yield event

    async def aclose(self) -> None:
        """Give the connection back (or drop it when the body was not read to the end), then the slot."""
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.done or self._content.at_eof():
            self.response.release()
        else:
            self.response.close()
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        # A stream dropped without aclose (a path that forgot it) must not keep its
        # connection or its pool slot. The slot is released from the event loop,
        # never from inside whatever code the garbage collector interrupted.
        if self._closed:
            return
        self._closed = True
        self.response.close()
        release, self._release = self._release, None
        if release is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(release)


def _has_boundary(data: bytes) -> bool:
    return b"\n\n" in data or b"\r\n\r\n" in data
