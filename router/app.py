"""Assembles the gateway: routes, error handlers, `/metrics`, and the lifespan that owns clients."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from classifiers import Scorer, load_scorer
from router import __version__
from router.auth import check_token
from router.config import Config, config_hash, load_config
from router.dashboard import add_dashboard
from router.endpoints import BY_PATH, FORMATS, WireFormat
from router.endpoints.messages import CountTokensFormat, CountTokensRequest
from router.errors import GatewayError, error_body
from router.gateway import Gateway
from router.logs import configure as configure_logs
from router.logs import event
from router.metrics import MULTIPROC_ENV, Metrics, exposition
from router.proxy import CLIENT_GONE, error_response, handle_completion, read_request
from router.records import Recorder
from router.reload import Reloader, ReloadError
from router.routing import REASONS
from router.server import DISCONNECT_HOOK
from router.store import open_store

__all__ = ["create_app"]

log = logging.getLogger("triage")

# A teacher probe result is reused this long, so readiness checks from a
# load balancer do not become upstream traffic.
_READY_CACHE_S = 2.0
# Allocations between young-generation collections (Python's default: 700).
GC_YOUNG_THRESHOLD = 20_000
# With workers, how often each one adds its counts to the shared metric files: a scrape
# answered by one worker may show the others' last second of requests only at the next.
SAMPLE_EVERY_S = 1.0


# OpenAPI declaration of the error envelope, so generated clients and schema
# fuzzers know what an error response looks like.
_ERROR: dict[str, Any] = {
    "description": "OpenAI error envelope",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type", "param", "code"],
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "integer", "null"]},
                        },
                    }
                },
            }
        }
    },
}


# The same for Anthropic's envelope, on the Messages endpoints.
_ANTHROPIC_ERROR: dict[str, Any] = {
    "description": "Anthropic error envelope",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["type", "error"],
                "properties": {
                    "type": {"type": "string", "enum": ["error"]},
                    "error": {
                        "type": "object",
                        "required": ["type", "message"],
                        "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            }
        }
    },
}

_REF = "#/components/schemas/{model}"


def _body_schema(model: type[Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF)
    schema.pop("$defs", None)  # moved to components/schemas by _with_components
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


def _with_components(app: FastAPI, models: tuple[type[Any], ...]) -> None:
    """Put the request models' nested definitions where their `$ref`s point."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                components.update(model.model_json_schema(ref_template=_REF).get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class TriageApp(FastAPI):
    """FastAPI, with the model endpoints (`router.endpoints.BY_PATH`) served without the middleware stack.

    They are the hot path, and handle_completion already turns every expected failure
    into an error in the client's format, so the generic layers (routing, dependency
    solving, exception middleware) only cost time there: about a fifth of the gateway's
    CPU per request. Everything else, and the OpenAPI description of these, stays with FastAPI.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            fmt = BY_PATH.get(scope["path"])
            if fmt is not None:
                scope["app"] = self
                watch = _DisconnectWatch(scope, receive)
                try:
                    response = await handle_completion(Request(scope, watch.receive), fmt)
                except asyncio.CancelledError:
                    if not watch.fired:
                        raise
                    # The client left: its upstream work is cancelled, and nobody is there
                    # to answer. Let this task finish normally.
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    return
                except Exception:
                    # Nothing has been sent yet: answer with the OpenAI envelope, not a bare 500.
                    log.exception("unhandled error on %s", scope["path"])
                    response = Response(
                        fmt.error_body(GatewayError("The gateway hit an internal error.")),
                        500,
                        media_type="application/json",
                    )
                finally:
                    watch.stop()
                try:
                    await response(scope, receive, send)
                except asyncio.CancelledError:
                    if not watch.fired:  # the client left just as the answer was ready
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                return
        await super().__call__(scope, receive, send)


class _DisconnectWatch:
    """Cancels a completion handler when its client disconnects before the response starts.

    Without this, a client that gives up (its own timeout, a closed tab) leaves the
    student request running to its read timeout, and a quality or failure fallback
    then asks, and pays, the teacher for an answer nobody reads. Once the request
    body has been read, the watch is armed; the server's protocol
    (`router.server.GatewayProtocol`) calls it from `connection_lost` through the
    scope, so a request costs no task and no extra wake-up. A streaming response
    listens for the disconnect itself (Starlette's StreamingResponse).
    """

    __slots__ = ("_receive", "_scope", "_task", "armed", "fired")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._scope = scope
        self._receive = receive
        self._task = asyncio.current_task()
        self.armed = False
        self.fired = False
        scope[DISCONNECT_HOOK] = self

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.armed = True
        return message

    def __call__(self) -> None:
        """The connection is gone (called by the protocol)."""
        if not self.armed or self.fired:
            return
        self.fired = True
        self._scope[CLIENT_GONE] = True
        if self._task is not None:
            self._task.cancel()

    def stop(self) -> None:
        """The handler is done: disarm, and take the hook out of the scope. The scope and the
        watch refer to each other; left in place, every request's scope, task and exchange
        would wait for the cycle collector instead of going when the request ends."""
        self.armed = False
        self._scope.pop(DISCONNECT_HOOK, None)


def create_app(
    config: Config,
    *,
    scorer: Scorer | None = None,
    registry: CollectorRegistry | None = None,
    config_hash: str = "unknown",
    config_path: Path | None = None,
) -> FastAPI:
    """Build the ASGI app; upstream clients open in lifespan and close on shutdown.

    `config_path` is the file a reload (SIGHUP or POST /admin/reload) reads again.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    metrics.precreate([m.name for m in config.models], REASONS)
    metrics.build_info.labels(__version__, config_hash).set(1)
    for m in config.models:
        metrics.model_info.labels(m.name, m.role).set(1)
    for code in ("400", "401", "403", "404", "408", "413", "429", "499", "503"):
        metrics.rejected.labels(code)
    if scorer is None:
        scorer = load_scorer(config.classifier.kind, config.classifier.path)
    # One per process, across reloads: the recent requests and the sinks records go to.
    recorder = Recorder()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Modules, config and the classifier's arrays live as long as the process: frozen out
        # of the collector's sight, full collections no longer walk them. The gateway (pools,
        # breakers) is built after, so one retired by a reload can still be collected.
        gc.collect()
        gc.freeze()
        # A request allocates a few hundred short-lived objects, nearly all freed by reference
        # counting; at the default threshold (700) the young generation was collected every
        # couple of requests for almost nothing. Cycles still go within GC_YOUNG_THRESHOLD.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        app.state.gateway = Gateway(config, scorer, metrics, recorder)
        # The traffic store lives as long as the process: a reload keeps it, and its queue.
        store = open_store(config, metrics)
        if store is not None:
            recorder.sinks.append(store)
            recorder.capture_labelled = config.capture.enabled and config.capture.labelled
        _log_start(config)
        app.state.ready_at = 0.0
        reloader = Reloader(app, config_path, metrics)
        app.state.reloader = reloader
        loop = asyncio.get_running_loop()
        hup = _install_sighup(loop, reloader)
        sampler = loop.create_task(_sample_levels(metrics)) if os.environ.get(MULTIPROC_ENV) else None
        try:
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
                metrics.sample()  # this worker's last counts, before its files are all that remain
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await reloader.aclose()
            await app.state.gateway.aclose()
            if store is not None:
                # Last: the requests and shadow comparisons above have all left their records.
                recorder.sinks.remove(store)
                await asyncio.to_thread(store.close)
                if sampler is not None:
                    metrics.sample()  # the store's final counts

    app = TriageApp(
        title="Triage",
        version=__version__,
        description="OpenAI-compatible gateway that routes requests to distilled students or the teacher.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )

    app.state.recorder = recorder
    add_dashboard(app, metrics, recorder)
    for fmt in FORMATS.values():
        _add_model_route(app, fmt)
    app.add_api_route(
        _COUNT_TOKENS.path,
        count_tokens,
        methods=["POST"],
        openapi_extra=_body_schema(CountTokensRequest),
        responses={"4XX": _ANTHROPIC_ERROR, "5XX": _ANTHROPIC_ERROR},
        summary=_COUNT_TOKENS.summary,
    )

    @app.get(
        "/v1/models",
        summary="List the routing alias and the configured models",
        responses={401: _ERROR, 500: _ERROR},
    )
    async def list_models(request: Request) -> JSONResponse:
        gw: Gateway = request.app.state.gateway
        gw.auth.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        return JSONResponse(_models_body(gw.config))

    @app.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="Readiness: config loaded and a teacher endpoint reachable")
    async def readyz(request: Request) -> JSONResponse:
        gw: Gateway = request.app.state.gateway
        now = time.monotonic()
        if now - request.app.state.ready_at > _READY_CACHE_S:
            if await gw.pools[gw.teacher.name].probe():
                request.app.state.ready_at = now
            else:
                return JSONResponse(
                    {"status": "unavailable", "reason": "no teacher endpoint is reachable"}, 503
                )
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        check_token(gw.auth.metrics_token, request.headers.get("authorization"))
        metrics.sample()  # with workers, the exposition reads files, not this registry
        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/admin/reload",
        summary="Reload config.yaml (when admin.reload_endpoint is on)",
        responses={400: _ERROR, 401: _ERROR, 404: _ERROR, 500: _ERROR},
    )
    async def admin_reload(request: Request) -> JSONResponse:
        gw: Gateway = request.app.state.gateway
        if not gw.config.admin.reload_endpoint:
            raise StarletteHTTPException(404, "Not Found")
        check_token(gw.auth.admin_token, request.headers.get("authorization"))
        try:
            new = await request.app.state.reloader.reload()
        except ReloadError as exc:
            return JSONResponse(
                {
                    "error": {
                        "message": str(exc),
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_config",
                    }
                },
                400,
            )
        return JSONResponse({"status": "reloaded", "models": [m.name for m in new.models]})

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        metrics.rejected.labels(str(exc.status_code)).inc()
        return Response(exc.body(), exc.status_code, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return Response(
            error_body(str(exc.detail), type_),
            exc.status_code,
            headers=exc.headers,
            media_type="application/json",
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        if isinstance(exc, asyncio.CancelledError):  # pragma: no cover - not routed here
            raise exc
        # The message stays generic: exception text can carry paths or upstream detail.
        log.exception("unhandled error on %s", request.url.path)
        return Response(
            error_body("The gateway hit an internal error.", "internal_error"),
            500,
            media_type="application/json",
        )

    _with_components(app, (*(f.request_model for f in FORMATS.values()), CountTokensRequest))
    return app


def _add_model_route(app: FastAPI, fmt: WireFormat) -> None:
    """Describe one model endpoint in the OpenAPI document (TriageApp serves it before routing)."""

    async def endpoint(request: Request) -> Response:
        return await handle_completion(request, fmt)

    error = _ERROR if fmt.openai_errors else _ANTHROPIC_ERROR
    app.add_api_route(
        fmt.path,
        endpoint,
        methods=["POST"],
        openapi_extra=_body_schema(fmt.request_model),
        responses={"4XX": error, "5XX": error},
        summary=fmt.summary,
        name=f"create_{fmt.name}",
    )


_COUNT_TOKENS = CountTokensFormat()


async def count_tokens(request: Request) -> Response:
    """POST /v1/messages/count_tokens: the gateway's own estimate (the one routing uses);
    no upstream is asked."""
    gw: Gateway = request.app.state.gateway
    try:
        _, payload = await read_request(request, _COUNT_TOKENS, gw)
        prompt = _COUNT_TOKENS.prompt(payload)
    except GatewayError as exc:
        return error_response(exc, _COUNT_TOKENS, {})
    return JSONResponse({"input_tokens": gw.policy.estimate_tokens(prompt.chars, prompt.images)})


def _log_start(config: Config) -> None:
    """One line naming what this gateway serves, how it scores and who may call it."""
    auth = config.auth
    mode = ("keys" if auth.keys_env or auth.keys_file else "open") + (
        "" if auth.admin_token_env is None else "+admin_token"
    )
    classifier = config.classifier.kind + (
        f" {config.classifier.path.name}" if config.classifier.path is not None else ""
    )
    event(
        log,
        logging.INFO,
        "gateway started",
        version=__version__,
        teacher=config.teacher.name,
        students=",".join(f"{m.name}<{m.max_score:g}" for m in config.students) or None,
        classifier=classifier,
        auth=mode,
        alias=config.routing.alias,
        max_inflight=config.server.max_inflight_requests,
    )


def app_from_env() -> FastAPI:
    """App factory for `triage serve --workers N`: each worker loads the config named in env."""
    path = Path(os.environ["TRIAGE_CONFIG"])
    config = load_config(path)
    fmt = os.environ.get("TRIAGE_LOG_FORMAT", config.server.log_format)
    configure_logs("json" if fmt == "json" else "plain", os.environ.get("TRIAGE_LOG_LEVEL", "info"))
    if not config.server.access_log:
        logging.getLogger("triage.access").setLevel(logging.WARNING)
    return create_app(config, config_hash=config_hash(path), config_path=path)


def _models_body(config: Config) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "triage"}
            for name in [config.routing.alias, *(m.name for m in config.models)]
        ],
    }


async def _sample_levels(metrics: Metrics) -> None:
    """With workers, the serving worker exports every worker's files: keep this one's current."""
    while True:
        metrics.sample()
        await asyncio.sleep(SAMPLE_EVERY_S)


def _install_sighup(loop: asyncio.AbstractEventLoop, reloader: Reloader) -> bool:
    """Reload on SIGHUP; only possible in the main thread (not when embedded in tests)."""

    try:
        loop.add_signal_handler(signal.SIGHUP, reloader.reload_in_background)
    except (ValueError, RuntimeError, NotImplementedError):
        return False
    return True
