"""Debian's chromium, headless, driven over the DevTools protocol (no browser download, no driver).

`Chromium` starts `/usr/bin/chromium --headless` with a private profile and a DevTools port
chosen by the browser, opens one tab and speaks the protocol over a WebSocket (the `websockets`
package that uvicorn[standard] already brings). Tests and bench/ui.py load the dashboard
with it, read the DOM through `evaluate`, and take screenshots.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.sync.client import ClientConnection, connect

__all__ = ["CHROMIUM", "BrowserError", "Chromium", "available"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class BrowserError(Exception):
    """The browser failed to start, or a DevTools command or page script failed."""


class Chromium:
    """One headless chromium with one tab; a context manager that stops the browser on exit."""

    def __init__(self, width: int = 1440, height: int = 1800, binary: str = CHROMIUM) -> None:
        self.width = width
        self.height = height
        self.binary = binary
        self._profile = Path(tempfile.mkdtemp(prefix="triage-chromium-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._stack = ExitStack()
        self._ids = itertools.count(1)
        self.console: list[str] = []

    def __enter__(self) -> Chromium:
        cmd = [
            self.binary,
            "--headless",
            "--no-sandbox",  # root in CI containers; the page is our own
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--remote-debugging-port=0",
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        # Its log goes to a file: an unread pipe would fill and stall the browser.
        with (self._profile / "chromium.log").open("wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            page = self._first_tab(self._devtools_port())
            self._ws = self._stack.enter_context(
                # Events pile up between commands: an unbounded queue, and no keepalive pings
                # (a full queue would leave their pongs unread and close the connection).
                connect(
                    page["webSocketDebuggerUrl"],
                    max_size=None,
                    max_queue=None,
                    ping_interval=None,
                    open_timeout=10,
                )
            )
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
            )
        except BaseException:
            self.close()
            raise
        return self

    def _devtools_port(self, timeout_s: float = 30.0) -> int:
        # chromium writes the port it bound (and the browser's WebSocket path) into the profile.
        marker = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        assert self._proc is not None
        while True:
            if marker.exists():
                first = marker.read_text().splitlines()[:1]
                if first and first[0].isdigit():
                    return int(first[0])
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = (self._profile / "chromium.log").read_text(errors="replace")
                raise BrowserError(f"chromium did not start:\n{err[-3000:]}")
            time.sleep(0.05)

    def _first_tab(self, port: int, timeout_s: float = 10.0) -> dict[str, Any]:
        # The tab for about:blank may be listed a moment after the port is written.
        deadline = time.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                targets: list[dict[str, Any]] = json.loads(resp.read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium opened no tab: {targets}")
            time.sleep(0.05)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
        """Send one DevTools command and return its result (events in between are kept or dropped)."""
        assert self._ws is not None
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout_s
        while True:
            raw = self._ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            msg = json.loads(raw)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if msg.get("method") == "Runtime.consoleAPICalled":
                args = msg["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description"))) for a in args))
            elif msg.get("method") == "Runtime.exceptionThrown":
                details = msg["params"].get("exceptionDetails", {})
                self.console.append("exception: " + json.dumps(details)[:500])

    def evaluate(self, expression: str, timeout_s: float = 30.0) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout_s,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:200]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        """Load `url` and wait until its document has loaded."""
        nav = self.call("Page.navigate", {"url": url})
        if nav.get("errorText"):
            raise BrowserError(f"{url}: {nav['errorText']}")
        self.wait_for("document.readyState === 'complete'", f"{url} to load")

    def wait_for(self, expression: str, what: str, timeout_s: float = 20.0) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s} s waiting for {what}; {self.console}")
            time.sleep(0.05)

    def screenshot(self, path: Path, full_page: bool = True) -> None:
        """Write a PNG of the tab (the whole page, or the window)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": self.width, "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", params)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Stop the browser and remove its profile."""
        self._stack.close()
        self._ws = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def available(binary: str = CHROMIUM) -> bool:
    """Whether the chromium binary is installed."""
    return Path(binary).is_file()
