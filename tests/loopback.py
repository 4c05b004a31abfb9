"""Real uvicorn servers on 127.0.0.1 ephemeral ports, run in a thread for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp


class LoopbackServer(uvicorn.Server):
    """A uvicorn server that can run outside the main thread."""

    def install_signal_handlers(self) -> None:
        # Signal handlers can only be installed in the main thread.
        pass


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """Serve `app` on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = LoopbackServer(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("loopback server failed to start")
        time.sleep(0.001)
    try:
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"
