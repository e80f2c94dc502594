"""The fans' seat snapshot and live seat changes, over real HTTP and WebSocket, with real
PostgreSQL and Redis (issue 17, item 3): layout and states, ETag and 304, the 404s, and
coalesced diffs that bring a snapshot to the same states as the database."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.harness import ServerThread
from tests.inventory.seating import write_seat_holds
from tests.test_errors import assert_error
from tests.test_venue_api import make_event, seat_map
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings
from waitroom.line.seatnews import (
    MAX_BACKLOG,
    Coalescer,
    SeatDiff,
    SeatNews,
    apply,
    normalize,
    publish_seat_changes,
)
from waitroom.seats_api import FRESH_S


def seated_event(admin: httpx.Client, *, rows: int = 3, seats: int = 4) -> str:
    """An event with the test map of tests/test_venue_api.py (row A's last seat killed)."""
    event_id = make_event(admin, stalls=max(100, rows * seats))
    body = seat_map(rows=rows, seats=seats)
    body["sections"][0]["rows"][1]["seats"][1]["status"] = "held_back"
    put = admin.put(f"/v1/admin/events/{event_id}/seatmap", json=body)
    assert put.status_code == 200, put.text
    return event_id


def seat_ids(snapshot: dict[str, Any]) -> list[str]:
    """Seat ids in the snapshot's layout order (the order of ``states``)."""
    return [
        f"{section['id']}:{row['label']}:{seat[0]}"
        for section in snapshot["sections"]
        for row in section["rows"]
        for seat in row["seats"]
    ]


def states_by_seat(snapshot: dict[str, Any]) -> dict[str, str]:
    return dict(zip(seat_ids(snapshot), snapshot["states"], strict=True))


async def hold_seats(
    pool: asyncpg.Pool[Any], event_id: str, seats: list[str], status: str = "held"
) -> uuid.UUID:
    """A hold of ``seats`` written directly (``status`` 'held' or 'paid' for sold)."""
    async with pool.acquire() as conn, conn.transaction():
        (hold_id,) = await write_seat_holds(conn, event_id, seats, status)
    return hold_id


# --- the snapshot ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_snapshot_has_the_layout_prices_and_every_seats_state(
    admin: httpx.Client, server: ServerThread, pool: asyncpg.Pool[Any]
) -> None:
    event_id = seated_event(admin)
    await hold_seats(pool, event_id, ["main:A:2"])
    await hold_seats(pool, event_id, ["main:C:3"], status="paid")
    ended = await hold_seats(pool, event_id, ["main:C:4"])
    await pool.execute("UPDATE seat_holds SET status = 'expired' WHERE hold_id = $1", ended)

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:  # no credentials
        response = await client.get(f"/v1/events/{event_id}/seats")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "public, max-age=1"
    snapshot = response.json()
    assert snapshot["event_id"] == event_id and snapshot["map_version"] == 1
    assert snapshot["version"] == 0  # nothing published yet
    assert snapshot["levels"] == [
        {
            "id": "stalls",
            "name": "Stalls",
            "ticket_type": "Stalls",
            "price_minor": 5000,
            "currency": "EUR",
        },
        {
            "id": "balcony",
            "name": "Balcony",
            "ticket_type": "Balcony",
            "price_minor": 3000,
            "currency": "EUR",
        },
    ]
    assert snapshot["standing"] == [
        {"id": "pit", "name": "pit", "ticket_type": "Standing", "capacity": 400}
    ]
    (section,) = snapshot["sections"]
    assert (section["id"], section["name"]) == ("main", "Main floor")
    assert [row["label"] for row in section["rows"]] == ["A", "B", "C"]
    # [label, x, y, level index, flags]: seat 1 of each row is accessible (flag 1).
    assert section["rows"][0]["seats"][0] == ["1", 0.0, 0.0, 0, 1]
    assert section["rows"][2]["seats"][3] == ["4", 30.0, 20.0, 1, 0]
    states = states_by_seat(snapshot)
    assert len(states) == 12
    assert snapshot["seats"] == seat_ids(snapshot)  # the order of states, spelled out
    assert snapshot["seats"][:2] == ["main:A:1", "main:A:2"]
    assert states["main:A:2"] == "h"  # held
    assert states["main:C:3"] == "s"  # paid: sold
    assert states["main:A:4"] == "x"  # killed ...
    assert states["main:B:2"] == "x"  # ... and held back look the same
    assert states["main:C:4"] == "f"  # an expired hold frees its seat
    assert sum(1 for s in states.values() if s == "f") == 8


