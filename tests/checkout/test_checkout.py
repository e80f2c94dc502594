"""The whole path over real HTTP: join → admitted with a pass → reserve → pay → tickets.

A real server (admission loops on, in a database of this module's own), the real payment
workers and the mock payment provider as its own HTTP service.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import asyncpg
import httpx

from tests.admission.support import create_event, join, me, wait_for
from tests.queue_support import fan_headers
from tests.test_errors import assert_error
from waitroom.core.settings import Settings


class Fan:
    """One fan's view of the sale: identity token and, once admitted, the queue pass."""

    def __init__(self, client: httpx.Client, event_id: str) -> None:
        self.client = client
        self.event_id = event_id
        self.fan_id, self.token = join(client, event_id)
        self.queue_pass = ""

    def wait_for_pass(self) -> str:
        def admitted() -> str | None:
            body = me(self.client, self.event_id, self.token)
            return body["queue_pass"] if body["status"] == "admitted" else None

        self.queue_pass = wait_for(admitted, timeout=15)
        return self.queue_pass

    def headers(self, key: str | None = None, **extra: str) -> dict[str, str]:
        headers = {**fan_headers(self.token), "X-Queue-Pass": self.queue_pass, **extra}
        if key is not None:
            headers["Idempotency-Key"] = key
        return headers

    def reserve(
        self, ticket_type: str = "ga", quantity: int = 1, key: str | None = None
    ) -> httpx.Response:
        return self.client.post(
            f"/v1/events/{self.event_id}/reservations",
            json={"ticket_type": ticket_type, "quantity": quantity},
            headers=self.headers(key or uuid.uuid4().hex),
        )

    def confirm(
        self, reservation_id: str, method: str = "card", key: str | None = None
    ) -> httpx.Response:
        return self.client.post(
            f"/v1/reservations/{reservation_id}/confirm",
            json={"payment_method": method},
            headers=self.headers(key or uuid.uuid4().hex),
        )

    def reservation(self, reservation_id: str) -> dict[str, Any]:
        response = self.client.get(
            f"/v1/reservations/{reservation_id}", headers=fan_headers(self.token)
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_until(self, reservation_id: str, done: Any) -> dict[str, Any]:
        """Poll the reservation until ``done(reservation)`` holds; that reservation."""

        def check() -> dict[str, Any] | None:
            current = self.reservation(reservation_id)
            return current if done(current) else None

        result: dict[str, Any] = wait_for(check, 20)
        return result


def test_a_fan_joins_is_admitted_reserves_pays_and_gets_tickets(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=10, prefix="co")
    fan = Fan(client, event_id)
    fan.wait_for_pass()

    reserved = fan.reserve(quantity=2)
    assert reserved.status_code == 201, reserved.text
    hold = reserved.json()
    assert (hold["status"], hold["quantity"], hold["amount_minor"], hold["currency"]) == (
        "held",
        2,
        2000,
        "EUR",
    )

    confirmed = fan.confirm(hold["id"])
    assert confirmed.status_code == 202, confirmed.text
    assert confirmed.json()["payment"]["state"] in ("pending", "processing", "succeeded")

    paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    assert paid["status"] == "paid" and paid["payment"]["state"] == "succeeded"
    codes = [t["code"] for t in paid["tickets"]]
    assert len(codes) == 2 and len(set(codes)) == 2 and all(len(c) >= 16 for c in codes)

    orders = client.get("/v1/orders", headers=fan_headers(fan.token)).json()
    assert [o["reservation_id"] for o in orders] == [hold["id"]]
    assert sorted(t["code"] for t in orders[0]["tickets"]) == sorted(codes)

    stats = admin.get(f"/v1/admin/events/{event_id}/stats").json()
    assert (stats["sold"], stats["held"], stats["available"]) == (2, 0, 8)

    # The pass is spent once its order is paid: it cannot reserve again.
    # The pass's hold cycle is over at once (403 pass_used from the inventory); once the
    # outbox has spent it (a moment later), the gate itself refuses it as spent.
    def refused() -> str | None:
        response = fan.reserve()
        return response.json()["error"]["code"] if response.status_code == 403 else None

    wait_for(lambda: refused() == "pass_spent", timeout=5)
    assert_error(fan.reserve(), 403, "pass_spent")


def test_a_declined_payment_can_be_retried_while_the_hold_lasts(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=5, prefix="co")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve().json()
    assert fan.confirm(hold["id"], method="card_declined").status_code == 202
    failed = fan.wait_until(
        hold["id"], lambda r: r["payment"] and r["payment"]["state"] == "failed"
    )
    assert failed["status"] == "held" and failed["payment"]["last_error"] == "declined"
    assert fan.confirm(hold["id"], method="card").status_code == 202
    paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    assert len(paid["tickets"]) == 1


async def payments_of(settings: Settings, order_id: str) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM payments WHERE order_id = $1", order_id
        )
    finally:
        await conn.close()
    return count


