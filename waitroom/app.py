"""The ASGI application: routes, error handling and the lifespan of the dependency clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from waitroom import admission_api as admission_api
from waitroom import (
    checkout_api,
    console,
    events_api,
    pages,
    queue_api,
    refunds_api,
    seats_api,
    tickets_api,
    venue_api,
)
from waitroom.core.db import MIN_STATEMENT_TIMEOUT_S
from waitroom.core.deadline import DeadlineMiddleware
from waitroom.core.errors import (
    MethodNotAllowed,
    NotFound,
    Unavailable,
    WaitroomError,
)
from waitroom.core.http import (
    JSONResponse,
    RequestContextMiddleware,
    dependency_error,
    error_response,
    internal_error_body,
)
from waitroom.core.logs import configure_logging
from waitroom.core.metrics import DEPENDENCY_ERRORS, exposition, process_started, process_stopped
from waitroom.core.openapi import Operation, build_document, guarded
from waitroom.core.routing import IndexedRouter
from waitroom.core.runtime import tune_gc
from waitroom.core.settings import Settings, load_settings
from waitroom.core.tracing import configure_tracing, flush_tracing
from waitroom.services import open_services, require_admin, services

log = logging.getLogger("waitroom.app")
VERSION = "0.1.0"


class Health(msgspec.Struct, frozen=True):
    """Body of ``/healthz`` and ``/readyz``."""

    status: str
    checks: dict[str, str] = {}


async def healthz(request: Request) -> Response:
    """The process is up (no dependency is checked)."""
    return JSONResponse(Health("ok"))


async def _check(name: str, probe: Any, timeout: float) -> tuple[str, str]:
    # The answer says only "ok", "down" or "timeout": an exception's text can name hosts,
    # users and versions, which is for the logs, not for whoever asks /readyz.
    try:
        await asyncio.wait_for(probe, timeout)
    except TimeoutError:
        log.warning("readiness check timed out", extra={"dependency": name, "timeout_s": timeout})
        return name, "timeout"
    except Exception as exc:  # any failure means "not ready"
        log.warning("readiness check failed", extra={"dependency": name, "error": repr(exc)})
        return name, "down"
    return name, "ok"


async def _detailed(request: Request) -> bool:
    """Whether this caller may see per-dependency figures: always when they are public, else
    with an operator's token (a wrong token is a 401, as on any admin route)."""
    if services(request).settings.public_metrics:
        return True
    if "authorization" not in request.headers:
        return False
    await require_admin(request)
    return True


async def readyz(request: Request) -> Response:
    """Ready when Redis and PostgreSQL both answer within the dependency timeout.

    Each dependency is "ok", "down" or "timeout"; which one failed is shown only where
    metrics are (``WAITROOM_METRICS_PUBLIC``, or with an operator's token): a load balancer
    needs the status code, not the names of what is behind it.
    """
    svc = services(request)
    timeout = svc.settings.dependency_timeout_s
    detailed = await _detailed(request)
    results = dict(
        await asyncio.gather(
            _check("redis", svc.redis.ping(), timeout),
            _check("postgresql", svc.db.fetchval("SELECT 1"), timeout),
        )
    )
    failing = sorted(name for name, outcome in results.items() if outcome != "ok")
    if failing and not detailed:
        raise Unavailable("not ready", code="not_ready", retry_after=2)
    if failing:
        raise Unavailable(
            "not ready: " + ", ".join(f"{name} ({results[name]})" for name in failing),
            code="not_ready",
            retry_after=2,
            details={"failing": failing, "checks": results},
        )
    return JSONResponse(Health("ready", results if detailed else {}))


async def metrics(request: Request) -> Response:
    """Prometheus metrics of this server: of every worker process under ``serve --workers N``
    (an operator's token unless they are public)."""
    if not services(request).settings.public_metrics:
        await require_admin(request)
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    """This API's OpenAPI document."""
    return JSONResponse(request.app.state.openapi)


