"""Checkout abuse over real HTTP: one hold cycle per pass, per-pass write limits.

The whole stack of tests/checkout/conftest.py (admission loops on, payment workers, mock
provider), with a small per-pass burst so the limit is reached in a few requests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from tests.admission.support import create_event, me, wait_for
from tests.checkout.test_checkout import Fan
from tests.harness import ServerThread, cleanup, fresh_settings
from tests.queue_support import fan_headers
from tests.test_errors import assert_error
from waitroom.core.settings import Settings

BURST = 4


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, provider: ServerThread
) -> Iterator[Settings]:
    """As the checkout conftest's, with a burst of four checkout writes per pass."""
    run_dir: Path = tmp_path_factory.mktemp("checkout-abuse-run")
    value = fresh_settings(
        run_dir,
        admission_loop=True,
        payment_url=provider.url,
        checkout_burst=BURST,
        checkout_rate_per_s=0.1,
    )
    value = msgspec.structs.replace(value, payment_timeout_s=1.0)
    try:
        yield value
    finally:
        cleanup(value)


def cancel(fan: Fan, hold_id: str) -> httpx.Response:
    return fan.client.delete(f"/v1/reservations/{hold_id}", headers=fan.headers(uuid.uuid4().hex))


def admission(admin: httpx.Client, event_id: str) -> dict[str, Any]:
    response = admin.get(f"/v1/admin/events/{event_id}/admission")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_pass_that_cancelled_its_holds_cannot_reserve_again_and_the_next_fan_gets_them(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, max_active=1, quantity=2, prefix="ab")
    first = Fan(client, event_id)
    first.wait_for_pass()
    second = Fan(client, event_id)
    hold = first.reserve(quantity=2).json()
    # One shopper at a time: the second fan waits while the first holds its pass.
    assert admission(admin, event_id)["active_passes"] == 1
    assert me(client, event_id, second.token)["status"] == "waiting"

    assert cancel(first, hold["id"]).status_code == 200
    # The cycle is over: the same pass may not lock the tickets away again...
    assert_error(first.reserve(quantity=2), 403, "pass_used")
    assert_error(first.reserve(quantity=1), 403, "pass_used")
    # ...the freed slot admits the next fan, who gets the tickets back...
    second.wait_for_pass()
    reserved = second.reserve(quantity=2)
    assert reserved.status_code == 201, reserved.text
    # ...and there never were two shoppers with max_active 1.
    assert admission(admin, event_id)["active_passes"] == 1
    assert admin.get(f"/v1/admin/events/{event_id}/stats").json()["held"] == 2


async def _shorten_holds(settings: Settings, event_id: str, seconds: int) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "UPDATE room_settings SET hold_ttl_s = $2 WHERE event_id = $1", event_id, seconds
        )
    finally:
        await conn.close()


def test_a_pass_whose_hold_expired_cannot_reserve_again(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, quantity=3, prefix="ab")
    # The API asks for at least 10 s; the schema allows 1 s so this test need not wait.
    asyncio.run(_shorten_holds(settings, event_id, 1))
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    assert fan.reserve(quantity=3).status_code == 201

    def released() -> bool:
        return bool(admin.get(f"/v1/admin/events/{event_id}/stats").json()["held"] == 0)

    wait_for(released, timeout=10)
    # Reserve, let it lapse, reserve again: not with the same pass.
    assert_error(fan.reserve(quantity=3), 403, "pass_used")
    other = Fan(client, event_id)
    other.wait_for_pass()
    assert other.reserve(quantity=3).status_code == 201


def test_checkout_writes_of_one_pass_are_rate_limited(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=50, prefix="ab")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    for _ in range(BURST):
        assert fan.reserve(quantity=1).status_code == 201
    limited = fan.reserve(quantity=1)
    error = assert_error(limited, 429, "checkout_rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1
    assert error["details"]["limit"] == BURST
    # The bucket is the pass's: another fan shops on.
    other = Fan(client, event_id)
    other.wait_for_pass()
    assert other.reserve(quantity=1).status_code == 201
    # A request without a good pass is refused before it can touch anyone's bucket.
    bogus = {**fan_headers(other.token), "X-Queue-Pass": fan.queue_pass}
    response = client.post(
        f"/v1/events/{event_id}/reservations",
        json={"ticket_type": "ga", "quantity": 1},
        headers={**bogus, "Idempotency-Key": "x"},
    )
    assert_error(response, 403)
    assert other.reserve(quantity=1).status_code == 201


def test_a_fan_reserving_twice_on_one_pass_before_cancelling_keeps_the_cycle_open(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=10, prefix="ab")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    one = fan.reserve(quantity=1).json()
    assert fan.reserve(quantity=1).status_code == 201  # a second hold on the same pass
    assert cancel(fan, one["id"]).status_code == 200
    # A hold is still live on the pass: the cycle is not over, the fan may still change it.
    assert fan.reserve(quantity=1).status_code == 201


def test_a_pass_whose_hold_expired_frees_its_admission_slot_at_once(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, max_active=1, quantity=3, prefix="ab")
    asyncio.run(_shorten_holds(settings, event_id, 1))
    first = Fan(client, event_id)
    first.wait_for_pass()
    second = Fan(client, event_id)
    assert first.reserve(quantity=3).status_code == 201
    assert me(client, event_id, second.token)["status"] == "waiting"
    # The hold lapses; the pass can no longer shop, so it stops counting against
    # max_active now, not when the pass itself expires (15 minutes by default).
    second.wait_for_pass()
    assert second.reserve(quantity=3).status_code == 201
    assert admission(admin, event_id)["active_passes"] == 1
