"""Connection limits of `triage serve`: request-head size, head deadline, open connections.

Each test runs the real command in its own process, so what is measured (status lines,
closes, the server's resident memory, its open-file limit) is what a client would see.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import orjson
import pytest
import yaml

from tests.conftest import Upstreams, base_config
from tests.loopback import ServeProcess, triage_process

KEY = "sk-limits"
HEADERS = {"authorization": f"Bearer {KEY}"}
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "thanks"}]}


@contextmanager
def gateway(
    upstreams: Upstreams,
    tmp_path: Path,
    server: dict[str, Any],
    *args: str,
    nofile: tuple[int, int] | None = None,
) -> Iterator[ServeProcess]:
    """`triage serve` with client keys on, these `server:` settings and maybe a (soft, hard) `ulimit -n`."""
    raw = base_config(upstreams.urls)
    raw["server"] = server
    raw["auth"] = {"keys_env": "TRIAGE_LIMITS_KEYS"}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))

    def lower_nofile() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    env = {**os.environ, "TRIAGE_LIMITS_KEYS": f"tests:{KEY}"}
    with triage_process(cfg, *args, env=env, preexec_fn=lower_nofile) as served:
        yield served


def connect(served: ServeProcess, timeout_s: float = 5.0) -> socket.socket:
    host, port = served.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes (a reset counts as a close)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def send_head(served: ServeProcess, head: bytes) -> bytes:
    """Send a request head; return what came back before the server closed (b"" if nothing)."""
    with connect(served) as sock:
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_until_closed(sock)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def error_of(response: bytes) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
    return body


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed this idle socket (never blocks)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def sdk_chat(served: ServeProcess) -> str | None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=10)
    try:
        answer = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "thanks"}]
        )
        return answer.choices[0].message.content
    finally:
        client.close()


@pytest.fixture(scope="module")
def served(_upstream_servers: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One gateway for the head tests: default size limits, a 0.5 s head deadline."""
    with gateway(_upstream_servers, tmp_path_factory.mktemp("limits"), {"header_timeout_s": 0.5}) as gw:
        yield gw


def test_huge_header_gets_431(served: ServeProcess) -> None:
    # One 10 MB header, no key: 431 or a close, never an answer from the app.
    answer = send_head(
        served, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10_000_000 + b"\r\n\r\n"
    )
    assert answer == b"" or status_of(answer) == 431, answer[:200]


