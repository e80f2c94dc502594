"""PostgreSQL cannot be exhausted by readers: cached public views, unknown ids that cost no
query, and a bounded wait for a pooled connection (503 with Retry-After, never a hang).

Each test runs a real server against the run's database, and holds PostgreSQL locks from a
connection of its own: a request that reached PostgreSQL would wait on them, one served from
memory does not.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import msgspec

from tests.admission.support import create_event, join, wait_for
from tests.harness import running
from tests.test_errors import ADMIN, assert_error
from waitroom.core.settings import Settings


@contextmanager
def locked(settings: Settings, *tables: str) -> Iterator[None]:
    """``tables`` locked ACCESS EXCLUSIVE by another session for the duration of the block."""
    ready = threading.Event()
    release = threading.Event()
    failure: list[BaseException] = []

    async def hold() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
                ready.set()
                # Polled: the release comes from another thread, not this event loop.
                while not release.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:  # surfaced below
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10) and not failure, failure
    try:
        yield
    finally:
        release.set()
        thread.join(10)


async def _waiting_on_locks(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return count
    finally:
        await conn.close()


def test_a_request_that_finds_every_pooled_connection_busy_gets_503_within_the_timeout(
    settings: Settings,
) -> None:
    timeout = 0.5
    small = msgspec.structs.replace(
        settings, db_pool_min=0, db_pool_max=1, dependency_timeout_s=timeout
    )
    with (
        running(small) as server,
        httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as admin,
    ):
        create_event(admin, prefix="pool")
        answers: list[httpx.Response] = []
        with locked(settings, "events"):
            # The one pooled connection is taken by a reader stuck behind the lock...
            stuck = threading.Thread(target=lambda: answers.append(admin.get("/v1/admin/events")))
            stuck.start()
            wait_for(lambda: asyncio.run(_waiting_on_locks(settings.database_url)) > 0, 10)
            # ...so the next request cannot get one: it is told so within the bound.
            started = time.monotonic()
            busy = admin.get("/v1/admin/events")
            elapsed = time.monotonic() - started
        stuck.join(15)
    error = assert_error(busy, 503, "database_busy")
    assert busy.headers["Retry-After"] == "1"
    assert error["details"]["dependency"] == "postgresql"
    assert timeout <= elapsed < timeout + 1.0, elapsed
    # The stuck reader went on once the lock was gone: nothing was lost.
    assert [a.status_code for a in answers] == [200]


def test_unknown_event_ids_and_cached_views_cost_no_query(settings: Settings) -> None:
    cached = msgspec.structs.replace(settings, view_cache_ttl_s=30.0)
    with (
        running(cached) as server,
        httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as admin,
        httpx.Client(base_url=server.url, timeout=30) as public,
    ):
        event_id = create_event(admin, prefix="view")
        opens_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        lottery_id = create_event(admin, prefix="view", queue_mode="lottery", opens_at=opens_at)
        _, token = join(public, event_id)
        fan = {"Authorization": f"Bearer {token}"}
        # Read once: the views are cached, and the list of event ids is fresh.
        assert public.get(f"/v1/events/{event_id}").status_code == 200
        lottery = public.get(f"/v1/events/{lottery_id}/lottery")
        assert lottery.status_code == 200, lottery.text
        assert_error(public.get("/v1/events/no-such-event-0"), 404, "event_not_found")

        with locked(settings, "events", "room_settings", "ticket_types", "room_lottery"):
            started = time.monotonic()
            for i in range(1, 40):
                unknown = f"no-such-event-{i}-{uuid.uuid4().hex[:6]}"
                assert_error(public.get(f"/v1/events/{unknown}"), 404, "event_not_found")
                assert_error(public.get(f"/v1/events/{unknown}/lottery"), 404, "event_not_found")
                assert_error(
                    public.post(f"/v1/events/{unknown}/queue", headers=fan),
                    404,
                    "event_not_found",
                )
            view = public.get(f"/v1/events/{event_id}")
            again = public.get(f"/v1/events/{lottery_id}/lottery")
            elapsed = time.monotonic() - started
    assert view.status_code == 200 and view.json()["id"] == event_id
    assert again.status_code == 200 and again.json() == lottery.json()
    # 117 unknown ids and two views while PostgreSQL could answer nothing: all from memory.
    assert elapsed < 3.0, elapsed


def test_the_event_view_is_at_most_the_ttl_stale_and_a_created_event_shows_at_once(
    settings: Settings,
) -> None:
    ttl = 1.0
    short = msgspec.structs.replace(settings, view_cache_ttl_s=ttl)
    event_id = f"view-{uuid.uuid4().hex[:10]}"
    with (
        running(short) as server,
        httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as client,
    ):
        # Unknown first (and remembered as such)...
        assert_error(client.get(f"/v1/events/{event_id}"), 404, "event_not_found")
        created = client.post(
            "/v1/admin/events",
            json={
                "id": event_id,
                "name": "Views",
                "ticket_types": [
                    {"name": "ga", "quantity": 100, "price_minor": 1000, "currency": "EUR"}
                ],
            },
        )
        assert created.status_code == 201, created.text
        # ...but this process created it: shown at once, not after the negative TTL.
        first = client.get(f"/v1/events/{event_id}")
        assert first.status_code == 200, first.text
        assert first.json()["ticket_types"][0]["available"] == 100

        asyncio.run(_take_tickets(settings.database_url, event_id, 7))
        changed_at = time.monotonic()
        # Served from the cache: the change is not visible yet...
        assert client.get(f"/v1/events/{event_id}").json()["ticket_types"][0]["available"] == 100

        # ...and it is once the entry has lived its TTL, never later.
        def available() -> bool:
            body = client.get(f"/v1/events/{event_id}").json()
            return bool(body["ticket_types"][0]["available"] == 93)

        wait_for(available, timeout=5, every=0.02)
        assert time.monotonic() - changed_at <= ttl + 0.5


async def _take_tickets(dsn: str, event_id: str, count: int) -> None:
    """Tickets taken behind the server's back (as another node's checkout would)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE ticket_types SET held = held + $2 WHERE event_id = $1", event_id, count
        )
    finally:
        await conn.close()


def test_a_draw_made_by_this_process_shows_at_once_in_the_cached_lottery_view(
    settings: Settings,
) -> None:
    cached = msgspec.structs.replace(settings, view_cache_ttl_s=30.0)
    with (
        running(cached) as server,
        httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as admin,
        httpx.Client(base_url=server.url, timeout=30) as public,
    ):
        opens_at = datetime.now(UTC) + timedelta(seconds=2)
        event_id = create_event(
            admin, prefix="view", queue_mode="lottery", opens_at=opens_at.isoformat()
        )
        for _ in range(3):
            join(public, event_id)  # the pre-queue, before the sale opens
        before = public.get(f"/v1/events/{event_id}/lottery").json()
        assert before["drawn"] is False  # and cached for 30 s
        time.sleep(max(0.0, (opens_at - datetime.now(UTC)).total_seconds()) + 0.2)
        join(public, event_id)  # the first join after opening draws, in this process

        def drawn() -> bool:
            return bool(public.get(f"/v1/events/{event_id}/lottery").json()["drawn"])

        # Long before the cached "not drawn" would have run out: the draw dropped it.
        wait_for(drawn, timeout=5, every=0.05)
        record = public.get(f"/v1/events/{event_id}/lottery").json()
    assert record["seed"] is not None and len(record["entries"]) == 3
