"""A raw TCP upstream for faults an HTTP framework will not produce: resets and garbage."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Literal

RawMode = Literal["reset_mid_body", "garbage", "close_after_headers"]


async def _handle(mode: RawMode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return
    if mode == "garbage":
        writer.write(b"\x00\x01 this is not HTTP at all\r\n\r\n")
    elif mode == "close_after_headers":
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n")
    else:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n"
            b'{"id": "x", "choices": [{"index": 0, "message": {"content": "partial'
        )
    await writer.drain()
    sock = writer.get_extra_info("socket")
    if mode == "reset_mid_body" and sock is not None:
        # SO_LINGER with a zero timeout makes close() send a TCP reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextmanager
def tcp_server(handle: Handler) -> Iterator[str]:
    """Run `handle` for each connection on a loopback port, in a background thread's event
    loop; yield the base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextmanager
def raw_upstream(mode: RawMode) -> Iterator[str]:
    """Serve `mode` on a loopback port in a background thread; yield the base URL."""
    with tcp_server(lambda r, w: _handle(mode, r, w)) as url:
        yield url
