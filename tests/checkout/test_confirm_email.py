"""Over HTTP: the fan's e-mail address on confirm is validated and becomes the order's."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx

from tests.admission.support import create_event
from tests.checkout.test_checkout import Fan
from tests.test_errors import assert_error
from waitroom.core.settings import Settings


async def notifications(settings: Settings, hold_id: str) -> tuple[Any, list[asyncpg.Record]]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        email = await conn.fetchval("SELECT email FROM orders WHERE hold_id = $1", hold_id)
        rows = await conn.fetch(
            "SELECT n.kind, n.recipient, n.state FROM notifications n"
            " JOIN orders o ON o.id = n.order_id WHERE o.hold_id = $1",
            hold_id,
        )
        return email, rows
    finally:
        await conn.close()


def confirm(fan: Fan, hold_id: str, body: dict[str, Any]) -> httpx.Response:
    return fan.client.post(
        f"/v1/reservations/{hold_id}/confirm",
        json=body,
        headers=fan.headers(uuid.uuid4().hex),
    )


def test_a_fan_who_confirms_with_an_email_address_gets_the_confirmation_queued_for_it(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, quantity=5, prefix="ml")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve().json()
    for bad in ("not-an-address", "fan@example.com\r\nBcc: all@example.com", "x" * 300):
        refused = confirm(fan, hold["id"], {"payment_method": "card", "email": bad})
        assert_error(refused, 422)
    assert asyncio.run(notifications(settings, hold["id"])) == (None, [])

    accepted = confirm(fan, hold["id"], {"payment_method": "card", "email": "fan@example.com"})
    assert accepted.status_code == 202, accepted.text
    fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    email, rows = asyncio.run(notifications(settings, hold["id"]))
    assert email == "fan@example.com"
    assert [(r["kind"], r["recipient"], r["state"]) for r in rows] == [
        ("order_confirmed", "fan@example.com", "pending")
    ]
