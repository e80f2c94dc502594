"""Starlette's router, finding a request's route through an index instead of trying each route.

Starlette matches a request against its routes one after another (a regular expression and a
copy of the path's parameters each), so a route's cost grows with its place in the list: the
reservation route, the 19th of 40, took ~30 us of every checkout request to be found (~1.5 us
a route tried), a tenth of what the whole request costs. :class:`IndexedRouter` keeps the same
routes in the same order and answers exactly as Starlette's router does (the first full match,
else the first partial one, which is a 405; then the trailing-slash redirect; then 404), but
tries only the routes whose template can match the request's path: a tree of the templates'
segments, walked once per request, picks them out. A route whose template it cannot place (a
``{name:path}`` or typed parameter, a part of a segment, a mount) is tried for every request,
in its place in the order, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette._utils import get_route_path
from starlette.convertors import StringConvertor
from starlette.routing import BaseRoute, Match, Route, Router, WebSocketRoute
from starlette.types import Receive, Scope, Send

#: A template's segment that is a whole ``{name}`` parameter (any non-empty segment matches).
_PARAM = None


class _Node:
    """One segment of the templates: literal children, the parameter child, routes ending here."""

    __slots__ = ("literal", "param", "routes")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.routes: list[int] = []

    def insert(self, shape: Sequence[str | None], index: int) -> None:
        node = self
        for segment in shape:
            if segment is _PARAM:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node = node.literal.setdefault(segment, _Node())
        node.routes.append(index)

    def find(self, segments: list[str], depth: int, found: list[int]) -> None:
        if depth == len(segments):
            found.extend(self.routes)
            return
        child = self.literal.get(segments[depth])
        if child is not None:
            child.find(segments, depth + 1, found)
        if self.param is not None:
            self.param.find(segments, depth + 1, found)


def _shape(route: BaseRoute) -> list[str | None] | None:
    """The segments of ``route``'s template (None for a ``{name}`` segment), or None when the
    index cannot place it (it is then tried for every request)."""
    if not isinstance(route, Route | WebSocketRoute):
        return None
    shape: list[str | None] = []
    for segment in route.path.split("/"):
        if "{" not in segment and "}" not in segment:
            shape.append(segment)
            continue
        name = segment[1:-1]
        if not (segment.startswith("{") and segment.endswith("}") and name.isidentifier()):
            return None  # "{name:path}", "{a}-{b}", "x{a}": not a whole plain segment
        if not isinstance(route.param_convertors.get(name), StringConvertor):
            return None
        shape.append(_PARAM)
    return shape


class IndexedRouter(Router):
    """A :class:`starlette.routing.Router` that finds a request's candidate routes by index."""

    #: How many routes the index was built from (None: not built yet).
    _indexed: int | None = None
    _tree: _Node
    _always: list[int]

    def _index(self) -> None:
        tree, always = _Node(), []
        for index, route in enumerate(self.routes):
            shape = _shape(route)
            if shape is None:
                always.append(index)
            else:
                tree.insert(shape, index)
        self._tree, self._always = tree, always
        self._indexed = len(self.routes)

    def candidates(self, scope: Scope) -> list[BaseRoute] | None:
        """The routes that may match ``scope``'s path, in the router's order; None when every
        route must be tried."""
        path = get_route_path(scope)
        if path.endswith("\n"):
            # A template's "$" also matches before a final newline ("/healthz\n" is /healthz
            # to Starlette), which the segments would not: the old way, for the same answer.
            return None
        if self._indexed != len(self.routes):  # built on first use, again if routes were added
            self._index()
        found = list(self._always)
        self._tree.find(path.split("/"), 0, found)
        found.sort()
        routes = self.routes
        return [routes[i] for i in found]

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        candidates = None if scope["type"] == "lifespan" else self.candidates(scope)
        if candidates is None:
            await super().app(scope, receive, send)
            return
        if "router" not in scope:
            scope["router"] = self
        partial = None
        partial_scope: Scope = {}
        for route in candidates:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope["route"] = route
                scope.update(child_scope)
                await route.handle(scope, receive, send)
                return
            if match is Match.PARTIAL and partial is None:
                partial, partial_scope = route, child_scope
        if partial is not None:  # the path is known, the method is not: 405
            scope["route"] = partial
            scope.update(partial_scope)
            await partial.handle(scope, receive, send)
            return
        # No route: Starlette's own way on (a trailing-slash redirect, else 404). It tries
        # every route again, which only requests that match nothing pay for.
        await super().app(scope, receive, send)
