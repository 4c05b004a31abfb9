"""Connection limits for the HTTP server: request-head size, head deadline, open connections.

uvicorn's httptools protocol, which the gateway runs, bounds none of these. A request
head of any size is parsed (httptools keeps growing one header value until it ends),
a connection that never sends a request is never closed (the keep-alive timer starts
only after a response, and any byte cancels it), and every accepted socket takes a
file descriptor until the process can no longer accept or reach its upstreams.
`GatewayProtocol` adds, per connection:

- a head budget: bytes are counted while a request head is incomplete, and no more
  than `max_header_bytes` of them reach the parser. A longer head gets 431 and the
  connection is closed, so memory per connection stays under the budget whatever
  the client sends. One header (name and value) over `max_header_line_bytes` also
  gets 431; a request target over that size gets 414. A head with more than
  `MAX_HEADERS` headers gets 431 `too_many_headers`: each header costs a parser
  callback and a list entry, and 13,000 tiny ones fit in the byte budget.
- OpenAI-shaped answers to broken HTTP: where uvicorn sends a plain-text `400 Invalid
  HTTP request received.` (conflicting Content-Length, Content-Length with
  Transfer-Encoding, a bad chunk size, a bad method, bare LF, garbage), the gateway
  sends 400 `invalid_http_request` in the JSON error shape, then closes. The parser's
  own message is not echoed, since it can quote the client's bytes.
- pipelined requests keep their answers: when a request that breaks a limit or is not
  HTTP follows requests whose answers are still being written, the refusal is sent
  after those answers instead of in front of them (uvicorn writes its 400 at once).
- a head deadline: a connection must deliver a whole request head within
  `header_timeout_s` of opening, or of the end of its previous response. Bytes that
  trickle in do not extend it. A connection with part of a head gets 408. A silent
  one is closed without an answer after the sooner of `header_timeout_s` and
  uvicorn's `timeout_keep_alive` (5 s), before its first request as after a response.
- a connection cap per process: at `max_connections`, a new connection closes the
  connection that has been idle longest (before its first request or between
  requests); when none is idle, the new one gets 503 `overloaded` with
  `Retry-After: 1` and is closed. The default cap is what the open-file limit
  leaves after the upstream pools, and `configure_protocol` first raises the soft
  open-file limit to the hard one.

What uvicorn offers instead, and why it is not used: `limit_concurrency` counts
connections too, but it still accepts them (each keeps its descriptor) and answers
every request with 503 once the count is reached, including requests on connections
a client already holds. `h11_max_incomplete_event_size` bounds the head only in the
h11 protocol; the httptools protocol ignores it. `timeout_keep_alive` only starts
after a response and any byte stops it; here one timer per connection does its job
and the head deadline's.

Normal requests pay a counter update per `data_received` call and two dict
operations; the head timer replaces uvicorn's keep-alive timer, so timer work per
request is unchanged (a uvloop timer costs a few microseconds). Workers started by
`triage serve --workers N` import this class by name, so the limits travel to them
in an environment variable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar
from weakref import WeakKeyDictionary

import httptools
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from router.config import Config, ServerConfig
from router.errors import error_body

__all__ = [
    "BODY_COMPLETE",
    "DISCONNECT_HOOK",
    "ConnectionLimits",
    "GatewayProtocol",
    "configure_protocol",
    "raise_open_file_limit",
]

log = logging.getLogger("triage.server")

LIMITS_ENV = "TRIAGE_CONNECTION_LIMITS"
# Descriptors kept free for everything that is not a client or upstream socket:
# listening sockets, log and metrics files, the classifier, DNS lookups.
FD_RESERVE = 64
MIN_CONNECTIONS = 32
# After a refusal, input is read and dropped for this long (or this many bytes) before
# the close, so that the client reads the answer instead of a reset.
LINGER_S = 1.0
LINGER_BYTES = 1 << 20
_WARN_EVERY_S = 10.0
# Headers allowed in one request head; clients send about 10-30.
MAX_HEADERS = 128
# Scope key of a callable the app may set: called when the connection of a request
# whose response is not complete is lost (uvicorn only tells a task that awaits receive()).
DISCONNECT_HOOK = "triage.on_disconnect"
# Scope key set to True once a request's whole body has arrived: reading it cannot wait.
BODY_COMPLETE = "triage.body_complete"


@dataclass(frozen=True)
class ConnectionLimits:
    """The resolved limits one server process enforces."""

    max_header_bytes: int
    max_header_line_bytes: int
    header_timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, config: Config) -> ConnectionLimits:
        """Limits from the config; the connection cap defaults to what the open-file limit leaves."""
        server = config.server
        pools = sum(m.max_connections for m in config.models)
        return cls._from_server(server, pools)

    @classmethod
    def _from_server(cls, server: ServerConfig, pools: int) -> ConnectionLimits:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget = soft - pools - FD_RESERVE if soft != resource.RLIM_INFINITY else 1 << 20
        # Below the floor the gateway could hardly serve anyone; it accepts that many
        # and relies on upstream pools rarely being full.
        room = max(budget, MIN_CONNECTIONS)
        cap = room if server.max_connections is None else min(server.max_connections, room)
        if budget < MIN_CONNECTIONS or (server.max_connections or 0) > room:
            log.warning(
                "open-file limit %d leaves room for %d client connections after %d upstream ones; "
                "accepting at most %d (raise `ulimit -n` for more)",
                soft,
                budget,
                pools,
                cap,
            )
        return cls(server.max_header_bytes, server.max_header_line_bytes, server.header_timeout_s, cap)

    @classmethod
    def from_env(cls) -> ConnectionLimits:
        """Limits set by `configure_protocol` in the parent process, or the config defaults."""
        raw = os.environ.get(LIMITS_ENV)
        if raw:
            return cls(**json.loads(raw))
        return cls._from_server(ServerConfig(), pools=0)


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite soft RLIMIT_NOFILE; 2**20 is the kernel's default nr_open.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def configure_protocol(config: Config) -> type[GatewayProtocol]:
    """Raise the open-file limit, fix this config's limits for this process and its workers.

    Returns the protocol class to pass to uvicorn as `http=`.
    """
    raise_open_file_limit()
    limits = ConnectionLimits.from_config(config)
    GatewayProtocol.limits = limits
    # Spawned workers inherit the environment and import the class afresh.
    os.environ[LIMITS_ENV] = json.dumps(asdict(limits))
    return GatewayProtocol


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request that breaks a limit."""


