"""E-mail notifications end to end: real PostgreSQL, the mock provider, and a real SMTP server.

Orders are paid (or declined) by the payment pool, refunds come through the outbox, and the
mailer sends over SMTP to aiosmtpd on 127.0.0.1 (:mod:`tests.workers.smtp_server`), which
keeps every message it accepted, duplicates included; the tests parse what arrived.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from admission.passes import PassKeys
from inventory.hosting import InventoryHost
from inventory.orders import start_payment
from inventory.tickets import claims_of, sign_ticket
from tests.inventory.conftest import make_event
from tests.workers.conftest import Control, make_payments, reserve, settle
from tests.workers.smtp_server import Received, SmtpServer, parts
from waitroom.core.settings import Settings, settings_env
from workers.mailer import Mailer, lease_for, refund_handler, smtp_target
from workers.main import run_workers
from workers.notifications import ORDER_REFUNDED_TOPIC, message_id, qr_png
from workers.outbox import handle_once

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SENDER = "Waitroom <tickets@waitroom.test>"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
async def quiet_queue(pool: asyncpg.Pool[Any]) -> AsyncIterator[None]:
    """Each test sends only its own notifications: earlier tests' leftovers are put aside."""
    await pool.execute(
        "UPDATE notifications SET state = 'dead', lease_until = NULL, last_error = 'set aside'"
        " WHERE state IN ('pending', 'sending')"
    )
    yield


def make_mailer(
    pool: asyncpg.Pool[Any],
    settings: Settings,
    smtp: SmtpServer,
    *,
    url: str | None = None,
    **options: Any,
) -> Mailer:
    values: dict[str, Any] = {
        "rate_per_s": 1000.0,
        "timeout_s": 2.0,
        "base_backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "poll_s": 0.05,
    }
    values.update(options)
    return Mailer(
        pool,
        smtp_target(url or smtp.url),
        PassKeys.from_settings(settings),
        sender=SENDER,
        issuer=settings.pass_issuer,
        **values,
    )


async def drain(mailer: Mailer) -> int:
    """Send until nothing is due; how many were claimed."""
    claimed = 0
    while await mailer.send_one() != "idle":
        claimed += 1
    return claimed


async def paid_order(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    *,
    event_id: str | None = None,
    quantity: int = 2,
    email: str | None = "fan@example.com",
    method: str = "card_ok",
) -> tuple[str, str, str]:
    """An order paid (or declined, by ``method``) through the payment pool; its ids."""
    if event_id is None:
        event_id = await make_event(pool, quantity=50, per_fan=10)
        await pool.execute(
            "UPDATE events SET starts_at = now() + interval '3 days', venue = 'Main Hall'"
            " WHERE id = $1",
            event_id,
        )
    fan = f"fan-{uuid.uuid4().hex[:8]}"
    hold = await reserve(host, event_id, fan, quantity)
    async with pool.acquire() as conn:
        order_id, payment_id = await start_payment(conn, hold.id, fan, method, email=email)
    await settle(make_payments(pool, host, http), pool, payment_id)
    return event_id, order_id, payment_id


async def rows(pool: asyncpg.Pool[Any], order_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM notifications WHERE order_id = $1::uuid ORDER BY id", order_id
    )


def sent_total(kind: str) -> float:
    return REGISTRY.get_sample_value("waitroom_emails_sent_total", {"kind": kind}) or 0.0