def test_confirming_twice_at_once_charges_once(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, quantity=5, prefix="co")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve(quantity=3).json()
    answers: list[int] = []

    def confirm() -> None:
        answers.append(fan.confirm(hold["id"]).status_code)

    threads = [threading.Thread(target=confirm) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each confirm answers with the payment under way (202), or, once it has completed,
    # that the hold is paid already (409): never a second payment.
    assert 202 in answers and set(answers) <= {202, 409}, answers
    paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    assert len(paid["tickets"]) == 3
    assert asyncio.run(payments_of(settings, paid["order_id"])) == 1
    assert_error(fan.confirm(hold["id"]), 409, "hold_already_confirmed")


def test_a_confirm_sent_again_with_its_key_answers_with_the_payment_it_started(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    """A confirm whose answer was lost (or came back 503 after the payment was queued) is
    sent again with its key: once paid, it is answered with that paid reservation (202, as
    the first time), not 409 "already paid", which a fan's page showed as an error."""
    event_id = create_event(admin, rate=50, quantity=5, prefix="co")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve().json()
    key = uuid.uuid4().hex
    first = fan.confirm(hold["id"], key=key)
    assert first.status_code == 202, first.text
    paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    again = fan.confirm(hold["id"], key=key)
    assert again.status_code == 202, again.text
    body = again.json()
    assert body["order_status"] == "paid" and body["order_id"] == paid["order_id"]
    assert body["payment"]["id"] == first.json()["payment"]["id"]
    assert asyncio.run(payments_of(settings, paid["order_id"])) == 1
    # Another confirm (another key) of the paid reservation is refused, as before.
    assert_error(fan.confirm(hold["id"]), 409, "hold_already_confirmed")


def test_a_failed_payment_confirmed_again_with_its_key_is_not_charged_again(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, quantity=5, prefix="co")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve().json()
    key = uuid.uuid4().hex
    assert fan.confirm(hold["id"], method="card_declined", key=key).status_code == 202
    failed = fan.wait_until(
        hold["id"], lambda r: r["payment"] and r["payment"]["state"] == "failed"
    )
    # The same confirm again: the failed attempt, not a new one.
    again = fan.confirm(hold["id"], method="card_declined", key=key)
    assert again.status_code == 202, again.text
    assert again.json()["payment"]["id"] == failed["payment"]["id"]
    assert again.json()["payment"]["state"] == "failed"
    assert asyncio.run(payments_of(settings, failed["order_id"])) == 1
    # A new confirm (a new key) is a new attempt.
    assert fan.confirm(hold["id"], method="card").status_code == 202
    paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    assert asyncio.run(payments_of(settings, paid["order_id"])) == 2


def test_cancelling_releases_the_tickets_and_the_fans_slot(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=2, prefix="co")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve(quantity=2).json()
    assert admin.get(f"/v1/admin/events/{event_id}/stats").json()["held"] == 2
    cancelled = client.delete(
        f"/v1/reservations/{hold['id']}", headers=fan.headers(uuid.uuid4().hex)
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"id": hold["id"], "status": "cancelled"}
    assert admin.get(f"/v1/admin/events/{event_id}/stats").json()["held"] == 0
    assert fan.reservation(hold["id"])["status"] == "cancelled"
    assert_error(fan.confirm(hold["id"]), 409, "hold_cancelled")


def test_checkout_refuses_bad_input_with_the_documented_errors(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=3, prefix="co")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    url = f"/v1/events/{event_id}/reservations"

    no_pass = {**fan_headers(fan.token)}
    assert_error(
        client.post(url, json={"ticket_type": "ga", "quantity": 1}, headers=no_pass),
        403,
        "pass_missing",
    )
    assert_error(
        client.post(
            url, json={"ticket_type": "ga", "quantity": 1}, headers={"X-Queue-Pass": fan.queue_pass}
        ),
        401,
    )
    for quantity in (0, -1, 10**9, "2", None, 1.5):
        response = client.post(
            url, json={"ticket_type": "ga", "quantity": quantity}, headers=fan.headers("k")
        )
        error = assert_error(response, 422)
        assert error["details"]["field"] == "quantity"
    assert_error(
        client.post(
            url, content=b"{nope", headers={**fan.headers("k"), "Content-Type": "application/json"}
        ),
        400,
    )
    assert_error(
        client.post(
            url,
            content=b"x" * 100_000,
            headers={**fan.headers("k"), "Content-Type": "application/json"},
        ),
        413,
    )
    assert_error(fan.reserve(ticket_type="platinum"), 422, "unknown_ticket_type")
    assert_error(fan.reserve(quantity=5), 409, "fan_limit")
    assert_error(
        client.post(
            url,
            json={"ticket_type": "ga", "quantity": 1},
            headers=fan.headers("bad key with spaces"),
        ),
        422,
    )

    # The same Idempotency-Key returns the first result; reused for another request, refused.
    first = fan.reserve(quantity=1, key="same-key")
    again = fan.reserve(quantity=1, key="same-key")
    assert (
        first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
    )
    assert_error(fan.reserve(quantity=2, key="same-key"), 422, "idempotency_key_reused")

    other = Fan(client, event_id)
    other.wait_for_pass()
    assert_error(other.confirm(first.json()["id"]), 404, "hold_not_found")  # not theirs
    for bad_id in ("not-a-uuid", str(uuid.uuid4()), "'; DROP TABLE holds; --"):
        response = client.get(f"/v1/reservations/{bad_id}", headers=fan_headers(fan.token))
        assert_error(response, 404, "hold_not_found")
    held = other.reserve(quantity=3)  # 2 of 3 left, and the third only held
    assert_error(held, 409, "tickets_held")
    assert held.headers["retry-after"] == "5"
