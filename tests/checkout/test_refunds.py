"""Refunds end to end: fans buy through the real API, ask for their money back, operators
decide (API and CLI), the refund worker pays back through the mock provider and returns the
tickets to stock through the inventory actor.

Over real HTTP, PostgreSQL and Redis, with the mock payment provider and ``waitroom workers``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from tests.admission.support import create_event, join, wait_for
from tests.checkout.test_checkout import Fan
from tests.harness import ADMIN_TOKEN, ServerThread, cleanup, fresh_settings, run_cli
from tests.queue_support import fan_headers
from tests.test_errors import assert_error
from waitroom.core.settings import Settings


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, provider: ServerThread
) -> Iterator[Settings]:
    """The checkout stack's settings; a refund in doubt is looked up after 1 s."""
    value = fresh_settings(
        tmp_path_factory.mktemp("refunds-run"), admission_loop=True, payment_url=provider.url
    )
    value = msgspec.structs.replace(value, payment_timeout_s=1.0, payment_reconcile_delay_s=1.0)
    try:
        yield value
    finally:
        cleanup(value)


def sql(settings: Settings, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement on the run's database."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


class Order(msgspec.Struct):
    event_id: str
    fan: Any
    order_id: str
    codes: list[str]


def buy(client: httpx.Client, admin: httpx.Client, quantity: int = 2, **event: Any) -> Order:
    """A new event and one fan's paid order of ``quantity`` tickets (1000 EUR cents each)."""
    event_id = create_event(admin, rate=50, prefix="rf", **event)
    return buy_in(client, event_id, quantity)


def buy_in(client: httpx.Client, event_id: str, quantity: int) -> Order:
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    reserved = fan.reserve(quantity=quantity)
    assert reserved.status_code == 201, reserved.text
    hold = reserved.json()
    assert fan.confirm(hold["id"]).status_code == 202
    paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    return Order(event_id, fan, paid["order_id"], [t["code"] for t in paid["tickets"]])


def policy(
    admin: httpx.Client, event_id: str, *tiers: tuple[int, int], approval: bool = False
) -> None:
    body = {
        "tiers": [{"until_days_before": d, "percent": p} for d, p in tiers],
        "requires_approval": approval,
    }
    response = admin.put(f"/v1/admin/events/{event_id}/refund-policy", json=body)
    assert response.status_code == 200, response.text


def starts_in(settings: Settings, event_id: str, days: float) -> None:
    sql(
        settings,
        "UPDATE events SET starts_at = now() + make_interval(secs => $2) WHERE id = $1",
        event_id,
        days * 86_400,
    )


def ask(
    order: Order, tickets: list[str] | None = None, key: str | None = None, **extra: Any
) -> httpx.Response:
    headers = fan_headers(order.fan.token)
    if key is not None:
        headers["Idempotency-Key"] = key
    body = extra.pop("body", None if tickets is None else {"tickets": tickets})
    fan_client: httpx.Client = order.fan.client
    return fan_client.post(
        f"/v1/orders/{order.order_id}/refunds",
        headers=headers,
        **({"json": body} if body is not None else {}),
        **extra,
    )


def refunds_of(order: Order) -> list[dict[str, Any]]:
    response = order.fan.client.get(
        f"/v1/orders/{order.order_id}/refunds", headers=fan_headers(order.fan.token)
    )
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def wait_refund(order: Order, refund_id: str, done: Callable[[dict[str, Any]], bool]) -> Any:
    def check() -> dict[str, Any] | None:
        refund = next(r for r in refunds_of(order) if r["id"] == refund_id)
        return refund if done(refund) else None

    return wait_for(check, 30)


def stock(settings: Settings, event_id: str) -> tuple[int, int, int]:
    row = sql(
        settings, "SELECT held, sold, quantity FROM ticket_types WHERE event_id = $1", event_id
    )[0]
    assert row["held"] + row["sold"] <= row["quantity"]
    return row["held"], row["sold"], row["quantity"]


def provider_stats(provider: ServerThread) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{provider.url}/v1/stats").json()
    return stats


def checkin(server: ServerThread, code: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/checkin",
        json={"ticket": code},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )


# --- the whole flow -------------------------------------------------------------------------


def test_a_full_refund_pays_back_voids_the_tickets_and_puts_them_on_sale_again(
    client: httpx.Client,
    admin: httpx.Client,
    settings: Settings,
    server: ServerThread,
    provider: ServerThread,
) -> None:
    event_id = create_event(admin, rate=50, quantity=2, prefix="rf")
    order = buy_in(client, event_id, 2)
    assert stock(settings, event_id) == (0, 2, 2)  # sold out
    policy(admin, event_id, (30, 100), (7, 50))
    starts_in(settings, event_id, 60)

    asked = ask(order)  # no body: every ticket of the order
    assert asked.status_code == 202, asked.text
    refund = asked.json()
    assert refund["state"] == "approved" and refund["percent"] == 100
    assert refund["amount_minor"] == 2000 and refund["currency"] == "EUR"
    assert sorted(refund["tickets"]) == sorted(order.codes)
    # Voided at once, in the request's transaction: the door refuses them from now on.
    for code in order.codes:
        assert_error(checkin(server, code), 409, "ticket_voided")

    done = wait_refund(order, refund["id"], lambda r: r["state"] == "succeeded")
    assert done["stock_returned"] and done["provider_ref"].startswith("re_")
    assert provider_stats(provider)["refunded_minor_by_reference"][order.order_id] == 2000
    # The two tickets are on sale again: sold went down in PostgreSQL, and the next fan
    # gets both of them through the actor.
    assert stock(settings, event_id) == (0, 0, 2)
    other = Fan(client, event_id)
    other.wait_for_pass()
    assert other.reserve(quantity=2).status_code == 201
    assert stock(settings, event_id) == (2, 0, 2)

    history = [
        r["kind"]
        for r in sql(
            settings,
            "SELECT kind FROM order_events WHERE order_id = $1 ORDER BY id",
            order.order_id,
        )
    ]
    assert history[-3:] == ["refund.requested", "refund.approved", "refund.succeeded"]
    actions = [
        r["action"]
        for r in sql(
            settings,
            "SELECT action FROM audit_log WHERE event_id = $1 AND action LIKE 'refund.%' ORDER BY id",
            event_id,
        )
    ]
    assert actions == ["refund.policy", "refund.request", "refund.approve", "refund.succeed"]
    (message,) = sql(
        settings,
        "SELECT payload::text FROM outbox WHERE event_id = $1 AND topic = 'order.refunded'",
        event_id,
    )
    assert json.loads(message["payload"]) == {
        "order_id": order.order_id,
        "refund_id": refund["id"],
        "amount_minor": 2000,
        "currency": "EUR",
    }
    # Nothing is left to refund.
    assert_error(ask(order), 409, "nothing_to_refund")
    assert_error(ask(order, [order.codes[0]]), 409, "ticket_already_refunded")


def test_partial_refunds_follow_the_tier_of_the_time_left_and_are_idempotent(
    client: httpx.Client,
    admin: httpx.Client,
    settings: Settings,
    server: ServerThread,
    provider: ServerThread,
) -> None:
    order = buy(client, admin, quantity=3)
    policy(admin, order.event_id, (30, 100), (7, 50))
    starts_in(settings, order.event_id, 10)  # between 30 and 7 days: half back

    key = uuid.uuid4().hex
    first = ask(order, [order.codes[0]], key=key)
    assert first.status_code == 202, first.text
    assert (first.json()["percent"], first.json()["amount_minor"]) == (50, 500)
    # The same request again: the same refund, nothing more.
    again = ask(order, [order.codes[0]], key=key)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    # The same key for another request is refused.
    assert_error(ask(order, [order.codes[1]], key=key), 422, "idempotency_key_reused")

    starts_in(settings, order.event_id, 40)  # now everything back
    second = ask(order, [order.codes[1]])
    assert second.status_code == 202 and second.json()["amount_minor"] == 1000
    for refund in (first.json(), second.json()):
        wait_refund(order, refund["id"], lambda r: r["state"] == "succeeded")
    assert len(refunds_of(order)) == 2
    assert provider_stats(provider)["refunded_minor_by_reference"][order.order_id] == 1500
    assert stock(settings, order.event_id)[1] == 1  # one ticket still sold
    assert checkin(server, order.codes[2]).status_code == 200

    assert_error(ask(order), 409, "nothing_to_refund")  # the last one was used
    starts_in(settings, order.event_id, 3)  # past the last tier
    assert_error(ask(order, [order.codes[2]]), 409, "refund_window_closed")


def test_refunds_close_with_the_last_tier_and_need_a_policy(
    client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    order = buy(client, admin, quantity=1)
    assert_error(ask(order), 409, "refunds_not_allowed")
    policy(admin, order.event_id, (30, 100), (7, 50))
    starts_in(settings, order.event_id, 6.9)
    assert_error(ask(order), 409, "refund_window_closed")
    starts_in(settings, order.event_id, -1)  # started
    assert_error(ask(order), 409, "refund_window_closed")
    assert refunds_of(order) == []
    assert stock(settings, order.event_id)[1] == 1


# --- operators -------------------------------------------------------------------------------


def test_an_operator_approves_and_rejects_through_the_api_and_the_cli(
    client: httpx.Client, admin: httpx.Client, settings: Settings, server: ServerThread
) -> None:
    order = buy(client, admin, quantity=3)
    cli = run_cli(settings, "refunds", "policy", order.event_id, "--tier", "30:100", "--approval")
    assert cli.returncode == 0, cli.stderr
    assert "100% until 30 days" in cli.stdout and "approves" in cli.stdout

    pending = ask(order, [order.codes[0]])
    assert pending.status_code == 202 and pending.json()["state"] == "pending_approval"
    refund_id = pending.json()["id"]
    listed = admin.get(
        "/v1/admin/refunds", params={"event_id": order.event_id, "state": "pending_approval"}
    )
    assert [r["id"] for r in listed.json()] == [refund_id]
    # Not voided while it waits: the ticket still admits, and then approval is refused.
    assert checkin(server, order.codes[0]).status_code == 200
    assert_error(admin.post(f"/v1/admin/refunds/{refund_id}/approve"), 409, "ticket_used")
    rejected = admin.post(f"/v1/admin/refunds/{refund_id}/reject", json={"reason": "used"})
    assert rejected.status_code == 200 and rejected.json()["state"] == "rejected"
    assert rejected.json()["reason"] == "used" and rejected.json()["decided_by"].startswith("admin")
    assert_error(admin.post(f"/v1/admin/refunds/{refund_id}/approve"), 409, "refund_not_pending")

    # Through the API: approved, paid back.
    second = ask(order, [order.codes[1]]).json()
    approved = admin.post(f"/v1/admin/refunds/{second['id']}/approve")
    assert approved.status_code == 200 and approved.json()["state"] in (
        "approved",
        "processing",
        "succeeded",
    )
    assert_error(checkin(server, order.codes[1]), 409, "ticket_voided")
    wait_refund(order, second["id"], lambda r: r["state"] == "succeeded")
    assert_error(admin.post(f"/v1/admin/refunds/{second['id']}/reject"), 409, "refund_not_pending")

    # Through the CLI: a rejection lets the ticket go (it may be asked for again), then an
    # approval.
    third = ask(order, [order.codes[2]]).json()
    out = run_cli(settings, "refunds", "reject", third["id"], "--reason", "duplicate")
    assert out.returncode == 0, out.stderr
    assert "rejected" in out.stdout
    fourth = ask(order, [order.codes[2]]).json()
    assert fourth["state"] == "pending_approval"
    out = run_cli(settings, "refunds", "approve", fourth["id"], "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "approved"
    wait_refund(order, fourth["id"], lambda r: r["state"] == "succeeded")
    out = run_cli(settings, "refunds", "list", "--event", order.event_id, "--json")
    states = sorted(r["state"] for r in json.loads(out.stdout))
    assert states == ["rejected", "rejected", "succeeded", "succeeded"]
    audit = [
        r["actor"]
        for r in sql(
            settings,
            "SELECT actor FROM audit_log WHERE event_id = $1 AND action = 'refund.reject' ORDER BY id",
            order.event_id,
        )
    ]
    assert audit[0].startswith("admin") and audit[1].startswith("cli:")
    assert stock(settings, order.event_id)[1] == 1
    bad = run_cli(settings, "refunds", "approve", "nope")
    assert bad.returncode == 1 and "refund" in bad.stderr
    bad = run_cli(settings, "refunds", "policy", order.event_id, "--tier", "30:150")
    assert bad.returncode == 1 and "--tier" in bad.stderr


# --- the provider misbehaving ----------------------------------------------------------------


def attempts(outcome: str) -> float:
    """``waitroom_refund_attempts_total{outcome}`` of this process (where the workers run)."""
    return REGISTRY.get_sample_value("waitroom_refund_attempts_total", {"outcome": outcome}) or 0.0


def test_provider_errors_are_retried_until_the_money_is_back(
    client: httpx.Client,
    admin: httpx.Client,
    settings: Settings,
    provider: ServerThread,
    control: Callable[..., None],
) -> None:
    order = buy(client, admin, quantity=1)
    policy(admin, order.event_id, (0, 100))
    control(refund_errors=2)
    before = {o: attempts(o) for o in ("retry", "succeeded")}
    refund = ask(order).json()
    done = wait_refund(order, refund["id"], lambda r: r["state"] == "succeeded")
    assert done["attempts"] == 3
    # The workers (in this process) count the attempts by outcome for the operators.
    assert attempts("retry") - before["retry"] == 2
    assert attempts("succeeded") - before["succeeded"] == 1
    stats = provider_stats(provider)
    assert stats["refund_attempts"][f"order-refund:{refund['id']}"] == 3
    assert stats["refunded_minor_by_reference"][order.order_id] == 1000
    kinds = [
        r["kind"]
        for r in sql(settings, "SELECT kind FROM order_events WHERE order_id = $1", order.order_id)
    ]
    assert kinds.count("refund.retry") == 2


def test_a_refund_whose_answers_hang_is_reconciled_by_asking_the_provider(
    client: httpx.Client,
    admin: httpx.Client,
    settings: Settings,
    provider: ServerThread,
    control: Callable[..., None],
) -> None:
    order = buy(client, admin, quantity=2)
    policy(admin, order.event_id, (0, 100))
    # Every request refunds (the first) or finds its refund, and its answer is lost.
    control(refund_hangs=100, hang_s=30)
    refund = ask(order).json()
    done = wait_refund(order, refund["id"], lambda r: r["state"] == "succeeded")
    assert done["reconcile"] == "found" and done["stock_returned"]
    stats = provider_stats(provider)
    # Given back once, however many requests went out.
    assert stats["refunded_minor_by_reference"][order.order_id] == 2000
    assert stats["refund_attempts"][f"order-refund:{refund['id']}"] == 3
    assert stock(settings, order.event_id)[1] == 0


# --- a refund and a check-in racing ------------------------------------------------------------


def test_a_refund_and_a_check_in_racing_each_other_leave_one_outcome(
    client: httpx.Client, admin: httpx.Client, settings: Settings, server: ServerThread
) -> None:
    event_id = create_event(admin, rate=50, quantity=20, prefix="race")
    policy(admin, event_id, (0, 100))
    orders = [buy_in(client, event_id, 4) for _ in range(3)]

    async def race(order: Order, code: str) -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            refund, door = await asyncio.gather(
                http.post(
                    f"/v1/orders/{order.order_id}/refunds",
                    json={"tickets": [code]},
                    headers=fan_headers(order.fan.token),
                ),
                http.post(
                    "/v1/checkin",
                    json={"ticket": code},
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                ),
            )
        return refund.status_code, door.status_code

    outcomes = []
    for order in orders:
        for code in order.codes:
            refund_status, door_status = asyncio.run(race(order, code))
            # Exactly one wins: refunded (and voided), or checked in.
            assert sorted((refund_status, door_status)) in ([200, 409], [202, 409]), (
                refund_status,
                door_status,
            )
            (row,) = sql(
                settings,
                "SELECT used_at IS NOT NULL AS used, voided_at IS NOT NULL AS voided,"
                " EXISTS (SELECT 1 FROM refund_tickets r WHERE r.code = t.code) AS refunded"
                " FROM tickets t WHERE code = $1",
                code,
            )
            assert (row["used"], row["voided"], row["refunded"]) == (
                (False, True, True) if refund_status == 202 else (True, False, False)
            )
            outcomes.append("refund" if refund_status == 202 else "checkin")
    assert len(outcomes) == 12


# --- bad input --------------------------------------------------------------------------------


def test_bad_requests_get_clear_errors_and_change_nothing(
    client: httpx.Client, admin: httpx.Client, settings: Settings, server: ServerThread
) -> None:
    order = buy(client, admin, quantity=2)
    policy(admin, order.event_id, (0, 100))
    headers = fan_headers(order.fan.token)
    post = order.fan.client.post
    url = f"/v1/orders/{order.order_id}/refunds"
    assert_error(
        post(f"/v1/orders/{uuid.uuid4()}/refunds", headers=headers), 404, "order_not_found"
    )
    assert_error(post("/v1/orders/not-a-uuid/refunds", headers=headers), 404, "order_not_found")
    assert_error(httpx.post(f"{server.url}{url}"), 401)
    # Someone else's order is unknown to them.
    with httpx.Client(base_url=server.url, timeout=10) as other:
        _, stranger = join(other, order.event_id)
        assert_error(other.post(url, headers=fan_headers(stranger)), 404, "order_not_found")
        assert_error(other.get(url, headers=fan_headers(stranger)), 404, "order_not_found")
    some_code = secrets.token_urlsafe(18)
    assert_error(ask(order, [some_code]), 422, "tickets_not_in_order")
    assert_error(ask(order, [order.codes[0], order.codes[0]]), 422, "duplicate_tickets")
    assert_error(ask(order, body={"tickets": []}), 422)
    assert_error(ask(order, body={"tickets": [some_code] * 101}), 422)
    assert_error(ask(order, body={"tickets": ["x"]}), 422)
    assert_error(ask(order, body={"tickets": "all"}), 422)
    assert_error(ask(order, body={"tickets": None, "amount_minor": -5}), 422)
    assert_error(ask(order, body=[1, 2]), 422)
    json_type = {**headers, "Content-Type": "application/json"}
    assert_error(post(url, headers=json_type, content=b"{nope"), 400)
    assert_error(post(url, headers=headers, content=b"{}"), 415)
    assert_error(post(url, headers={**headers, "Content-Type": "text/plain"}, content=b"{}"), 415)
    assert_error(post(url, headers={**headers, "Idempotency-Key": "a b"}), 422)
    assert_error(
        post(url, headers={**headers, "Content-Type": "application/json"}, content=b"x" * 100_000),
        413,
    )
    assert refunds_of(order) == []
    assert stock(settings, order.event_id) == (0, 2, 100)

    # Operators' side.
    assert_error(admin.post(f"/v1/admin/refunds/{uuid.uuid4()}/approve"), 404, "refund_not_found")
    assert_error(admin.post("/v1/admin/refunds/x/reject"), 404, "refund_not_found")
    assert_error(admin.get("/v1/admin/refunds", params={"state": "bogus"}), 422)
    assert_error(admin.get("/v1/admin/refunds", params={"event_id": "Bad!"}), 422)
    assert_error(admin.get("/v1/admin/refunds", params={"limit": "0"}), 422)
    assert_error(admin.get("/v1/admin/refunds", params={"limit": "²"}), 422)
    assert_error(httpx.get(f"{server.url}/v1/admin/refunds"), 401)
    put = admin.put
    assert_error(
        put(
            "/v1/admin/events/nope-nope/refund-policy",
            json={"tiers": [{"until_days_before": 1, "percent": 1}]},
        ),
        404,
        "event_not_found",
    )
    rising = {
        "tiers": [{"until_days_before": 30, "percent": 10}, {"until_days_before": 7, "percent": 90}]
    }
    assert_error(
        put(f"/v1/admin/events/{order.event_id}/refund-policy", json=rising),
        422,
        "bad_refund_policy",
    )
    assert_error(put(f"/v1/admin/events/{order.event_id}/refund-policy", json={"tiers": []}), 422)
    shown = admin.get(f"/v1/admin/events/{order.event_id}/refund-policy")
    assert shown.status_code == 200 and shown.json()["tiers"] == [
        {"until_days_before": 0, "percent": 100}
    ]


def test_a_refund_the_provider_refuses_for_good_fails_and_keeps_the_stock_off_sale(
    client: httpx.Client, admin: httpx.Client, settings: Settings, server: ServerThread
) -> None:
    order = buy(client, admin, quantity=2)
    policy(admin, order.event_id, (0, 100))
    # The whole charge was given back outside waitroom: the provider refuses any more.
    (payment,) = sql(
        settings,
        "SELECT provider_ref FROM payments WHERE order_id = $1 AND state = 'succeeded'",
        order.order_id,
    )
    whole = httpx.post(
        f"{settings.payment_url}/v1/refunds", json={"charge_id": payment["provider_ref"]}
    )
    assert whole.status_code == 201, whole.text
    refund = ask(order, [order.codes[0]]).json()
    failed = wait_refund(order, refund["id"], lambda r: r["state"] == "failed")
    assert "409" in failed["last_error"] and not failed["stock_returned"]
    assert_error(checkin(server, order.codes[0]), 409, "ticket_voided")
    assert stock(settings, order.event_id)[1] == 2
    (row,) = sql(
        settings,
        "SELECT count(*) AS n FROM audit_log WHERE event_id = $1 AND action = 'refund.fail'",
        order.event_id,
    )
    assert row["n"] == 1


def test_a_refund_left_processing_by_a_dead_worker_is_taken_over(
    client: httpx.Client, admin: httpx.Client, settings: Settings, provider: ServerThread
) -> None:
    order = buy(client, admin, quantity=1)
    policy(admin, order.event_id, (0, 100), approval=True)
    refund = ask(order).json()
    # As a worker that claimed it (attempt 1) and died an hour ago would have left it (a
    # refund waiting for approval, so that no live worker claims it first).
    sql(
        settings,
        "UPDATE refunds SET state = 'processing', attempts = 1,"
        " updated_at = now() - interval '1 hour' WHERE id = $1",
        refund["id"],
    )
    done = wait_refund(order, refund["id"], lambda r: r["state"] == "succeeded")
    assert done["attempts"] == 2
    assert provider_stats(provider)["refunded_minor_by_reference"][order.order_id] == 1000


def test_concurrent_requests_refund_a_ticket_once(
    client: httpx.Client, admin: httpx.Client, settings: Settings, server: ServerThread
) -> None:
    order = buy(client, admin, quantity=4)
    policy(admin, order.event_id, (0, 100), approval=True)  # nothing moves while we look
    url = f"/v1/orders/{order.order_id}/refunds"

    async def burst(bodies: list[dict[str, Any]], key: str | None) -> list[httpx.Response]:
        headers = fan_headers(order.fan.token)
        if key is not None:
            headers["Idempotency-Key"] = key
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            return list(
                await asyncio.gather(*(http.post(url, json=b, headers=headers) for b in bodies))
            )

    # Different requests naming the same ticket: one refund, the others refused.
    same_ticket = asyncio.run(burst([{"tickets": [order.codes[0]]}] * 6, None))
    statuses = sorted(r.status_code for r in same_ticket)
    assert statuses == [202] + [409] * 5, [r.text for r in same_ticket]
    # Retries of one request under one key, at once: one refund, every answer the same.
    retried = asyncio.run(burst([{"tickets": [order.codes[1]]}] * 6, uuid.uuid4().hex))
    assert {r.status_code for r in retried} == {202}
    assert len({r.json()["id"] for r in retried}) == 1
    assert len(refunds_of(order)) == 2
    (row,) = sql(
        settings,
        "SELECT count(*) AS n FROM refund_tickets WHERE code = ANY($1::text[])",
        order.codes[:2],
    )
    assert row["n"] == 2