SERVICE_OPERATIONS = [
    Operation("GET", "/healthz", healthz, "Liveness", response=Health, tags=("service",)),
    Operation(
        "GET",
        "/readyz",
        readyz,
        "Readiness (Redis and PostgreSQL); per dependency when metrics are public or with"
        " an operator's token",
        response=Health,
        errors=(401, 429, 503),
        tags=("service",),
    ),
    Operation(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics (an operator's token unless WAITROOM_METRICS_PUBLIC)",
        errors=(401, 429, 503),
        tags=("service",),
        content_type="text/plain",
    ),
    Operation("GET", "/openapi.json", openapi, "This document", tags=("service",)),
]


def operations() -> list[Operation]:
    """Every HTTP operation the app serves, the fans' queue routes first.

    Starlette tries routes in this order, a regular-expression match each: in a flash sale
    nearly every request is a join or a status poll, and routing one past a dozen other
    routes cost about 13 us, a few percent of a whole join.
    """
    return [
        *queue_api.OPERATIONS,
        *SERVICE_OPERATIONS,
        *events_api.OPERATIONS,
        *admission_api.OPERATIONS,
        *console.OPERATIONS,
        *checkout_api.OPERATIONS,
        *tickets_api.OPERATIONS,
        *refunds_api.OPERATIONS,
        *venue_api.OPERATIONS,
        *seats_api.OPERATIONS,
    ]


async def _on_waitroom_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WaitroomError)
    return error_response(exc)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed here"))
    if exc.status_code == 404:
        return error_response(NotFound(f"no route {request.url.path}", code="route_not_found"))
    return error_response(WaitroomError(str(exc.detail), code="http_error"))


class CatchAllMiddleware:
    """Turns any exception that escaped a handler into the documented error body.

    A dependency failure becomes 503 with Retry-After; anything else is a 500 logged with the
    request id. Sitting outside the router, it also covers errors raised while streaming.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            unavailable = dependency_error(exc)
            if unavailable is not None:
                log.warning("dependency unavailable", extra={"error": repr(exc)})
                DEPENDENCY_ERRORS.labels(unavailable.details.get("dependency", "other")).inc()
                response: Response = error_response(unavailable)
            else:
                log.exception("unexpected error", extra={"path": scope.get("path")})
                response = JSONResponse(internal_error_body(), status_code=500)
            await response(scope, receive, send)


def build_routes(ops: Sequence[Operation]) -> list[BaseRoute]:
    """Starlette routes for ``ops``, several methods on one path sharing a route."""
    by_path: dict[str, dict[str, Operation]] = {}
    for op in ops:
        # Every endpoint behind the check of its path parameters' documented forms.
        by_path.setdefault(op.path, {})[op.method] = replace(op, endpoint=guarded(op))
    routes: list[BaseRoute] = []
    for path, methods in by_path.items():
        if len(methods) == 1:
            (op,) = methods.values()
            routes.append(Route(path, op.endpoint, methods=[op.method], name=op.endpoint.__name__))
            continue

        def dispatch_for(table: dict[str, Operation]) -> Any:
            async def dispatch(request: Request) -> Response:
                op = table.get(request.method) or (
                    table.get("GET") if request.method == "HEAD" else None
                )
                if op is None:
                    raise MethodNotAllowed(f"{request.method} is not allowed here")
                return await op.endpoint(request)

            return dispatch

        routes.append(Route(path, dispatch_for(methods), methods=list(methods)))
    return routes


def create_app(
    settings: Settings,
    *,
    extra_operations: Sequence[Operation] = (),
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The waitroom ASGI app for ``settings``."""
    ops = [*operations(), *extra_operations]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        process_started()
        async with AsyncExitStack() as stack:
            stack.callback(process_stopped)  # the last thing this worker does
            stack.callback(flush_tracing)  # spans still batched (nothing with tracing off)
            app.state.services = await open_services(settings, stack)
            yield

    app = Starlette(
        routes=[
            *build_routes(ops),
            *queue_api.ROUTES,
            *seats_api.ROUTES,
            *pages.ROUTES,
            *extra_routes,
        ],
        lifespan=lifespan,
        exception_handlers={WaitroomError: _on_waitroom_error, HTTPException: _on_http_exception},
    )
    # The same routes, found by index rather than one after another (waitroom.core.routing).
    app.router = IndexedRouter(app.router.routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.openapi = build_document(ops, title="waitroom", version=VERSION)
    # Outermost first: the request id must exist before anything can fail or log.
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(DeadlineMiddleware, seconds=request_deadline_s(settings))
    app.add_middleware(RequestContextMiddleware)
    return app


def request_deadline_s(settings: Settings) -> float:
    """How long a fan's request may take before it is answered 503 ``request_timeout``: the
    longest single dependency wait (a statement or an inventory ask) and half a second, so
    that every request is answered within the dependency timeout and a second (issue 12)."""
    return max(settings.dependency_timeout_s, MIN_STATEMENT_TIMEOUT_S) + 0.5


def app_from_env() -> Starlette:
    """App factory for ``uvicorn --factory`` and multi-worker serving: settings from the env."""
    settings = load_settings()
    configure_logging(settings.log_level)
    configure_tracing("waitroom-api")  # on only with OTEL_EXPORTER_OTLP_ENDPOINT set
    tune_gc()
    return create_app(settings)
