"""Cost of splitting an upstream stream into events: `router.sse.SSEStream` against the old splitter.

The body is fed from memory (no sockets), so the numbers are the parser's own CPU
time per event, including the `buffered()` call the gateway makes before each one.
"one write" hands the whole body over as a single read, the worst case for a
splitter that rescans its buffer; "512 B writes" cuts it every 512 bytes (events
split across reads); "per event" hands over one event per read, as a model server
streaming tokens does. The old splitter (kept below, as it was before this change)
rescanned and copied the rest of its buffer for every event, so its cost per event
grows with the size of a burst; it is skipped where that would take minutes.

`stall ms` is the longest the event loop went without a turn for other tasks while
the stream was read (measured by a ticker task).

    .venv/bin/python bench/sse.py [--old-budget 1e11]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from typing import cast

import aiohttp
import orjson

from router.errors import map_upstream_errors
from router.sse import SSEStream

TINY = b"data: x\n\n"


def typical_event(i: int) -> bytes:
    """A chat completion chunk of about 180 bytes, as vLLM sends them."""
    obj = {
        "id": "chatcmpl-8f2a",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "student",
        "choices": [
            {"index": 0, "delta": {"content": f" tok{i % 1000}"}, "logprobs": None, "finish_reason": None}
        ],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Body:
    """Stands in for aiohttp's StreamReader: hands out the chunks, never waits."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._eof = False

    async def readany(self) -> bytes:
        chunk = next(self._chunks, b"")
        self._eof = not chunk
        return chunk

    def at_eof(self) -> bool:
        return self._eof


class _Response:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Body(chunks)

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class OldSSEStream:
    """The splitter before this change (router/upstream.py at 6352539), for comparison."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._content = _Body(chunks)
        self._buffer = b""
        self.done = False

    async def next_event(self) -> bytes | None:
        while True:
            cut = self._find_boundary()
            if cut >= 0:
                event, self._buffer = self._buffer[:cut], self._buffer[cut:].lstrip(b"\r\n")
                if event.startswith((b"data: [DONE]", b"data:[DONE]")):
                    self.done = True
                return event + b"\n\n"
            with map_upstream_errors("bench"):
                chunk = await self._content.readany()
            if not chunk:
                tail, self._buffer = self._buffer.strip(), b""
                if tail:
                    if tail.startswith((b"data: [DONE]", b"data:[DONE]")):
                        self.done = True
                    return tail + b"\n\n"
                return None
            self._buffer += chunk

    def buffered(self) -> bool:
        return self._find_boundary() >= 0

    def _find_boundary(self) -> int:
        buf = self._buffer
        i = buf.find(b"\n\n")
        j = buf.find(b"\r\n\r\n")
        if i < 0:
            return j
        if j < 0:
            return i
        return min(i, j)


def body(kind: str, n: int) -> bytes:
    events = [TINY] * n if kind == "tiny" else [typical_event(i) for i in range(n)]
    return b"".join(events) + b"data: [DONE]\n\n"


def chunks_of(data: bytes, delivery: str) -> list[bytes]:
    if delivery == "one write":
        return [data]
    if delivery == "per event":
        return [event + b"\n\n" for event in data.split(b"\n\n") if event]
    return [data[i : i + 512] for i in range(0, len(data), 512)]


async def _drain(stream: SSEStream | OldSSEStream) -> int:
    count = 0
    # The gateway's pump asks `buffered()` before each event; do the same.
    while True:
        stream.buffered()
        if await stream.next_event() is None:
            return count
        count += 1


async def measure(new: bool, chunks: list[bytes]) -> tuple[int, float, float]:
    """(events, CPU seconds, longest loop stall in seconds)."""
    stall = 0.0
    running = True

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0)
            now = time.perf_counter()
            stall = max(stall, now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    if new:
        stream: SSEStream | OldSSEStream = SSEStream(
            cast(aiohttp.ClientResponse, _Response(chunks)), "bench", max_bytes=1 << 40
        )
    else:
        stream = OldSSEStream(chunks)
    cpu = time.process_time()
    events = await _drain(stream)
    cpu = time.process_time() - cpu
    running = False
    await tick
    return events, cpu, stall


async def main(old_budget: float) -> None:
    print(
        f"{'events':>7} {'kind':>7} {'delivery':>12} {'MB':>6} | {'new µs/ev':>9} {'new MB/s':>8}"
        f" {'stall ms':>8} | {'old µs/ev':>9} {'old MB/s':>8} {'stall ms':>8}"
    )
    for n in (1_000, 20_000, 400_000):
        for kind in ("tiny", "typical"):
            data = body(kind, n)
            mb = len(data) / 1e6
            for delivery in ("one write", "512 B writes", "per event"):
                chunks = chunks_of(data, delivery)
                events, cpu, stall = await measure(True, chunks)
                row = (
                    f"{events:>7} {kind:>7} {delivery:>12} {mb:>6.2f} | {cpu / events * 1e6:>9.2f}"
                    f" {mb / cpu:>8.1f} {stall * 1e3:>8.1f} |"
                )
                # The old splitter copies the rest of a one-write body for every event.
                if delivery != "one write" or events * len(data) <= old_budget:
                    events, cpu, stall = await measure(False, chunks)
                    row += f" {cpu / events * 1e6:>9.2f} {mb / cpu:>8.1f} {stall * 1e3:>8.1f}"
                else:
                    row += f" {'skipped (quadratic: minutes)':>28}"
                print(row, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--old-budget",
        type=float,
        default=1e11,
        help="skip the old splitter on one-write bodies where events x bytes exceeds this "
        "(1e11 is about a minute)",
    )
    asyncio.run(main(parser.parse_args().old_budget))
