"""``waitroom event delete``: an event's rows and Redis keys go, other events' stay.

A real sale first (server with admission loops, payment workers, the mock provider, in a
database of this module's own): fans buy tickets in two events, one more event only has a
fan in line. Then the server and workers stop, as the command asks, and the real console
script deletes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from tests.admission.support import create_event, join, wait_for
from tests.checkout.test_checkout import Fan
from tests.harness import (
    ADMIN_TOKEN,
    ServerThread,
    WorkersThread,
    cleanup,
    fresh_settings,
    run_cli,
    running,
    sync_redis,
)
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings
from workers import mock_provider

#: Every table with an event's rows, and how to find them.
TABLES = {
    "events": "id = $1",
    "room_settings": "event_id = $1",
    "ticket_types": "event_id = $1",
    "holds": "event_id = $1",
    "idempotency_keys": "event_id = $1",
    "orders": "event_id = $1",
    "payments": "order_id IN (SELECT id FROM orders WHERE event_id = $1)",
    "tickets": "event_id = $1",
    "outbox": "event_id = $1",
    "queue_passes": "event_id = $1",
    "inventory_owners": "event_id = $1",
    "room_lottery": "event_id = $1",
}


@dataclass(frozen=True)
class Sale:
    settings: Settings
    paid: str  # a fan bought a ticket: deleted with --force
    kept: str  # a fan bought a ticket: never deleted
    waiting: str  # a fan in line, nothing bought
    spent_jti: str  # the pass of the paid event's buyer


def buy(client: httpx.Client, event_id: str) -> None:
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve().json()
    assert fan.confirm(hold["id"]).status_code == 202
    fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")


@pytest.fixture(scope="module")
def sale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sale]:
    provider = ServerThread(mock_provider.create_app()).start()
    run_dir: Path = tmp_path_factory.mktemp("purge-run")
    settings = fresh_settings(run_dir, admission_loop=True, payment_url=provider.url)
    try:
        with running(settings) as server:
            workers = WorkersThread(settings).start()
            try:
                headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                with (
                    httpx.Client(base_url=server.url, timeout=10, headers=headers) as admin,
                    httpx.Client(base_url=server.url, timeout=10) as client,
                ):
                    paid, kept, waiting = (
                        create_event(admin, rate=50, quantity=5, prefix=p)
                        for p in ("paid", "kept", "wait")
                    )
                    buy(client, paid)
                    buy(client, kept)
                    admin.patch(f"/v1/admin/events/{waiting}/admission", json={"paused": True})
                    join(client, waiting)
                jti = asyncio.run(
                    _fetchval(settings, "SELECT jti FROM queue_passes WHERE event_id = $1", paid)
                )
                # The paid order spends its pass in Redis through the outbox: wait for it, so
                # that the deletion has that marker to remove too.
                spent = Keys(settings.redis_prefix).event(paid).spent_pass(jti)
                with sync_redis(settings.redis_url) as r:
                    wait_for(lambda: r.exists(spent), timeout=15)
            finally:
                workers.stop()
        yield Sale(settings, paid, kept, waiting, jti)
    finally:
        cleanup(settings)
        provider.stop()


async def _fetchval(settings: Settings, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def rows_of(settings: Settings, event_id: str) -> dict[str, int]:
    """How many rows each table holds for ``event_id``."""

    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return {
                table: await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {where}", event_id)
                for table, where in TABLES.items()
            }
        finally:
            await conn.close()

    return asyncio.run(count())


def redis_keys(settings: Settings, event_id: str, *, lasting: bool = False) -> list[bytes]:
    """The event's keys in Redis; with ``lasting``, only those without a TTL (rate-limit
    buckets and the like expire on their own while a test runs)."""
    base = Keys(settings.redis_prefix).event(event_id).base
    with sync_redis(settings.redis_url) as r:
        found = r.scan_iter(match=base + ":*", count=1000)
        return sorted(k for k in found if not lasting or r.ttl(k) == -1)


def test_an_event_with_paid_orders_is_refused_unless_forced_then_goes_whole(sale: Sale) -> None:
    settings, keys = sale.settings, Keys(sale.settings.redis_prefix)
    before_kept = rows_of(settings, sale.kept)
    kept_keys = redis_keys(settings, sale.kept, lasting=True)
    assert before_kept["tickets"] == 1 and kept_keys

    refused = run_cli(settings, "event", "delete", sale.paid)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"waitroom: event {sale.paid!r} has 1 paid orders (1 tickets); deleting it would"
        " erase what fans bought. Refused: use --force only for a test or demo sale"
    ]
    assert rows_of(settings, sale.paid)["orders"] == 1

    done = run_cli(settings, "event", "delete", sale.paid, "--force", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {k: report[k] for k in ("in_database", "orders", "paid_orders", "tickets", "holds")} == {
        "in_database": True,
        "orders": 1,
        "paid_orders": 1,
        "tickets": 1,
        "holds": 1,
    }
    assert report["passes"] >= 1 and report["redis_keys"] > 0
    assert rows_of(settings, sale.paid) == dict.fromkeys(TABLES, 0)
    assert redis_keys(settings, sale.paid) == []
    with sync_redis(settings.redis_url) as r:
        assert not r.exists(
            keys.event(sale.paid).spent_pass(sale.spent_jti),
            keys.event(sale.paid).revoked_pass(sale.spent_jti),
        )
    # What was done is on the record.
    audited = asyncio.run(
        _fetchval(
            settings,
            "SELECT old FROM audit_log WHERE event_id = $1 AND action = 'event.delete'",
            sale.paid,
        )
    )
    assert msgspec.json.decode(audited)["tickets"] == 1
    # The other sale is untouched.
    assert rows_of(settings, sale.kept) == before_kept
    assert redis_keys(settings, sale.kept, lasting=True) == kept_keys


def test_an_event_without_orders_is_deleted_and_a_second_time_is_not_found(sale: Sale) -> None:
    settings = sale.settings
    assert redis_keys(settings, sale.waiting)  # the fan's place in line
    done = run_cli(settings, "event", "delete", sale.waiting)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"deleted event {sale.waiting}: 0 orders (0 paid, 0 tickets)")
    assert rows_of(settings, sale.waiting) == dict.fromkeys(TABLES, 0)
    assert redis_keys(settings, sale.waiting) == []

    again = run_cli(settings, "event", "delete", sale.waiting)
    assert again.returncode == 1
    assert again.stderr.strip() == f"waitroom: no event {sale.waiting!r}"


def test_an_event_a_running_process_serves_is_refused(sale: Sale) -> None:
    settings = sale.settings
    owner = Keys(settings.redis_prefix).event(sale.kept).owner
    with sync_redis(settings.redis_url) as r:
        r.set(owner, "node-7", px=30_000)  # an inventory owner alive elsewhere
        try:
            refused = run_cli(settings, "event", "delete", sale.kept, "--force")
        finally:
            r.delete(owner)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"waitroom: event {sale.kept!r} is being served: its inventory owner lease is held by"
        " node-7; stop `waitroom serve` and `waitroom workers` first"
    )
    assert rows_of(settings, sale.kept)["tickets"] == 1


def test_keys_left_in_redis_are_removed_and_a_pattern_is_no_event_id(sale: Sale) -> None:
    settings = sale.settings
    keys = Keys(settings.redis_prefix)
    leftover = keys.event("gone-1").meta
    with sync_redis(settings.redis_url) as r:
        r.hset(leftover, "opened", "1")
        kept_keys = redis_keys(settings, sale.kept, lasting=True)
        # "*" would match every event's keys in a SCAN pattern: it names no event.
        star = run_cli(settings, "event", "delete", "*", "--force")
        assert star.returncode == 1 and star.stderr.strip() == "waitroom: no event '*'"
        assert r.exists(leftover)
        assert redis_keys(settings, sale.kept, lasting=True) == kept_keys

        done = run_cli(settings, "event", "delete", "gone-1")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "event gone-1 was not in PostgreSQL; removed 1 Redis keys"
        assert not r.exists(leftover)