@pytest.mark.anyio
async def test_the_snapshot_is_revalidated_with_its_etag_until_a_seat_changes(
    admin: httpx.Client,
    server: ServerThread,
    pool: asyncpg.Pool[Any],
    redis: Redis,
    settings: Settings,
) -> None:
    event_id = seated_event(admin)
    url = f"/v1/events/{event_id}/seats"
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        first = await client.get(url)
        etag = first.headers["etag"]
        assert etag.startswith('"') and not etag.startswith("W/")  # strong
        again = await client.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        assert again.headers["cache-control"] == "public, max-age=1"

        # A hold, and its publication as the actor makes it after the commit. A page whose
        # socket was ready at that version asks for it: kept answers that are older are
        # not served to it (the server reads again at once).
        await hold_seats(pool, event_id, ["main:B:3"])
        keys = Keys(settings.redis_prefix)
        version = await publish_seat_changes(redis, keys, event_id, {"main:B:3": "h"})
        assert version is not None
        changed = await client.get(url, params={"v": version}, headers={"If-None-Match": etag})
        assert changed.status_code == 200
        assert changed.headers["etag"] != etag
        assert changed.json()["version"] == version
        assert states_by_seat(changed.json())["main:B:3"] == "h"

        # A publication moves the version, and so the tag, even when the states are the same.
        await publish_seat_changes(redis, keys, event_id, {"main:B:3": "h"})
        moved = await client.get(
            url, params={"v": version + 1}, headers={"If-None-Match": changed.headers["etag"]}
        )
        assert moved.status_code == 200 and moved.json()["version"] == version + 1
        assert moved.json()["states"] == changed.json()["states"]
        # A malformed version is only a cache key: the answer is the kept one.
        assert (await client.get(url, params={"v": "-1x"})).status_code == 200

        # Without ?v=: once seats changed and the kept snapshot is FRESH_S old, read again.
        await hold_seats(pool, event_id, ["main:C:2"])
        await publish_seat_changes(redis, keys, event_id, {"main:C:2": "h"})
        await asyncio.sleep(FRESH_S)
        plain = await client.get(url)
        assert states_by_seat(plain.json())["main:C:2"] == "h"


def test_unknown_events_and_events_without_a_map_are_404(
    admin: httpx.Client, client: httpx.Client
) -> None:
    assert_error(client.get("/v1/events/no-such-evt/seats"), 404, "event_not_found")
    assert_error(client.get("/v1/events/bad%20id!/seats"), 404)
    event_id = make_event(admin)
    assert_error(client.get(f"/v1/events/{event_id}/seats"), 404, "seat_map_not_found")


