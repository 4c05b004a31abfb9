"""The built-in dashboard at /ui: a static page that polls /ui/api/summary.

The page, its script and its stylesheet ship in the package (`router/dashboard/static`) and
are served as they are: no build step, no third-party code, charts drawn as SVG by the script.

Access: a browser cannot add a bearer header to a page load, so the page itself holds no data
and is served to anyone; the JSON it polls is what is guarded. When `auth.metrics_token_env` or
`auth.admin_token_env` is set, /ui/api/summary needs `Authorization: Bearer <token>` with either
token; the page asks for it when the endpoint answers 401, keeps it in the tab's sessionStorage
and sends it as that header on every poll. With neither token set the endpoint is open, as
/metrics is.
"""

from __future__ import annotations

import hmac
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from router.auth import Authenticator
from router.dashboard.decisions import DecisionSource, RecentDecisions
from router.dashboard.summary import Aggregates, SummaryBody, aggregates
from router.errors import AuthError, InvalidRequest
from router.metrics import Metrics
from router.records import Recorder

__all__ = ["DecisionSource", "RecentDecisions", "add_dashboard", "check_viewer"]

# Rows of the decisions table per request: the page asks for DEFAULT_ROWS, paging asks for more.
DEFAULT_ROWS = 100
MAX_ROWS = 1000
MAX_OFFSET = 10_000_000
_ASSETS = {
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
}
# The page loads only its own script and style and talks only to this gateway.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def check_viewer(auth: Authenticator, authorization: str | None) -> None:
    """Let the request through with the metrics or the admin token (or when neither is set)."""
    tokens = [t for t in (auth.metrics_token, auth.admin_token) if t is not None]
    if not tokens:
        return
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    if scheme.lower() == "bearer" and given:
        # Every token is compared, so the time taken does not say which one nearly matched.
        matches = [hmac.compare_digest(given.encode(), t.encode()) for t in tokens]
        if any(matches):
            return
    raise AuthError("The dashboard needs the metrics or the admin token as a bearer token.")


def _int_param(request: Request, name: str, default: int, high: int) -> int:
    given = request.query_params.getlist(name)
    if not given:
        return default
    if len(given) > 1:
        raise InvalidRequest(f"`{name}` is given more than once.", param=name)
    raw = given[0]
    # Digits only: int() would also take signs, spaces, underscores and non-ASCII digits.
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidRequest(f"`{name}` must be a whole number.", param=name)
    if len(raw) > len(str(high)) or int(raw) > high:
        raise InvalidRequest(f"`{name}` must be between 0 and {high}.", param=name)
    return int(raw)


def add_dashboard(app: FastAPI, metrics: Metrics, recorder: Recorder) -> None:
    """Serve /ui, its assets and /ui/api/summary; the table reads `app.state.decisions`."""
    static = files(__name__) / "static"
    page = (static / "index.html").read_bytes()
    assets = {name: (static / name).read_bytes() for name in _ASSETS}
    app.state.decisions = RecentDecisions(recorder)

    def read_totals() -> dict[str, Any]:
        metrics.sample()  # as /metrics does: with workers, the numbers come from the files
        return aggregates(metrics.registry)

    app.state.summary_aggregates = totals = Aggregates(read_totals)
    encoded = SummaryBody()

    @app.get("/ui", include_in_schema=False)
    async def ui_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_asset(name: str) -> Response:
        media_type = _ASSETS.get(name)
        if media_type is None:
            raise StarletteHTTPException(404, "Not Found")
        return Response(assets[name], media_type=media_type, headers=_HEADERS)

    @app.get("/ui/api/summary", summary="Dashboard numbers (metrics totals and recent decisions)")
    async def ui_summary(request: Request) -> Response:
        check_viewer(request.app.state.gateway.auth, request.headers.get("authorization"))
        offset = _int_param(request, "offset", 0, MAX_OFFSET)
        limit = _int_param(request, "limit", DEFAULT_ROWS, MAX_ROWS)
        body = encoded.body(totals.get(), request.app.state.decisions, offset, limit)
        return Response(body, media_type="application/json", headers={"cache-control": "no-store"})
