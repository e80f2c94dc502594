"""Bad input gets the documented error body and a 4xx, never a 500; the 500 path is tidy too."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import Response

from tests.harness import ADMIN_TOKEN, ServerThread, running
from waitroom.core.openapi import Operation
from waitroom.core.settings import Settings

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {**ADMIN, "Content-Type": "application/json"}
GOOD_EVENT: dict[str, Any] = {
    "name": "Errors",
    "ticket_types": [{"name": "ga", "quantity": 10, "price_minor": 100, "currency": "EUR"}],
}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


def test_malformed_json_is_400(client: httpx.Client) -> None:
    for body in (b"{", b"not json", b'{"name": "x",}', b"\xff\xfe", b"   "):
        assert_error(client.post("/v1/admin/events", content=body, headers=JSON), 400)


def test_a_body_that_is_not_json_is_415(client: httpx.Client) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = client.post(
            "/v1/admin/events",
            content=b'{"name": "x"}',
            headers={**ADMIN, "Content-Type": content_type},
        )
        assert_error(response, 415, "unsupported_media_type")


def test_json_of_the_wrong_shape_is_422_naming_the_field(client: httpx.Client) -> None:
    cases = [
        ({**GOOD_EVENT, "name": 5}, "name"),
        (
            {**GOOD_EVENT, "ticket_types": [{**GOOD_EVENT["ticket_types"][0], "quantity": -1}]},
            "ticket_types[0].quantity",
        ),
        (
            {**GOOD_EVENT, "ticket_types": [{**GOOD_EVENT["ticket_types"][0], "quantity": 10**12}]},
            "ticket_types[0].quantity",
        ),
        (
            {**GOOD_EVENT, "ticket_types": [{**GOOD_EVENT["ticket_types"][0], "quantity": "10"}]},
            "ticket_types[0].quantity",
        ),
        ({**GOOD_EVENT, "ticket_types": []}, "ticket_types"),
        ({**GOOD_EVENT, "room": {"rate_per_second": 0}}, "room.rate_per_second"),
        ({**GOOD_EVENT, "room": {"queue_mode": "random"}}, "room.queue_mode"),
        ({**GOOD_EVENT, "room": {"opens_at": "2030-01-01T00:00:00"}}, "room.opens_at"),
        ({**GOOD_EVENT, "unexpected": 1}, "unexpected"),
        ({**GOOD_EVENT, "id": "Has Spaces"}, "id"),
    ]
    for body, field in cases:
        error = assert_error(client.post("/v1/admin/events", json=body, headers=ADMIN), 422)
        if field is not None:
            assert error["details"]["field"] == field, error
    assert_error(client.post("/v1/admin/events", json=[1, 2], headers=ADMIN), 422)


def test_an_unknown_field_is_422_naming_it_by_its_full_path(client: httpx.Client) -> None:
    ticket = GOOD_EVENT["ticket_types"][0]
    cases = [
        ({**GOOD_EVENT, "rate": 50}, "rate"),
        ({**GOOD_EVENT, "room": {"rate": 50}}, "room.rate"),
        (
            {**GOOD_EVENT, "ticket_types": [ticket, {**ticket, "name": "vip", "qty": 1}]},
            "ticket_types[1].qty",
        ),
    ]
    for body, field in cases:
        error = assert_error(client.post("/v1/admin/events", json=body, headers=ADMIN), 422)
        assert error["code"] == "validation_failed"
        assert error["details"] == {"field": field}, error
        assert f"`{field.rsplit('.', 1)[-1]}`" in error["message"]
    # The same on every route that reads a body: the operators' admission patch.
    response = client.patch("/v1/admin/events/any-event/admission", json={"rate": 5}, headers=ADMIN)
    assert assert_error(response, 422)["details"] == {"field": "rate"}


def test_a_declared_body_over_the_limit_is_413_without_being_read(server: ServerThread) -> None:
    # Declare 100 MB but send nothing: the answer must come at once, not after a read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/admin/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
            b"Content-Length: 100000000\r\n\r\n{"
        )
        started = time.monotonic()
        reply = b""
        # Headers and body may arrive in separate segments; read until the body is here.
        while b"body_too_large" not in reply and time.monotonic() - started < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        assert time.monotonic() - started < 2
    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"body_too_large"' in reply


def test_a_streamed_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(100):
            yield b"x" * 4096
        yield b'"}'

    response = client.post("/v1/admin/events", content=chunks(), headers=JSON)
    assert_error(response, 413, "body_too_large")


def test_unknown_routes_and_ids_are_404(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nothing-here"), 404, "route_not_found")
    assert_error(client.get("/v1/events/no-such-event"), 404, "event_not_found")
    assert_error(client.get("/v1/admin/events/no-such-event", headers=ADMIN), 404)
    assert_error(client.get("/v1/admin/events/no-such-event/stats", headers=ADMIN), 404)


def test_a_wrong_method_is_405(client: httpx.Client) -> None:
    assert_error(client.delete("/v1/events/x"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    ],
)
def test_the_admin_api_needs_the_admin_token(client: httpx.Client, headers: dict[str, str]) -> None:
    assert_error(client.get("/v1/admin/events", headers=headers), 401)
    assert_error(client.post("/v1/admin/events", json=GOOD_EVENT, headers=headers), 401)


def test_the_admin_api_is_closed_when_no_token_is_configured(settings: Settings) -> None:
    import msgspec

    closed = msgspec.structs.replace(settings, admin_token=None)
    with running(closed) as server:
        response = httpx.get(server.url + "/v1/admin/events", headers=ADMIN)
    assert_error(response, 401, "admin_disabled")


async def _explode(request: Request) -> Response:
    raise RuntimeError("boom")


def test_an_unexpected_exception_is_a_500_with_the_error_body(settings: Settings) -> None:
    op = Operation("GET", "/explode", _explode, "always fails")
    with running(settings, extra_operations=[op]) as server:
        response = httpx.get(server.url + "/explode", headers={"X-Request-ID": "trace-me"})
        assert httpx.get(server.url + "/healthz").status_code == 200
    error = assert_error(response, 500, "internal")
    assert error["details"] == {"request_id": "trace-me"}
    assert "boom" not in response.text  # internals are logged, not shown


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values,
        "id": json_values | st.from_regex(r"^[a-z0-9][a-z0-9_-]{0,70}$", fullmatch=True),
        "venue": json_values,
        "starts_at": json_values | st.datetimes().map(lambda d: d.isoformat() + "Z"),
        "room": st.dictionaries(
            st.sampled_from(
                [
                    "queue_mode",
                    "opens_at",
                    "rate_per_second",
                    "max_active",
                    "pass_ttl_s",
                    "hold_ttl_s",
                    "abandon_grace_s",
                    "per_fan_limit",
                ]
            ),
            json_values,
        ),
        "ticket_types": st.lists(
            st.dictionaries(
                st.sampled_from(["name", "quantity", "price_minor", "currency", "per_fan_limit"]),
                json_values | st.integers(-(2**70), 2**70),
            ),
            max_size=3,
        ),
    },
)


@hyp_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=event_like)
def test_no_known_bad_input_reaches_the_500_path(
    client: httpx.Client, body: dict[str, Any]
) -> None:
    response = client.post("/v1/admin/events", json=body, headers=ADMIN)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_error(response, response.status_code)


def test_the_docstring_of_errors_names_every_exception_of_the_tree() -> None:
    import importlib
    import pkgutil

    from waitroom.core import errors

    for package in ("waitroom", "admission", "inventory", "workers"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)

    def subclasses(cls: type[Exception]) -> list[type[Exception]]:
        found: list[type[Exception]] = []
        for sub in cls.__subclasses__():
            found += [sub, *subclasses(sub)]
        return found

    names = {c.__name__ for c in subclasses(errors.WaitroomError) if not c.__name__.startswith("_")}
    assert names >= {"ActorStopped", "Fenced", "PaymentRefused", "SchemaError"}
    assert errors.__doc__ is not None
    missing = sorted(n for n in names if f" {n} " not in errors.__doc__)
    assert missing == []