def test_the_snapshot_is_in_the_openapi_document(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/events/{event_id}/seats"]["get"]
    assert "security" not in operation
    assert set(operation["responses"]) >= {"200", "404", "503"}
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/SeatSnapshot")


# --- live changes -----------------------------------------------------------------------------


def live_url(server: ServerThread, event_id: str) -> str:
    return f"{server.ws_url}/v1/events/{event_id}/seats/live"


async def ready(ws: ClientConnection) -> int:
    """Wait for the socket's ``ready``; the version it gives."""
    message = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert set(message) == {"type", "version"} and message["type"] == "ready", message
    version: int = message["version"]
    return version


@pytest.mark.anyio
async def test_a_burst_of_changes_reaches_a_viewer_as_a_few_coalesced_diffs(
    admin: httpx.Client, server: ServerThread, redis: Redis, settings: Settings
) -> None:
    event_id = seated_event(admin, rows=10, seats=100)
    keys = Keys(settings.redis_prefix)
    ids = [f"main:{chr(ord('A') + r)}:{k + 1}" for r in range(10) for k in range(100)]
    async with connect(live_url(server, event_id)) as ws:
        await ready(ws)
        started = time.monotonic()
        expected: dict[str, str] = {}
        # 1,000 publications over about a second, one seat each, some seats several times.
        for i in range(1000):
            seat = ids[(i * 7) % len(ids)]
            state = "held" if i % 3 else "sold"
            await publish_seat_changes(redis, keys, event_id, {seat: state})
            expected[seat] = state[0]
            if i % 100 == 99:
                await asyncio.sleep(0.1)
        seen: dict[str, str] = {}
        messages = []
        while seen != expected:
            message = json.loads(await asyncio.wait_for(ws.recv(), 5))
            messages.append(message)
            assert message["type"] == "seats"
            apply(seen, message["changes"])
        elapsed = time.monotonic() - started
    # At most one message per 250 ms (and the first at once).
    assert len(messages) <= elapsed / 0.25 + 2, (len(messages), elapsed)
    assert len(messages) < 20
    versions = [m["version"] for m in messages]
    assert versions == sorted(versions) and versions[-1] >= 1000


@pytest.mark.anyio
async def test_a_snapshot_and_the_diffs_after_it_converge_on_the_database(
    admin: httpx.Client,
    server: ServerThread,
    pool: asyncpg.Pool[Any],
    redis: Redis,
    settings: Settings,
) -> None:
    event_id = seated_event(admin)
    keys = Keys(settings.redis_prefix)
    url = f"/v1/events/{event_id}/seats"
    # Published before this viewer subscribed: only the snapshot can tell it.
    await hold_seats(pool, event_id, ["main:B:1"])
    before = await publish_seat_changes(redis, keys, event_id, {"main:B:1": "h"})
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        connect(live_url(server, event_id)) as ws,
    ):
        subscribed = await ready(ws)  # what is published from now on is pushed
        assert subscribed == before
        hold = await hold_seats(pool, event_id, ["main:A:1", "main:A:2"])
        await publish_seat_changes(redis, keys, event_id, {"main:A:1": "h", "main:A:2": "h"})
        first = (await client.get(url, params={"v": subscribed})).json()
        assert first["version"] >= subscribed  # read after every publication up to ready's
        view = states_by_seat(first)
        assert view["main:B:1"] == "h"
        await pool.execute("UPDATE seat_holds SET status = 'paid' WHERE hold_id = $1", hold)
        await publish_seat_changes(redis, keys, event_id, {"main:A:1": "s", "main:A:2": "s"})
        await hold_seats(pool, event_id, ["main:C:1"])
        last = await publish_seat_changes(redis, keys, event_id, {"main:C:1": "held"})
        truth = states_by_seat((await client.get(url, params={"v": last})).json())
        deadline = time.monotonic() + 5
        while view != truth and time.monotonic() < deadline:
            message = json.loads(await asyncio.wait_for(ws.recv(), 5))
            apply(view, message["changes"])
    assert view == truth
    assert (truth["main:A:1"], truth["main:C:1"], truth["main:B:1"]) == ("s", "h", "h")


@pytest.mark.anyio
async def test_viewers_of_unknown_events_and_viewers_that_talk_are_closed(
    admin: httpx.Client, server: ServerThread
) -> None:
    async with connect(live_url(server, "no-such-evt")) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 4404
    event_id = seated_event(admin)
    async with connect(live_url(server, event_id)) as ws:
        await ready(ws)
        await ws.send("hello")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1008
    async with connect(
        live_url(server, event_id), additional_headers={"Origin": "https://evil.example"}
    ) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 4403


@pytest.mark.anyio
async def test_publishing_refuses_unknown_states_and_skips_empty_changes(
    redis: Redis, settings: Settings
) -> None:
    keys = Keys(settings.redis_prefix)
    with pytest.raises(ValueError, match="unknown state"):
        await publish_seat_changes(redis, keys, "evt-x", {"main:A:1": "reserved"})
    assert await publish_seat_changes(redis, keys, "evt-x", {}) is None
    assert normalize({"a:b:1": "free", "a:b:2": "x", "a:b:3": "killed"}) == {
        "a:b:1": "f",
        "a:b:2": "x",
        "a:b:3": "x",
    }


