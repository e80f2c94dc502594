"""Helpers of the admission tests: events through the admin API, fans joining over HTTP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from tests.queue_support import fan_headers, new_ip
from waitroom.line import challenge


def create_event(
    admin: httpx.Client,
    *,
    rate: float = 10.0,
    max_active: int = 1000,
    paused: bool = False,
    quantity: int = 100,
    prefix: str = "a",
    **room: Any,
) -> str:
    """A new event through the admin API (sale open now unless ``opens_at`` is given)."""
    event_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
    spec = {"rate_per_second": rate, "max_active": max_active, **room}
    response = admin.post(
        "/v1/admin/events",
        json={
            "id": event_id,
            "name": "Admission test",
            "ticket_types": [
                {"name": "ga", "quantity": quantity, "price_minor": 1000, "currency": "EUR"}
            ],
            "room": spec,
        },
    )
    assert response.status_code == 201, response.text
    if paused:
        patch = admin.patch(f"/v1/admin/events/{event_id}/admission", json={"paused": True})
        assert patch.status_code == 200, patch.text
    return event_id


def join(client: httpx.Client, event_id: str) -> tuple[str, str]:
    """A new visitor joins the line: (fan id, visitor token)."""
    client.cookies.clear()  # a new visitor, not the one the last join's cookie names
    headers = {"X-Forwarded-For": new_ip()}
    response = client.post(f"/v1/events/{event_id}/queue", headers=headers)
    if response.status_code == 403 and response.json()["error"]["code"] == "challenge_required":
        # A server with WAITROOM_CHALLENGE on: pay for the place as a client must.
        offer = client.post(f"/v1/events/{event_id}/challenge", headers=headers)
        assert offer.status_code == 200, offer.text
        headers[challenge.HEADER] = challenge.solve(offer.json())
        response = client.post(f"/v1/events/{event_id}/queue", headers=headers)
    assert response.status_code == 201, response.text
    client.cookies.clear()
    body = response.json()
    return body["fan_id"], body["visitor_token"]


def me(client: httpx.Client, event_id: str, token: str) -> dict[str, Any]:
    """``GET .../queue/me`` for the fan with ``token``."""
    response = client.get(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)
