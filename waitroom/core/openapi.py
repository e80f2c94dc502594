"""The API's route table and the OpenAPI document generated from it.

Each HTTP operation is declared once as an :class:`Operation` naming its msgspec request
and response types; the app builds its Starlette routes from the same list, so the document
at ``/openapi.json`` cannot drift from what the server actually accepts and returns.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from waitroom.core.errors import ErrorBody
from waitroom.core.ids import check_path_params, forms_of

Endpoint = Callable[[Request], Awaitable[Response]]

_ERROR_TEXT = {
    400: "Malformed body",
    401: "Missing or invalid identity",
    403: "Missing, invalid or revoked queue pass",
    404: "Unknown route or id",
    409: "Conflict (sold out, per-fan limit, already confirmed)",
    410: "Expired hold or pass",
    413: "Body too large",
    415: "Body is not JSON",
    422: "Validation failed",
    429: "Rate limited; see Retry-After",
    503: "A dependency is unavailable; see Retry-After",
}


@dataclass(frozen=True)
class Operation:
    """One HTTP operation of the public contract."""

    method: str
    path: str
    endpoint: Endpoint
    summary: str
    response: Any = None
    request: Any = None
    status: int = 200
    errors: Sequence[int] = ()
    tags: Sequence[str] = ()
    #: "admin" (bearer admin token), "pass" (X-Queue-Pass), "visitor" or None.
    auth: str | None = None
    parameters: Sequence[dict[str, Any]] = field(default_factory=tuple)
    content_type: str = "application/json"


def _path_params(path: str) -> list[dict[str, Any]]:
    # The same forms the server checks (guarded), so a client or a fuzzer knows them.
    return [
        {"name": form.name, "in": "path", "required": True, "schema": form.schema()}
        for form in forms_of(path)
    ]


def guarded(op: Operation) -> Endpoint:
    """``op``'s endpoint behind the check of its path parameters' documented forms.

    An id of the wrong form is answered 404 before the handler runs, so no handler can hand
    a hostile id to Redis or PostgreSQL (see :mod:`waitroom.core.ids`). Building the guard
    raises ``LookupError`` for a parameter without a documented form.
    """
    forms = forms_of(op.path)
    endpoint = op.endpoint
    if not forms:
        return endpoint

    async def guard(request: Request) -> Response:
        check_path_params(forms, request.path_params)
        return await endpoint(request)

    guard.__name__ = endpoint.__name__
    guard.__doc__ = endpoint.__doc__
    return guard


def build_document(operations: Sequence[Operation], *, title: str, version: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document describing ``operations``."""
    types: list[Any] = [ErrorBody]
    for op in operations:
        for t in (op.request, op.response):
            # By identity, as schema_of is keyed: two equal aliases (list[X] written in two
            # modules) are two objects.
            if t is not None and not any(t is known for known in types):
                types.append(t)
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema_of = dict(zip(map(id, types), schemas, strict=True))
    error_ref = schema_of[id(ErrorBody)]

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        doc_path = re.sub(r"{([^}:]+):[^}]*}", r"{\1}", op.path)
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.endpoint.__name__,
            "tags": list(op.tags),
        }
        params = _path_params(op.path) + list(op.parameters)
        if params:
            entry["parameters"] = params
        if op.request is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of[id(op.request)]}},
            }
        ok: dict[str, Any] = {"description": "OK"}
        if op.response is not None:
            ok["content"] = {op.content_type: {"schema": schema_of[id(op.response)]}}
        elif op.content_type != "application/json":
            ok["content"] = {op.content_type: {"schema": {"type": "string"}}}
        responses: dict[str, Any] = {str(op.status): ok}
        codes = set(op.errors)
        if "{" in op.path:
            codes.add(404)  # an id not of its documented form (see guarded)
        if op.request is not None:
            codes |= {400, 413, 415, 422}
        if op.auth == "admin":
            # 429: failed admin logins are throttled per address, in Redis (hence 503 too).
            codes |= {401, 429, 503}
        for code in sorted(codes):
            responses[str(code)] = {
                "description": _ERROR_TEXT.get(code, "Error"),
                "content": {"application/json": {"schema": error_ref}},
            }
        entry["responses"] = responses
        if op.auth == "admin":
            entry["security"] = [{"admin": []}]
        elif op.auth == "pass":
            entry["security"] = [{"queuePass": []}]
        paths.setdefault(doc_path, {})[op.method.lower()] = entry

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer"},
                "queuePass": {"type": "apiKey", "in": "header", "name": "X-Queue-Pass"},
                "visitor": {"type": "http", "scheme": "bearer"},
            },
        },
    }