async def subscriptions(redis: Redis, channel: str) -> int:
    """Subscribers of ``channel`` in Redis; on a cluster, summed over its nodes (a
    subscription lives on one node, and PUBSUB NUMSUB counts only that node's)."""
    if not isinstance(redis, RedisCluster):
        (_, count), *_ = await redis.pubsub_numsub(channel)
        return int(count)
    total = 0
    for node in redis.get_nodes():
        reply: Any = await redis.execute_command("PUBSUB NUMSUB", channel, target_nodes=node)
        pairs = reply if isinstance(reply, list) else list(reply.items())
        flat = [x for pair in pairs for x in (pair if isinstance(pair, (list, tuple)) else [pair])]
        total += sum(int(x) for x in flat[1::2])
    return total


@pytest.mark.anyio
async def test_one_subscription_serves_a_process_viewers_and_a_slow_viewer_is_dropped(
    redis: Redis, settings: Settings
) -> None:
    keys = Keys(settings.redis_prefix)
    news = SeatNews(redis, keys, interval_s=0.01)
    event_id = f"evt-{uuid.uuid4().hex[:8]}"
    channel = keys.event(event_id).seat_news
    try:
        reader = await news.subscribe(event_id)
        idle = await news.subscribe(event_id)
        assert news.viewers(event_id) == 2
        assert await subscriptions(redis, channel) == 1  # one Redis subscription for both
        await publish_seat_changes(redis, keys, event_id, {"s:A:1": "held"})
        text = await asyncio.wait_for(reader.next(), 5)
        assert text is not None
        first = json.loads(text)
        assert first == {"type": "seats", "version": 1, "changes": {"s:A:1": "h"}}
        # The idle viewer never reads: past MAX_BACKLOG waiting messages it is dropped (its
        # socket closes with 1013 and the page reads the snapshot again); the reader is not.
        for k in range(MAX_BACKLOG):
            await publish_seat_changes(redis, keys, event_id, {"s:A:1": "fhs"[k % 3]})
            assert await asyncio.wait_for(reader.next(), 5)
        assert idle.closed and await idle.next() is None
        assert not reader.closed
        await news.leave(idle)
        assert news.viewers(event_id) == 1
        await news.leave(reader)
        assert news.viewers(event_id) == 0
        # The last viewer ended the subscription (Redis may take a moment to count it).
        for _ in range(250):
            if not await subscriptions(redis, channel):
                break
            await asyncio.sleep(0.02)
        assert await subscriptions(redis, channel) == 0
    finally:
        await news.close()


# --- the coalescer (pure) ---------------------------------------------------------------------

SEATS = st.sampled_from([f"s:A:{i}" for i in range(8)])
STATES = st.sampled_from("fhsx")
CHANGES = st.dictionaries(SEATS, STATES, min_size=1, max_size=4)


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    start=st.dictionaries(SEATS, STATES),
    steps=st.lists(st.tuples(CHANGES, st.floats(0, 0.4)), max_size=40),
)
def test_coalesced_diffs_give_the_same_final_states_as_every_change_in_order(
    start: dict[str, str], steps: list[tuple[dict[str, str], float]]
) -> None:
    coalescer = Coalescer(0.25)
    every = dict(start)
    coalesced = dict(start)
    now = 0.0
    flushes: list[float] = []
    for version, (changes, gap) in enumerate(steps, 1):
        now += gap
        apply(every, changes)
        coalescer.add(SeatDiff(version, changes))
        diff = coalescer.take(now)
        if diff is not None:
            flushes.append(now)
            assert diff.version == version
            apply(coalesced, diff.changes)
    wait = coalescer.due_in(now)
    if wait is not None:
        diff = coalescer.take(now + wait)
        assert diff is not None
        flushes.append(now + wait)
        apply(coalesced, diff.changes)
    assert coalescer.due_in(now + 10) is None
    assert coalesced == every
    # Never two flushes within the interval.
    assert all(b - a >= 0.25 - 1e-9 for a, b in itertools.pairwise(flushes))
