"""Path parameters are checked against their documented form on every route, over real HTTP.

A hostile id (a NUL byte, a newline after a valid id, a megabyte, a '}' that would move a
Redis key out of its slot, unicode, '..') gets the documented 404, never a 500, and never
reaches Redis or PostgreSQL; the OpenAPI document publishes the same forms.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest

from tests.admission.support import create_event, join
from tests.queue_support import fan_headers
from tests.test_errors import ADMIN, assert_error
from waitroom.core import ids
from waitroom.core.openapi import Operation, guarded

#: (method, route template) of every HTTP route with a path parameter.
ROUTES = [
    ("GET", "/v1/events/{event_id}"),
    ("POST", "/v1/events/{event_id}/queue"),
    ("GET", "/v1/events/{event_id}/queue/me"),
    ("DELETE", "/v1/events/{event_id}/queue/me"),
    ("GET", "/v1/events/{event_id}/lottery"),
    ("POST", "/v1/events/{event_id}/reservations"),
    ("GET", "/v1/admin/events/{event_id}"),
    ("GET", "/v1/admin/events/{event_id}/stats"),
    ("GET", "/v1/admin/events/{event_id}/admission"),
    ("PATCH", "/v1/admin/events/{event_id}/admission"),
    ("GET", "/v1/reservations/{reservation_id}"),
    ("POST", "/v1/reservations/{reservation_id}/confirm"),
    ("DELETE", "/v1/reservations/{reservation_id}"),
    ("POST", "/v1/admin/passes/{jti}/revoke"),
]

#: Percent-encoded ids that must never be taken for an id.
HOSTILE = [
    "%00",
    "a%00b",
    "%0A",
    "x" * 300,
    "A" * 5000,
    "%C3%A9v%C3%A9nement",
    "%F0%9F%8E%AB",
    "%FF",
    "%7Bevt%7D",
    "a%20b",
    "%2e%2e",
    "evt%5c..",
    "'%3B%20DROP%20TABLE%20holds%3B%20--",
]


def _with_newline(value: str) -> str:
    # A valid id plus a newline: `$` in a Python regex matched this (the 500s of before).
    return value + "%0A"


@pytest.fixture
def fan(client: httpx.Client) -> dict[str, str]:
    """Headers of a real visitor, so that the fans' routes get past identity checks."""
    with httpx.Client(base_url=str(client.base_url), headers=ADMIN) as admin:
        event_id = create_event(admin, prefix="ids")
    _, token = join(client, event_id)
    return {**ADMIN, **fan_headers(token), "X-Queue-Pass": "x.y.z"}


def _hostile_ids(name: str, event_id: str) -> list[str]:
    valid = {
        "event_id": event_id,
        "reservation_id": str(uuid.uuid4()),
        "jti": "abcDEF123_-xyz",
    }[name]
    return [*HOSTILE, _with_newline(valid), valid + "%00", valid + "%7D", valid * 12]


def test_every_route_answers_a_hostile_id_with_the_documented_404(
    client: httpx.Client, fan: dict[str, str]
) -> None:
    with httpx.Client(base_url=str(client.base_url), headers=ADMIN) as admin:
        event_id = create_event(admin, prefix="ids")
    expected = {form.name: form.code for form in ids.PATH_PARAMS.values()}
    for method, template in ROUTES:
        (name,) = re.findall(r"{(\w+)}", template)
        for bad in _hostile_ids(name, event_id):
            path = template.replace("{" + name + "}", bad)
            response = client.request(method, path, headers=fan, json={})
            if response.status_code == 404 and response.json()["error"]["code"] == (
                "route_not_found"
            ):
                continue  # '..' or an encoded '/' made it another path: still no 500
            error = assert_error(response, 404, expected[name])
            # The id is not echoed back: it may be a megabyte, or anything at all.
            assert error["details"] == {"parameter": name}, (method, path, error)