async def test_a_paid_order_gets_one_confirmation_with_its_tickets_as_qr_codes_and_an_ics(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    event_id, order_id, _ = await paid_order(pool, host, http, quantity=2)
    (row,) = await rows(pool, order_id)
    assert row["kind"] == "order_confirmed" and row["state"] == "pending"
    assert row["recipient"] == "fan@example.com"
    before = sent_total("order_confirmed")
    mailer = make_mailer(pool, settings, smtp)
    assert await drain(mailer) == 1
    assert await drain(make_mailer(pool, settings, smtp)) == 0  # a second worker: nothing left
    (got,) = smtp.wait_for(1)
    assert got.recipients == ("fan@example.com",)
    (row,) = await rows(pool, order_id)
    assert row["state"] == "sent" and row["attempts"] == 1 and row["sent_at"] is not None
    assert got.message_id == row["message_id"]
    assert got.message_id == message_id(f"order_confirmed:{order_id}", "waitroom.test")
    assert sent_total("order_confirmed") == before + 1

    found = parts(got.message)
    assert len(found["text/plain"]) == 1 and len(found["text/html"]) == 1
    page = found["text/html"][0].get_content()
    tickets = await pool.fetch(
        "SELECT code, ticket_type, issued_at FROM tickets WHERE order_id = $1 ORDER BY issued_at, code",
        order_id,
    )
    pngs = found["image/png"]
    assert len(pngs) == len(tickets) == 2
    keys = PassKeys.from_settings(settings)
    for ticket, png in zip(tickets, pngs, strict=True):
        data = png.get_content()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert png["Content-ID"].strip("<>") in page
        token = sign_ticket(
            keys,
            claims_of(
                issuer=settings.pass_issuer,
                code=ticket["code"],
                event_id=event_id,
                ticket_type=ticket["ticket_type"],
                order_id=order_id,
                issued_at=ticket["issued_at"],
            ),
        )
        assert data == qr_png(token)  # the door scans the ticket's signed form
        assert ticket["code"] in found["text/plain"][0].get_content()
    starts = await pool.fetchval("SELECT starts_at FROM events WHERE id = $1", event_id)
    (ics,) = found["text/calendar"]
    lines = ics.get_content().replace("\r\n ", "").split("\r\n")
    assert f"DTSTART:{starts.strftime('%Y%m%dT%H%M%SZ')}" in lines
    assert "LOCATION:Main Hall" in lines


async def test_an_order_without_an_address_records_a_skipped_notification_and_sends_nothing(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    _, order_id, _ = await paid_order(pool, host, http, email=None)
    (row,) = await rows(pool, order_id)
    assert row["state"] == "skipped" and row["recipient"] is None
    assert await drain(make_mailer(pool, settings, smtp)) == 0
    assert smtp.messages() == []


async def test_a_declined_payment_sends_one_payment_failed_email(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    _, order_id, payment_id = await paid_order(pool, host, http, method="card_declined")
    (row,) = await rows(pool, order_id)
    assert row["kind"] == "payment_failed" and row["dedup_key"] == f"payment_failed:{payment_id}"
    assert await drain(make_mailer(pool, settings, smtp)) == 1
    (got,) = smtp.wait_for(1)
    assert "did not go through" in str(got.message["Subject"])
    text = parts(got.message)["text/plain"][0].get_content()
    assert "declined" in text and "image/png" not in parts(got.message)


async def test_a_refund_from_the_outbox_sends_one_refund_email_however_often_it_is_handled(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    event_id, order_id, _ = await paid_order(pool, host, http)
    await drain(make_mailer(pool, settings, smtp))  # the confirmation
    smtp.wait_for(1)
    payload = msgspec.json.encode(
        {"order_id": order_id, "refund_id": "rf_42", "amount_minor": 2000, "currency": "EUR"}
    ).decode()
    for _ in range(2):  # the refund announced twice (a writer's retry): one e-mail
        await pool.execute(
            "INSERT INTO outbox (event_id, topic, payload, handle_after) VALUES ($1, $2, $3, now())",
            event_id,
            ORDER_REFUNDED_TOPIC,
            payload,
        )
    handlers = {ORDER_REFUNDED_TOPIC: refund_handler(pool)}
    assert await handle_once(pool, handlers) == (2, 0)
    assert await handle_once(pool, handlers) == (0, 0)
    refunds = [r for r in await rows(pool, order_id) if r["kind"] == "refund_processed"]
    assert len(refunds) == 1 and refunds[0]["dedup_key"] == "refund_processed:rf_42"
    assert await drain(make_mailer(pool, settings, smtp)) == 1
    _, got = smtp.wait_for(2)
    assert "refund" in str(got.message["Subject"]).lower()
    text = parts(got.message)["text/plain"][0].get_content()
    assert "20.00 EUR" in text and "rf_42" in text


async def test_an_event_starting_soon_sends_each_paid_order_one_reminder(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    soon, order_id, _ = await paid_order(pool, host, http)
    await pool.execute(
        "UPDATE events SET starts_at = now() + interval '2 hours' WHERE id = $1", soon
    )
    later, later_order, _ = await paid_order(pool, host, http)
    await pool.execute(
        "UPDATE events SET starts_at = now() + interval '3 days' WHERE id = $1", later
    )
    _, refunded_order, _ = await paid_order(pool, host, http, event_id=soon)
    await pool.execute(
        "UPDATE tickets SET voided_at = now(), voided_by = 'test' WHERE order_id = $1",
        refunded_order,
    )
    mailer = make_mailer(pool, settings, smtp, reminder_before_s=86_400.0)
    await drain(mailer)  # the three confirmations
    smtp.wait_for(3)
    assert await mailer.remind_once() == 1  # not the order whose tickets were all voided
    assert await make_mailer(pool, settings, smtp).remind_once() == 0  # once, whoever runs it
    assert await drain(mailer) == 1
    got = smtp.wait_for(4)[3]
    assert str(got.message["Subject"]).startswith("Reminder:")
    assert got.message["X-Waitroom-Notification"] == "event_reminder"
    assert len(parts(got.message)["image/png"]) == 2
    assert [r["kind"] for r in await rows(pool, later_order)] == ["order_confirmed"]
    assert [r["kind"] for r in await rows(pool, refunded_order)] == ["order_confirmed"]
    assert [r["kind"] for r in await rows(pool, order_id)] == ["order_confirmed", "event_reminder"]


async def test_two_mailers_at_once_send_each_notification_once(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    event_id, first, _ = await paid_order(pool, host, http, quantity=1)
    orders = [first]
    for _ in range(7):
        orders.append((await paid_order(pool, host, http, event_id=event_id, quantity=1))[1])
    claimed = await asyncio.gather(
        drain(make_mailer(pool, settings, smtp)), drain(make_mailer(pool, settings, smtp))
    )
    assert sum(claimed) == 8
    await asyncio.sleep(0.2)
    got = smtp.messages()
    assert len(got) == 8 and len({m.message_id for m in got}) == 8
    ids = await pool.fetch(
        "SELECT message_id, state, attempts FROM notifications WHERE order_id = ANY($1::uuid[])",
        orders,
    )
    assert {r["message_id"] for r in ids} == {m.message_id for m in got}
    assert all(r["state"] == "sent" and r["attempts"] == 1 for r in ids)


async def test_a_temporary_refusal_is_retried_and_a_permanent_one_is_dead(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    _, order_id, _ = await paid_order(pool, host, http)
    smtp.refuse("451 4.3.0 Try again later")
    failures = REGISTRY.get_sample_value(
        "waitroom_email_failures_total", {"kind": "order_confirmed"}
    )
    mailer = make_mailer(pool, settings, smtp)
    assert await mailer.send_one() == "failed"
    (row,) = await rows(pool, order_id)
    assert row["state"] == "pending" and row["attempts"] == 1 and "451" in row["last_error"]
    assert (
        REGISTRY.get_sample_value("waitroom_email_failures_total", {"kind": "order_confirmed"})
        == (failures or 0) + 1
    )
    deadline = time.monotonic() + 5
    while not smtp.messages() and time.monotonic() < deadline:
        await mailer.send_one()  # the backoff (at most 0.05 s here) passes
        await asyncio.sleep(0.01)
    (got,) = smtp.messages()
    (row,) = await rows(pool, order_id)
    assert row["state"] == "sent" and row["attempts"] == 2 and got.message_id == row["message_id"]

    _, refused_order, _ = await paid_order(pool, host, http)
    smtp.refuse("550 5.1.1 No such mailbox")
    assert await drain(mailer) == 1
    (row,) = await rows(pool, refused_order)
    assert row["state"] == "dead" and "550" in row["last_error"]
    assert len(smtp.messages()) == 1


async def test_the_mailer_keeps_to_its_rate(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    event_id, _, _ = await paid_order(pool, host, http, quantity=1)
    for _ in range(5):
        await paid_order(pool, host, http, event_id=event_id, quantity=1)
    rate = 5.0
    mailer = make_mailer(pool, settings, smtp, rate_per_s=rate)
    await mailer.sample_once()
    assert REGISTRY.get_sample_value("waitroom_emails_pending") == 6
    assert (REGISTRY.get_sample_value("waitroom_email_oldest_pending_seconds") or 0) > 0
    started = time.monotonic()
    assert await drain(mailer) == 6
    got = smtp.wait_for(6)
    assert time.monotonic() - started >= 5 / rate * 0.95
    # The k-th send is booked no earlier than k slots after the first, and a message arrives
    # after its send: so the k-th arrival is never ahead of that schedule. (Two arrivals may
    # still come close together when one send was slowed on a loaded machine; the bucket's
    # promise is about the bookings, not about gaps between arrivals.)
    ahead = [(k, got[k].at - started) for k in range(6) if got[k].at - started < k / rate - 0.01]
    assert not ahead, ahead
    await mailer.sample_once()
    assert REGISTRY.get_sample_value("waitroom_emails_pending") == 0
    assert REGISTRY.get_sample_value("waitroom_email_oldest_pending_seconds") == 0


# --- a mailer process killed mid-send ---------------------------------------------------------


def start_mailer(settings: Settings, smtp: SmtpServer, log: Path) -> subprocess.Popen[bytes]:
    """``python -m workers.mailer`` on the test's database, sending to ``smtp``."""
    own = msgspec.structs.replace(
        settings,
        smtp_url=smtp.url,
        email_from=SENDER,
        email_timeout_s=KILL_TIMEOUT_S,
        email_rate_per_s=100.0,
        email_reminder_before_s=60,
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.mailer"],
            cwd=ROOT,
            env=settings_env(own),
            stdout=out,
            stderr=out,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def output(log: Path) -> str:
    """What the mailer processes logged (shown when a wait fails)."""
    return log.read_text()


#: The killed mailer's send timeout; its claims' lease is lease_for() of it.
KILL_TIMEOUT_S = 1.0


async def wait_held(smtp: SmtpServer, log: Path) -> None:
    deadline = time.monotonic() + 30
    while not smtp.held.is_set():
        assert time.monotonic() < deadline, output(log)
        await asyncio.sleep(0.01)


async def sent_all(pool: asyncpg.Pool[Any], orders: list[str], log: Path) -> list[asyncpg.Record]:
    deadline = time.monotonic() + 30
    while True:
        found = await pool.fetch(
            "SELECT * FROM notifications WHERE order_id = ANY($1::uuid[]) ORDER BY id", orders
        )
        if all(r["state"] == "sent" for r in found):
            return found
        assert time.monotonic() < deadline, (output(log), [dict(r) for r in found])
        await asyncio.sleep(0.05)


def by_message_id(got: list[Received]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in got:
        counts[message.message_id] = counts.get(message.message_id, 0) + 1
    return counts


async def test_a_mailer_killed_before_the_server_took_the_message_sends_it_once_after_restart(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
    tmp_path: Path,
) -> None:
    event_id, first, _ = await paid_order(pool, host, http, quantity=1)
    orders = [first] + [
        (await paid_order(pool, host, http, event_id=event_id, quantity=1))[1] for _ in range(2)
    ]
    log = tmp_path / "mailer.log"
    smtp.hold_next(keep=False)
    mailer = start_mailer(settings, smtp, log)
    try:
        await wait_held(smtp, log)
        os.kill(mailer.pid, signal.SIGKILL)  # mid-DATA: the server has not answered
        mailer.wait(10)
    finally:
        stop(mailer)
    (claimed,) = await pool.fetch(
        "SELECT * FROM notifications WHERE order_id = ANY($1::uuid[]) AND state = 'sending'",
        orders,
    )
    assert claimed["attempts"] == 1 and claimed["message_id"] is not None
    await asyncio.sleep(0.2)
    assert smtp.messages() == []  # the server dropped the unfinished transaction

    again = start_mailer(settings, smtp, log)
    try:
        found = await sent_all(pool, orders, log)
    finally:
        stop(again)
    await asyncio.sleep(0.3)  # anything more would arrive now
    counts = by_message_id(smtp.messages())
    assert counts == {r["message_id"]: 1 for r in found}  # each delivered exactly once
    (retried,) = [r for r in found if r["id"] == claimed["id"]]
    assert retried["attempts"] == 2  # claimed again after its lease
    assert (retried["sent_at"] - claimed["lease_until"]).total_seconds() > -0.5
    assert lease_for(KILL_TIMEOUT_S) == 3 * KILL_TIMEOUT_S


async def test_a_mailer_killed_after_the_server_took_the_message_resends_it_with_the_same_message_id(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
    tmp_path: Path,
) -> None:
    """The documented window: the server accepted the data, the row was not marked sent yet.

    At least once, not exactly once: the notification arrives twice, as one message (the
    same Message-ID), and its row is sent once.
    """
    _, order_id, _ = await paid_order(pool, host, http, quantity=1)
    log = tmp_path / "mailer.log"
    smtp.hold_next(keep=True)
    mailer = start_mailer(settings, smtp, log)
    try:
        await wait_held(smtp, log)
        os.kill(mailer.pid, signal.SIGKILL)  # the server has the message; its 250 is lost
        mailer.wait(10)
    finally:
        stop(mailer)
    assert len(smtp.messages()) == 1
    again = start_mailer(settings, smtp, log)
    try:
        (row,) = await sent_all(pool, [order_id], log)
    finally:
        stop(again)
    await asyncio.sleep(0.3)
    got = smtp.messages()
    assert len(got) == 2 and {m.message_id for m in got} == {row["message_id"]}
    assert row["attempts"] == 2 and row["state"] == "sent"


async def test_waitroom_workers_sends_e_mail_when_an_smtp_server_is_configured(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    """The composition root: the mailer loop, and the outbox handler of ``order.refunded``."""
    event_id, order_id, _ = await paid_order(pool, host, http)
    await pool.execute(
        "INSERT INTO outbox (event_id, topic, payload, handle_after) VALUES ($1, $2, $3, now())",
        event_id,
        ORDER_REFUNDED_TOPIC,
        msgspec.json.encode(
            {"order_id": order_id, "refund_id": "rf_w", "amount_minor": 1000, "currency": "EUR"}
        ).decode(),
    )
    own = msgspec.structs.replace(
        settings, smtp_url=smtp.url, email_from=SENDER, email_timeout_s=2.0
    )
    stop_workers = asyncio.Event()
    workers = asyncio.create_task(
        run_workers(own, stop_workers, payments=False, safety_net=False, drain_s=1.0)
    )
    try:
        deadline = time.monotonic() + 20
        while len(smtp.messages()) < 2:
            assert time.monotonic() < deadline and not workers.done(), smtp.messages()
            await asyncio.sleep(0.05)
    finally:
        stop_workers.set()
        await asyncio.wait_for(workers, 30)
    kinds = sorted(str(m.message["X-Waitroom-Notification"]) for m in smtp.messages())
    assert kinds == ["order_confirmed", "refund_processed"]


async def test_an_unreachable_server_is_retried_and_never_makes_an_e_mail_dead(
    pool: asyncpg.Pool[Any],
    host: InventoryHost,
    http: httpx.AsyncClient,
    control: Control,
    settings: Settings,
    smtp: SmtpServer,
) -> None:
    _, order_id, _ = await paid_order(pool, host, http)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    down = make_mailer(pool, settings, smtp, url=f"smtp://127.0.0.1:{port}", max_attempts=1)
    assert await down.send_one() == "outage"
    (row,) = await rows(pool, order_id)
    assert row["state"] == "pending" and row["attempts"] == 1 and row["last_error"]
    await asyncio.sleep(0.06)  # the backoff
    assert await drain(make_mailer(pool, settings, smtp)) == 1
    (got,) = smtp.wait_for(1)
    (row,) = await rows(pool, order_id)
    assert row["state"] == "sent" and got.message_id == row["message_id"]