class _Connections:
    """One server's idle connections, the longest idle first."""

    def __init__(self) -> None:
        self.idle: OrderedDict[GatewayProtocol, None] = OrderedDict()
        self.warned_at = 0.0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.warned_at >= _WARN_EVERY_S:
            self.warned_at = now
            log.warning(message, *args)


_servers: WeakKeyDictionary[ServerState, _Connections] = WeakKeyDictionary()


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head, a head deadline and a connection cap."""

    limits: ClassVar[ConnectionLimits | None] = None

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = GatewayProtocol.limits
        if limits is None:
            limits = GatewayProtocol.limits = ConnectionLimits.from_env()
        self._max_head_bytes = limits.max_header_bytes
        self._max_line_bytes = limits.max_header_line_bytes
        self._header_timeout_s = limits.header_timeout_s
        # A silent connection is closed after uvicorn's keep-alive timeout if that is sooner.
        self._idle_timeout_s = min(limits.header_timeout_s, config.timeout_keep_alive)
        self._max_connections = limits.max_connections
        table = _servers.get(server_state)
        if table is None:
            table = _servers[server_state] = _Connections()
        self._table = table
        self._idle = table.idle
        # While a head is being read: bytes of it seen so far (may include the start of a body).
        self._reading_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, bytes] | None = None
        self._lingering = False
        # A refusal waiting for the answers to earlier pipelined requests.
        self._deferred: tuple[int, bytes, bytes] | None = None

    # Connection lifetime

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        full = len(self.connections) >= self._max_connections
        super().connection_made(transport)
        if full and not self._make_room():
            self._table.warn(
                "%d client connections open, none idle: refusing new ones", len(self.connections) - 1
            )
            body = error_body(
                "The gateway has too many open connections; retry shortly.",
                "server_error",
                code="overloaded",
            )
            self._reject(503, body, b"retry-after: 1\r\n")
            return
        self._idle[self] = None
        self._arm_head_timer()

    def _make_room(self) -> bool:
        """Close the longest-idle connection; False when every connection is busy."""
        idle = self._idle
        if not idle:
            return False
        victim, _ = idle.popitem(last=False)
        victim._cancel_head_timer()
        victim.transport.close()
        self._table.warn(
            "%d client connections open: closing the longest idle ones", len(self.connections) - 1
        )
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        self._cancel_head_timer()
        self._idle.pop(self, None)
        if cycle is not None and not cycle.response_complete:
            hook: Callable[[], None] | None = cycle.scope.get(DISCONNECT_HOOK)  # type: ignore[assignment]
            if hook is not None:
                hook()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_head_timer(self) -> None:
        # One timer serves as uvicorn's keep-alive timer and as the head deadline, so a
        # request costs no more timer work than it does with the stock protocol.
        self._head_timer = self.loop.call_later(self._idle_timeout_s, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not (self._reading_head and self._head_bytes):
            self.transport.close()  # nothing came: close as a keep-alive timeout does
            return
        # Part of a head came before the keep-alive timeout: the head deadline decides.
        left = self._header_timeout_s - self._idle_timeout_s
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._head_timeout)
        else:
            self._head_timeout()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        body = error_body(
            f"The request head did not arrive within {self._header_timeout_s:g} s.",
            "invalid_request_error",
            code="request_timeout",
        )
        self._reject(408, body)

    # Reading

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            seen = self._head_bytes + len(data)
            if seen > self._max_head_bytes:
                self._feed_bounded(data)
                return
            self._head_bytes = seen
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)

    def _feed_bounded(self, data: bytes) -> None:
        """Feed only as much of `data` as the head budget allows; 431 if the head is still open."""
        if self._lingering:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head_bytes + LINGER_BYTES:
                self.transport.close()
            return
        room = self._max_head_bytes - self._head_bytes
        self._head_bytes = self._max_head_bytes
        if room > 0 and not self._feed(memoryview(data)[:room]):
            return
        if self._reading_head and self._head_bytes == self._max_head_bytes:
            body = error_body(
                f"The request head is larger than {self._max_head_bytes} bytes.",
                "invalid_request_error",
                code="request_header_too_large",
            )
            self._reject(431, body)
            return
        # The head ended inside the budget: the rest is body or the next request.
        self.data_received(data[room:])

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse `data`; False when the connection is done with HTTP/1.1."""
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)
            return False
        return True

    def _parse_failed(self, exc: Exception) -> None:
        # uvicorn's handling, plus the answers to requests that break a limit.
        if isinstance(exc, httptools.HttpParserUpgrade):
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        elif self._refusal is not None:
            self._reject(*self._refusal)
        else:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("The request is not valid HTTP/1.1.")

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answers in text/plain; `msg` is fixed here, never the parser's text.
        self._reject(400, error_body(msg, "invalid_request_error", code="invalid_http_request"))

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self._max_line_bytes:
            message = f"The request target is longer than {self._max_line_bytes} bytes."
            self._refusal = (414, error_body(message, "invalid_request_error", code="uri_too_long"))
            raise _Refused(message)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self._max_line_bytes:
            message = f"A request header is larger than {self._max_line_bytes} bytes."
            body = error_body(message, "invalid_request_error", code="request_header_too_large")
            self._refusal = (431, body)
            raise _Refused(message)
        if len(self.headers) >= MAX_HEADERS:  # uvicorn starts a new list for each request
            message = f"The request has more than {MAX_HEADERS} headers."
            self._refusal = (431, error_body(message, "invalid_request_error", code="too_many_headers"))
            raise _Refused(message)
        # uvicorn's on_header, inlined: this runs for every header of every request.
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    # The per-request methods below call the base class by name rather than through
    # super() and inline the timer calls: they run for every request.

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._idle.pop(self, None)
        HttpToolsProtocol.on_headers_complete(self)

    def on_message_complete(self) -> None:
        # The next bytes begin the next request's head.
        self._reading_head = True
        self._head_bytes = 0
        if self.cycle is not None:
            # The handler need not time its body read (uvicorn types the scope as a TypedDict).
            self.cycle.scope[BODY_COMPLETE] = True  # type: ignore[literal-required]
        HttpToolsProtocol.on_message_complete(self)

    def on_response_complete(self) -> None:
        # uvicorn's, with the head timer in place of its keep-alive timer.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        if self._deferred is not None:
            self._reject(*self._deferred)
            return
        self._idle[self] = None
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self._idle_timeout_s, self._idle_timeout)

    # Writing

    def _reject(self, status: int, body: bytes, extra_headers: bytes = b"") -> None:
        """Answer with an OpenAI-shaped error outside any request cycle, then close.

        While earlier pipelined requests are answered, the answer waits for theirs.
        """
        self._cancel_head_timer()
        self._idle.pop(self, None)
        cycle = self.cycle
        waiting = cycle is not None and not cycle.response_complete  # an answer is being written
        if waiting and cycle.more_body:
            # The refused request is the newest one: its body did not parse.
            if self.pipeline and self.pipeline[0][0] is cycle:
                self.pipeline.popleft()  # not started; an earlier answer is still being written
            elif cycle.response_started:
                self.transport.close()
                return
            else:
                cycle.disconnected = True  # its app sees a disconnect; its writes are dropped
                cycle.message_event.set()
                waiting = False
        if waiting:
            # Answer after the earlier requests; the parser has stopped, so drop input.
            self._deferred = (status, body, extra_headers)
            self._lingering = self._reading_head = True
            self._head_bytes = self._max_head_bytes
            return
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            extra_headers,
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closing with unread input would reset the connection, and the client could lose
        # the answer; instead end our side and drop what still arrives (`_feed_bounded`).
        self.transport.write_eof()
        self._lingering = self._reading_head = True
        self._head_bytes = self._max_head_bytes
        self._head_timer = self.loop.call_later(LINGER_S, self.transport.close)
