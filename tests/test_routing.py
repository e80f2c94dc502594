"""The indexed router picks the route Starlette's router picks, for any path and method.

Property-tested against the app's real routes: paths made of the templates' own segments (so
that most of them match something), ids, junk, empty segments, trailing slashes and newlines.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import Scope

from waitroom.app import create_app
from waitroom.core.routing import IndexedRouter
from waitroom.core.settings import load_settings

APP = create_app(load_settings())
ROUTES: list[BaseRoute] = list(APP.router.routes)
SEGMENTS = sorted(
    {s for r in ROUTES for s in getattr(r, "path", "").split("/") if s and "{" not in s}
)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _first_match(routes: list[BaseRoute], scope: Scope) -> tuple[str, BaseRoute | None]:
    """What Starlette's router does: the first full match, else the first partial one."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return "full", route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return ("partial", partial) if partial is not None else ("none", None)


def _linear(scope: Scope) -> tuple[str, BaseRoute | None]:
    return _first_match(ROUTES, scope)


def _indexed(router: IndexedRouter, scope: Scope) -> tuple[str, BaseRoute | None]:
    candidates = router.candidates(scope)
    return _first_match(ROUTES if candidates is None else candidates, scope)


segment = st.one_of(
    st.sampled_from(SEGMENTS),
    st.sampled_from(["evt-1", "3f2a", "", "x.svg", "qr.svg", "%2F", "a b", "\n", "evt\n"]),
    st.text(max_size=8),
)


@settings(max_examples=3000, deadline=None)
@given(
    segments=st.lists(segment, max_size=7),
    slash=st.booleans(),
    method=st.sampled_from(METHODS),
    kind=st.sampled_from(["http", "websocket"]),
)
def test_the_index_finds_the_route_starlette_finds(
    segments: list[str], slash: bool, method: str, kind: str
) -> None:
    path = "/" + "/".join(segments) + ("/" if slash and segments else "")
    scope: Scope = {"type": kind, "path": path, "root_path": "", "method": method}
    router = IndexedRouter(ROUTES)
    assert _indexed(router, scope) == _linear(scope)


@pytest.mark.parametrize(
    ("path", "method", "expected"),
    [
        ("/v1/events/evt-1/reservations", "POST", ("full", "/v1/events/{event_id}/reservations")),
        ("/v1/events/evt-1/reservations", "GET", ("partial", "/v1/events/{event_id}/reservations")),
        ("/v1/events/evt-1", "GET", ("full", "/v1/events/{event_id}")),
        ("/healthz\n", "GET", ("full", "/healthz")),  # Starlette's "$" before a newline
        ("/v1/events//reservations", "POST", ("none", None)),
        ("/static/app.js", "GET", ("full", "/static/{name}")),
    ],
)
def test_known_paths(path: str, method: str, expected: tuple[str, str | None]) -> None:
    scope: Scope = {"type": "http", "path": path, "root_path": "", "method": method}
    outcome, route = _indexed(IndexedRouter(ROUTES), scope)
    assert (outcome, getattr(route, "path", None)) == expected


def test_routes_added_later_are_found() -> None:
    router = IndexedRouter(list(ROUTES))
    scope: Scope = {"type": "http", "path": "/late/one", "root_path": "", "method": "GET"}
    assert router.candidates(scope) == []

    async def late(request: object) -> None:  # never called
        raise AssertionError

    router.routes.append(Route("/late/{name}", late))
    assert [getattr(r, "path", None) for r in router.candidates(scope) or []] == ["/late/{name}"]


def test_the_reservation_route_is_found_without_trying_the_routes_before_it() -> None:
    scope: Scope = {
        "type": "http",
        "path": "/v1/events/evt-1/reservations",
        "root_path": "",
        "method": "POST",
    }
    router = IndexedRouter(ROUTES)
    assert len(router.candidates(scope) or []) == 1
    assert ROUTES.index(_linear(scope)[1]) >= 10  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_the_app_answers_through_the_indexed_router() -> None:
    assert isinstance(APP.router, IndexedRouter) and isinstance(APP.router, Router)
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/healthz")).status_code == 200
        missing = await client.get("/no/such/route")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "route_not_found"
        wrong = await client.get("/v1/events/evt-1/reservations")
        assert wrong.status_code == 405