def test_unfinished_heads_do_not_grow_memory(served: ServeProcess) -> None:
    # Twenty connections each pushing 5 MB of a head that never ends: each is cut off after
    # the head budget, so the server's memory does not follow the attacker's bytes.
    before = rss_kib(served.proc.pid)
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(served)) for _ in range(20)]
        for sock in socks:
            try:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: ")
                for _ in range(80):
                    sock.sendall(b"b" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        grown_mib = (rss_kib(served.proc.pid) - before) / 1024
        assert grown_mib < 8, f"server RSS grew by {grown_mib:.1f} MiB"
        for sock in socks:
            answer = read_until_closed(sock)
            assert answer == b"" or status_of(answer) == 431, answer[:200]


def test_header_line_and_head_limits(served: ServeProcess) -> None:
    line = send_head(served, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-long: " + b"c" * 17_000 + b"\r\n\r\n")
    assert status_of(line) == 431
    assert error_of(line) == {
        "message": "A request header is larger than 16384 bytes.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_header_too_large",
    }
    many = b"".join(b"x-h%d: %s\r\n" % (i, b"d" * 1000) for i in range(70))
    total = send_head(served, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    assert status_of(total) == 431
    assert error_of(total)["message"] == "The request head is larger than 65536 bytes."
    target = send_head(served, b"GET /v1/models?q=" + b"e" * 17_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
    assert status_of(target) == 414
    # Just under both limits: four 15 kB headers make a 60 kB head, and the request is served.
    near = {f"x-near-{i}": "f" * 15_000 for i in range(4)}
    ok = httpx.post(served.url + "/v1/chat/completions", json=CHAT, headers={**HEADERS, **near})
    assert ok.status_code == 200, ok.text
    # A body in the same packets as its head is not counted as head.
    big = {**CHAT, "messages": [{"role": "user", "content": "thanks " + "g" * 300_000}]}
    assert httpx.post(served.url + "/v1/chat/completions", json=big, headers=HEADERS).status_code == 200


def test_head_deadline(served: ServeProcess) -> None:
    # A connection that never sends anything.
    with connect(served) as idle:
        started = time.monotonic()
        assert read_until_closed(idle) == b""
        idle_close_s = time.monotonic() - started
    assert 0.4 < idle_close_s < 2.0
    # Half a request line, one byte every 0.1 s: the trickle does not extend the deadline.
    with connect(served) as slow:
        started = time.monotonic()
        try:
            for byte in b"GET /v1/models HTTP/1.1\r\nhost: x\r\n":
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_until_closed(slow)
        assert time.monotonic() - started < 2.5
    assert answer == b"" or status_of(answer) == 408, answer
    # After a response the next head has the same deadline, trickle or not.
    with connect(served) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        try:
            for byte in b"GET /healthz HTTP/1.1\r\n":
                kept.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        read_until_closed(kept)
        assert time.monotonic() - started < 2.5


def test_authenticated_requests_still_work(served: ServeProcess) -> None:
    assert sdk_chat(served)
    with httpx.Client(base_url=served.url, headers=HEADERS) as client:
        for _ in range(20):  # one keep-alive connection, many requests
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert httpx.post(served.url + "/v1/chat/completions", json=CHAT).status_code == 401


def test_idle_sockets_past_the_file_limit(upstreams: Upstreams, tmp_path: Path) -> None:
    # 256 descriptors at most, three upstream pools of 200: the gateway takes its floor of 32 clients.
    with (
        gateway(upstreams, tmp_path, {"header_timeout_s": 60}, nofile=(200, 256)) as served,
        ExitStack() as stack,
    ):
        limits = Path(f"/proc/{served.proc.pid}/limits").read_text()
        assert re.search(r"^Max open files\s+256\s+256\s", limits, re.M), limits  # soft raised to hard
        idle = [stack.enter_context(connect(served)) for _ in range(300)]
        assert sdk_chat(served)
        # The longest idle sockets made room; the newest are still open.
        assert wait_for(lambda: sum(closed_by_server(s) for s in idle) >= 300 - 32, 10)
        assert not any(closed_by_server(s) for s in idle[-8:])
        assert httpx.get(served.url + "/v1/models", headers=HEADERS).status_code == 200


def test_busy_connections_refuse_newcomers(upstreams: Upstreams, tmp_path: Path) -> None:
    upstreams.small.delay_s = upstreams.large.delay_s = upstreams.teacher.delay_s = 1.5
    with gateway(upstreams, tmp_path, {"max_connections": 4}) as served:
        codes: list[int] = []

        def slow_request() -> None:
            with httpx.Client(timeout=10) as client:
                resp = client.post(served.url + "/v1/chat/completions", json=CHAT, headers=HEADERS)
                codes.append(resp.status_code)

        threads = [threading.Thread(target=slow_request) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.7)  # all four are waiting on the upstream
        with connect(served) as newcomer:
            refused = read_until_closed(newcomer)
        assert status_of(refused) == 503, refused
        assert b"\r\nretry-after: 1\r\n" in refused
        assert error_of(refused)["code"] == "overloaded"
        for thread in threads:
            thread.join()
        assert codes == [200] * 4
        assert httpx.get(served.url + "/v1/models", headers=HEADERS).status_code == 200


def test_limits_reach_every_worker(upstreams: Upstreams, tmp_path: Path) -> None:
    with gateway(upstreams, tmp_path, {"header_timeout_s": 0.5}, "--workers", "2") as served:
        for _ in range(4):  # new connections, spread over both workers
            answer = send_head(
                served, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-l: " + b"h" * 20_000 + b"\r\n\r\n"
            )
            assert status_of(answer) == 431
            with connect(served) as idle:
                started = time.monotonic()
                assert read_until_closed(idle) == b""
                assert time.monotonic() - started < 2.0
        assert httpx.post(served.url + "/v1/chat/completions", json=CHAT, headers=HEADERS).status_code == 200


def responses_of(received: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split what one connection received into (status, headers, body), using content-length."""
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        length = int(headers[b"content-length"])
        answers.append((status_of(status_line), headers, rest[:length]))
        received = rest[length:]
    return answers


INVALID_HTTP = {
    "error": {
        "message": "The request is not valid HTTP/1.1.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_http_request",
    }
}
POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        POST + b"content-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        POST + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        POST + b"transfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n folded\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: a\x7fb\r\n\r\n",
        b"G@T /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\nhost: x\n\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n",
    ],
    ids=[
        "two-lengths",
        "length-and-chunked",
        "bad-chunk",
        "obs-fold",
        "nul",
        "del",
        "method",
        "bare-lf",
        "tls",
    ],
)
def test_malformed_http_gets_json_400(served: ServeProcess, request_bytes: bytes) -> None:
    [(status, headers, body)] = responses_of(send_head(served, request_bytes))
    assert status == 400
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    assert orjson.loads(body) == INVALID_HTTP


@pytest.mark.parametrize(
    "broken",
    [
        b"garbage\r\n\r\n",
        POST + b"transfer-encoding: chunked\r\n\r\nzz\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"x-a: 1\r\n" * 200 + b"\r\n",
    ],
    ids=["garbage", "bad-chunk", "too-many-headers"],
)
def test_pipelined_answers_come_before_the_refusal(served: ServeProcess, broken: bytes) -> None:
    # Two good requests in one packet with a broken one: both are answered, then the refusal.
    ok = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    answers = responses_of(send_head(served, ok + ok + broken))
    assert [status for status, _, _ in answers] == [200, 200, 431 if b"x-a" in broken else 400]
    assert answers[-1][1][b"content-type"] == b"application/json"


def test_header_count_limit(served: ServeProcess) -> None:
    many = b"".join(b"x-h%d: 1\r\n" % i for i in range(200))
    [(status, headers, body)] = responses_of(
        send_head(served, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    )
    assert status == 431
    assert headers[b"content-type"] == b"application/json"
    assert orjson.loads(body)["error"] == {
        "message": "The request has more than 128 headers.",
        "type": "invalid_request_error",
        "param": None,
        "code": "too_many_headers",
    }
    # A hundred headers (and the client's own) are served.
    hundred = {f"x-h{i}": "1" for i in range(100)}
    ok = httpx.post(served.url + "/v1/chat/completions", json=CHAT, headers={**HEADERS, **hundred})
    assert ok.status_code == 200, ok.text