def test_the_ids_that_gave_500_before_now_give_404(
    client: httpx.Client, fan: dict[str, str]
) -> None:
    # A NUL byte reached PostgreSQL (invalid byte sequence), a trailing newline passed a
    # `$`-anchored check and broke uuid.UUID: both were 500s.
    with httpx.Client(base_url=str(client.base_url), headers=ADMIN) as admin:
        event_id = create_event(admin, prefix="ids")
    assert_error(client.get(f"/v1/events/{event_id}%00"), 404, "event_not_found")
    assert_error(client.get("/v1/admin/events/%00/stats", headers=ADMIN), 404, "event_not_found")
    assert_error(client.post("/v1/admin/passes/a%00b/revoke", headers=ADMIN), 404, "pass_not_found")
    hold = str(uuid.uuid4())
    assert_error(client.get(f"/v1/reservations/{hold}%0A", headers=fan), 404, "hold_not_found")
    # Well-formed ids that name nothing answer the very same way.
    assert_error(client.get("/v1/events/no-such-event"), 404, "event_not_found")
    assert_error(client.get(f"/v1/reservations/{hold}", headers=fan), 404, "hold_not_found")


def test_nul_characters_in_a_json_body_are_a_422_naming_the_field(client: httpx.Client) -> None:
    for field, body in (
        ("name", '{"name": "a\\u0000b", "ticket_types": []}'),
        (
            "venue",
            '{"name": "n", "venue": "\\u0000", "ticket_types": [{"name": "ga",'
            ' "quantity": 1, "price_minor": 1, "currency": "EUR"}]}',
        ),
    ):
        response = client.post(
            "/v1/admin/events",
            content=body.encode(),
            headers={**ADMIN, "Content-Type": "application/json"},
        )
        if field == "name":
            # min_length fails first on an empty list of ticket types: any 422 will do,
            # as long as it is not a 500.
            assert_error(response, 422)
        else:
            error = assert_error(response, 422, "nul_character")
            assert error["details"] == {"field": field}


def test_an_event_id_with_a_trailing_newline_is_refused_at_creation(client: httpx.Client) -> None:
    body = {
        "id": "evt-newline\n",
        "name": "n",
        "ticket_types": [{"name": "ga\n", "quantity": 1, "price_minor": 1, "currency": "EUR"}],
    }
    error = assert_error(client.post("/v1/admin/events", json=body, headers=ADMIN), 422)
    assert error["details"]["field"] == "id"


def test_the_openapi_document_declares_every_path_parameters_form(client: httpx.Client) -> None:
    document: dict[str, Any] = client.get("/openapi.json").json()
    seen: set[str] = set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for param in operation.get("parameters", []):
                if param["in"] != "path":
                    continue
                form = ids.PATH_PARAMS[param["name"]]
                assert param["schema"] == form.schema(), (method, path)
                assert "404" in operation["responses"], (method, path)
                seen.add(param["name"])
    assert seen == set(ids.PATH_PARAMS)


@pytest.mark.parametrize(
    ("form", "good", "bad"),
    [
        (ids.EVENT_ID, ["a", "evt-1_x", "0" * 63], ["", "A", "-a", "a" * 64, "a\n", "a}", "é"]),
        (
            ids.RESERVATION_ID,
            [str(uuid.UUID(int=7)), uuid.UUID(int=7).hex, str(uuid.UUID(int=7)).upper()],
            ["", "x", str(uuid.UUID(int=7)) + "\n", "{" + str(uuid.UUID(int=7)) + "}"],
        ),
        (ids.PASS_JTI, ["abc", "A-_9" * 16], ["", "a.b", "a" * 65, "a\n", "a/b"]),
    ],
)
def test_each_form_accepts_its_ids_and_nothing_else(
    form: ids.IdForm, good: list[str], bad: list[str]
) -> None:
    for value in good:
        assert form.matches(value), value
        assert re.search(form.pattern, value), value  # the published pattern agrees
    for value in bad:
        assert not form.matches(value), value


def test_a_route_with_an_undocumented_path_parameter_is_refused_when_built() -> None:
    async def endpoint(request: Any) -> Any:
        raise AssertionError("never called")

    with pytest.raises(LookupError, match="seat_id"):
        guarded(Operation("GET", "/v1/seats/{seat_id}", endpoint, "a seat"))


def test_the_pages_of_an_id_not_of_the_form_are_404(client: httpx.Client) -> None:
    for path in ("/events/%00", "/events/a%0A/checkout", "/events/" + "x" * 300):
        assert_error(client.get(path), 404, "event_not_found")
    assert client.get("/events/any-event").status_code == 200
