"""Long polls of a reservation whose payment is under way (``GET ...?wait=N``).

The whole stack (server, payment workers, mock provider): the request is answered when the
order is paid or the payment failed, as PostgreSQL announces it (migration 0020), not after
``N`` seconds; and at once when no payment is under way (the deadline a long poll extends:
tests/test_deadline.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.admission.support import create_event
from tests.checkout.test_checkout import Fan
from tests.queue_support import fan_headers
from tests.test_errors import assert_error


def waited(fan: Fan, hold_id: str, wait: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = fan.client.get(
        f"/v1/reservations/{hold_id}",
        params={"wait": wait},
        headers=fan_headers(fan.token),
        timeout=30,
    )
    return response, time.monotonic() - started


def paying(client: httpx.Client, admin: httpx.Client, method: str) -> tuple[Fan, str]:
    """A fan of a new event who reserved and confirmed with ``method``; the hold's id."""
    event_id = create_event(admin, rate=50, quantity=10, prefix="lp")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold_id: str = fan.reserve().json()["id"]
    assert fan.confirm(hold_id, method=method).status_code == 202
    return fan, hold_id


def test_a_long_poll_answers_as_soon_as_the_order_is_paid(
    client: httpx.Client, admin: httpx.Client, control: Callable[..., None]
) -> None:
    control(slow_ms=700)  # the provider takes 0.7 s: the request must wait for it
    fan, hold_id = paying(client, admin, "card_slow")
    response, took = waited(fan, hold_id, "15")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["order_status"] == "paid" and len(body["tickets"]) == 1, body
    assert 0.5 < took < 8, took  # when the payment settled, not after 15 s


def test_a_long_poll_answers_when_the_payment_fails(
    client: httpx.Client, admin: httpx.Client
) -> None:
    fan, hold_id = paying(client, admin, "card_declined")
    response, took = waited(fan, hold_id, "15")
    assert response.status_code == 200, response.text
    assert response.json()["payment"]["state"] == "failed", response.text
    assert took < 8, took


def test_nothing_waits_without_a_payment_under_way_and_bad_waits_are_refused(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=10, prefix="lp")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve().json()
    response, took = waited(fan, hold["id"], "10")
    assert response.status_code == 200 and response.json()["status"] == "held", response.text
    assert took < 2, took
    for bad in ("-1", "25.5", "1e9", "abc", "nan", "inf", "0x10"):
        error = assert_error(waited(fan, hold["id"], bad)[0], 422, "validation_failed")
        assert error["details"] == {"field": "wait"}, (bad, error)
    # Someone else's reservation stays unknown, waiting or not.
    other = Fan(client, event_id)
    response = client.get(
        f"/v1/reservations/{hold['id']}", params={"wait": "5"}, headers=fan_headers(other.token)
    )
    assert response.status_code == 404, response.text
