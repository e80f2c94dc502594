"""Live positions over the WebSocket, and the broadcaster behind them, against a real server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from admission.passes import PassClaims, PassKeys
from tests.harness import ADMIN_TOKEN, ServerThread, running
from tests.queue_support import create_event, fan_headers, new_ip, redis_client
from waitroom.core.db import create_pool
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings
from waitroom.line import scripts as line_scripts
from waitroom.line.broadcast import (
    FRONT_MIN_PLACES,
    HANDOVER_CHUNK,
    Broadcaster,
    Hub,
    Subscriber,
    pump,
)
from waitroom.line.room import Rooms

pytestmark = pytest.mark.anyio
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
Message = dict[str, Any]


@pytest.fixture
async def http(server: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture
async def r(settings: Settings) -> AsyncIterator[Redis]:
    async with redis_client(settings) as client:
        yield client


async def new_event(http: httpx.AsyncClient, **room: Any) -> str:
    with httpx.Client(base_url=str(http.base_url), headers=ADMIN) as admin:
        return create_event(admin, **room)


async def new_fan(http: httpx.AsyncClient, event_id: str) -> tuple[str, str]:
    """Join as a new visitor; (token, fan id)."""
    http.cookies.clear()
    response = await http.post(
        f"/v1/events/{event_id}/queue", headers={"X-Forwarded-For": new_ip()}
    )
    http.cookies.clear()
    assert response.status_code == 201, response.text
    body = response.json()
    return body["visitor_token"], body["fan_id"]


async def leave(http: httpx.AsyncClient, event_id: str, token: str) -> None:
    response = await http.delete(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))
    assert response.status_code == 200, response.text


def ws_url(server: ServerThread, event_id: str) -> str:
    return f"{server.ws_url}/v1/events/{event_id}/queue/ws"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fan_ws(server: ServerThread, event_id: str, token: str, **kwargs: Any) -> connect:
    """A WebSocket of the fan with ``token`` (as a non-browser client: Authorization)."""
    return connect(ws_url(server, event_id), additional_headers=bearer(token), **kwargs)


async def receive(ws: ClientConnection, timeout: float = 3.0) -> Message:
    message: Message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return message


async def until(
    ws: ClientConnection, wanted: Callable[[Message], bool], timeout: float = 5.0
) -> Message:
    """The first message that satisfies ``wanted`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        message = await receive(ws, max(0.01, deadline - time.monotonic()))
        if wanted(message):
            return message


async def closed_with(url: str, **kwargs: Any) -> tuple[int, str]:
    async with connect(url, open_timeout=5, **kwargs) as ws:
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), 5)
    received = caught.value.rcvd
    assert received is not None
    return received.code, received.reason


async def test_positions_arrive_and_fall_as_fans_ahead_leave(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    fans = [await new_fan(http, event_id) for _ in range(4)]
    async with fan_ws(server, event_id, fans[3][0]) as ws:
        assert await receive(ws) == {
            "type": "position",
            "position": 4,
            "fans_ahead": 3,
            "eta_seconds": None,
        }
        await leave(http, event_id, fans[0][0])
        assert (await until(ws, lambda m: m["position"] != 4))["position"] == 3
        await leave(http, event_id, fans[1][0])
        await leave(http, event_id, fans[2][0])
        assert (await until(ws, lambda m: m["position"] == 1))["fans_ahead"] == 0


async def test_identity_comes_from_the_cookie_or_the_header(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    token, _ = await new_fan(http, event_id)
    url = ws_url(server, event_id)
    for headers in ({"Cookie": f"wr_visitor={token}"}, {"Authorization": f"Bearer {token}"}):
        async with connect(url, additional_headers=headers) as ws:
            assert (await receive(ws))["position"] == 1


async def test_a_websocket_without_identity_is_closed_4401_with_a_reason(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    assert await closed_with(ws_url(server, event_id)) == (4401, "identity required")
    url = ws_url(server, event_id)
    code, reason = await closed_with(url, additional_headers=bearer("forged.token.here"))
    assert code == 4401 and "invalid" in reason
    expired = jwt.encode({"sub": "v_" + "0" * 32, "exp": 1, "typ": "visitor"}, "x" * 32, "HS256")
    code, _ = await closed_with(url, additional_headers=bearer(expired))
    assert code == 4401


async def test_unknown_events_and_fans_not_in_line_are_closed_4404(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    token, _ = await new_fan(http, event_id)
    unknown = ws_url(server, "no-such-event")
    assert await closed_with(unknown, additional_headers=bearer(token)) == (4404, "unknown event")
    other = await new_event(http)
    closed = await closed_with(ws_url(server, other), additional_headers=bearer(token))
    assert closed == (4404, "not in line")


async def test_a_fan_who_leaves_from_elsewhere_is_closed_4404(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    token, _ = await new_fan(http, event_id)
    async with fan_ws(server, event_id, token) as ws:
        await receive(ws)
        await leave(http, event_id, token)
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), 5)
    assert caught.value.rcvd is not None
    assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (4404, "not in line")


async def test_a_fan_sent_away_by_the_sell_out_is_told_sold_out_not_4404(
    server: ServerThread, http: httpx.AsyncClient, r: Redis, settings: Settings
) -> None:
    # A fan who joined, and whose line was closed by the sell-out before its socket opened
    # (close_line.lua, as the admission leader runs it), hears "sold out", as a poll does;
    # one who never joined is still told "not in line".
    event_id = await new_event(http)
    ek = Keys(settings.redis_prefix).event(event_id)
    token, _ = await new_fan(http, event_id)
    await r.hset(ek.meta, "sold_out", "1")
    assert await line_scripts.close_line(r, ek, limit=100) == (1, False)
    async with fan_ws(server, event_id, token) as ws:
        assert await receive(ws) == {"type": "sold_out"}
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), 5)
    assert caught.value.rcvd is not None
    assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (1000, "sold out")
    stranger = await new_event(http)
    closed = await closed_with(ws_url(server, stranger), additional_headers=bearer(token))
    assert closed == (4404, "not in line")


async def test_paused_sold_out_and_admitted_arrive_over_the_socket(
    server: ServerThread, http: httpx.AsyncClient, r: Redis, settings: Settings
) -> None:
    event_id = await new_event(http)
    ek = Keys(settings.redis_prefix).event(event_id)
    (first, first_id), (second, _) = [await new_fan(http, event_id) for _ in range(2)]
    async with (
        fan_ws(server, event_id, first) as ws1,
        fan_ws(server, event_id, second) as ws2,
    ):
        assert (await receive(ws1))["position"] == 1
        assert (await receive(ws2))["position"] == 2

        await r.hset(ek.meta, "paused", "1")
        assert await until(ws2, lambda m: m["type"] != "position") == {"type": "paused"}
        await r.hset(ek.meta, "paused", "0")
        assert (await until(ws2, lambda m: m["type"] == "position"))["position"] == 2

        # The admission loop's writes (see waitroom/room.py) reach the fan as "admitted".
        claims = PassClaims("waitroom", first_id, event_id, "j1", 1, 1, 1800000000, 1)
        the_pass = PassKeys(Ed25519PrivateKey.generate()).sign(claims)
        await r.zrem(ek.queue, first_id)
        await r.hset(ek.admitted, first_id, the_pass)
        await r.hincrby(ek.meta, "admitted_total", 1)
        assert await until(ws1, lambda m: m["type"] == "admitted") == {
            "type": "admitted",
            "pass": the_pass,
            "expires_at": 1800000000,
        }
        assert (await until(ws2, lambda m: m.get("position") == 1))["fans_ahead"] == 0

        await r.hset(ek.meta, "sold_out", "1")
        assert await until(ws2, lambda m: m["type"] != "position") == {"type": "sold_out"}


async def test_a_lottery_fan_waits_with_the_commitment(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    from datetime import UTC, datetime, timedelta

    event_id = await new_event(
        http, mode="lottery", opens_at=datetime.now(UTC) + timedelta(hours=1)
    )
    token, _ = await new_fan(http, event_id)
    commitment = (await http.get(f"/v1/events/{event_id}/lottery")).json()["commitment"]
    async with fan_ws(server, event_id, token) as ws:
        assert await receive(ws) == {"type": "prequeue", "commitment": commitment}


async def test_a_client_that_reads_nothing_does_not_stall_the_others(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    ahead = [await new_fan(http, event_id) for _ in range(6)]
    silent_token, _ = await new_fan(http, event_id)
    readers = [await new_fan(http, event_id) for _ in range(3)]
    # The silent client accepts one message into its queue and then stops reading at all.
    async with fan_ws(server, event_id, silent_token, max_queue=1, close_timeout=0.5) as _silent:
        sockets = [await fan_ws(server, event_id, t) for t, _ in readers]
        try:
            first = [(await receive(ws))["position"] for ws in sockets]
            assert first == [8, 9, 10]
            for step, (token, _) in enumerate(ahead, start=1):
                await leave(http, event_id, token)
                started = time.monotonic()
                for ws, position in zip(sockets, first, strict=True):
                    expected = position - step

                    def arrived(message: Message, expected: int = expected) -> bool:
                        return bool(message["position"] <= expected)

                    assert (await until(ws, arrived, 3.0))["position"] == expected
                # Each change shows within about a tick, silent neighbour or not.
                assert time.monotonic() - started < 2.5
        finally:
            for ws in sockets:
                await ws.close()


async def test_abandoned_fans_stop_counting_and_connected_fans_keep_their_place(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http, grace_s=5)
    await new_fan(http, event_id)  # joins, then is never heard of again
    token, _ = await new_fan(http, event_id)
    async with fan_ws(server, event_id, token) as ws:
        assert (await receive(ws))["position"] == 2
        # Within one grace period (5 s) plus a sweep interval (5 ticks) the place moves up,
        # while this fan, connected all along, stays in line.
        assert (await until(ws, lambda m: m["position"] == 1, timeout=13))["fans_ahead"] == 0
    metrics = (await http.get("/metrics")).text
    assert f'waitroom_abandoned_fans_total{{event="{event_id}"}} 1.0' in metrics


async def test_connections_are_gauged_and_ticks_timed(
    server: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    token, _ = await new_fan(http, event_id)
    async with fan_ws(server, event_id, token) as ws:
        await receive(ws)
        await asyncio.sleep(1.2)
        metrics = (await http.get("/metrics")).text
        assert "waitroom_websocket_connections 1.0" in metrics
        assert f'waitroom_fans_waiting{{event="{event_id}"}} 1.0' in metrics
        assert "waitroom_broadcast_tick_seconds_count" in metrics


async def test_the_server_stops_cleanly_with_websockets_open(settings: Settings) -> None:
    with running(settings) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            event_id = await new_event(http)
            tokens = [(await new_fan(http, event_id))[0] for _ in range(3)]
        sockets = [await fan_ws(server, event_id, t) for t in tokens]
        for ws in sockets:
            await receive(ws)
        await asyncio.to_thread(server.stop)
        assert not server.thread.is_alive()
        for ws in sockets:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            await ws.close()


# --- the broadcaster and the send path, in process ----------------------------------------


@pytest.fixture
async def rooms(settings: Settings) -> AsyncIterator[Rooms]:
    pool: asyncpg.Pool[Any] = await create_pool(settings)
    async with redis_client(settings) as client:
        value = Rooms(client, pool, Keys(settings.redis_prefix))
        try:
            yield value
        finally:
            await value.close()
            await pool.close()


async def test_a_slow_connection_gets_only_the_latest_message() -> None:
    sub = Subscriber("e", "f")
    sent: list[str] = []
    unblock = asyncio.Event()

    async def slow_send(text: str) -> None:
        sent.append(text)
        await unblock.wait()

    sub.offer("one", 0)
    pumping = asyncio.create_task(pump(sub, slow_send))
    await asyncio.sleep(0.01)
    for text in ("two", "three", "four"):
        sub.offer(text, 0)  # never blocks, never queues
    assert sent == ["one"] and sub.pending == "four"
    unblock.set()
    await asyncio.sleep(0.01)
    sub.close((4404, "not in line"))
    assert await asyncio.wait_for(pumping, 1) == (4404, "not in line")
    assert sent == ["one", "four"]


async def test_a_connection_whose_client_left_sends_nothing_more() -> None:
    sub = Subscriber("e", "f")
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    sub.offer("pending", 0)
    sub.close(None)
    assert await pump(sub, send) is None
    assert sent == []


async def test_the_pump_writes_at_once_where_it_can_and_sends_through_asgi_otherwise() -> None:
    sub = Subscriber("e", "f")
    written: list[str] = []
    sent: list[str] = []

    def send_now(text: str) -> bool:
        if text == "two":  # a full buffer while the second message is due
            return False
        written.append(text)
        return True

    async def send(text: str) -> None:
        sent.append(text)

    sub.send_now = send_now
    pumping = asyncio.create_task(pump(sub, send))
    for text in ("one", "two", "three"):
        sub.offer(text, 0)
        await asyncio.sleep(0.01)
    sub.close((1000, "sold out"))
    assert await asyncio.wait_for(pumping, 1) == (1000, "sold out")
    assert written == ["one", "three"] and sent == ["two"]


async def test_an_offer_to_an_idle_pump_is_written_at_once_without_waking_it() -> None:
    sub = Subscriber("e", "f")
    written: list[str] = []
    sent: list[str] = []

    def send_now(text: str) -> bool:
        written.append(text)
        return True

    async def send(text: str) -> None:
        sent.append(text)

    sub.send_now = send_now
    sub.offer("first", 0)  # before the pump waits: pending, sent by the pump
    assert sub.pending == "first" and written == []
    pumping = asyncio.create_task(pump(sub, send))
    await asyncio.sleep(0.01)
    assert written == ["first"] and sub.waiter is not None
    waiter = sub.waiter
    for text in ("second", "third"):
        sub.offer(text, 0)
    # Written by the offers themselves: the pump still waits on the same future.
    assert written == ["first", "second", "third"] and sub.pending is None
    assert sub.waiter is waiter and not waiter.done()
    assert sub.latest == "third"
    sub.close((1000, "sold out"))
    assert await asyncio.wait_for(pumping, 1) == (1000, "sold out")
    assert sent == []


@pytest.mark.not_on_cluster  # MONITOR: one server's view of every command
async def test_a_tick_asks_redis_once_for_every_local_fan(
    rooms: Rooms, r: Redis, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    fans = [f"v_{i:032x}" for i in range(300)]
    now = time.time()
    for i, fan in enumerate(fans):
        await rooms.join(event_id, fan, now=now, ip=f"10.9.0.{i}", known_fan=False)
    hub = Hub(rooms)
    broadcaster = Broadcaster(hub, event_id)  # not started: ticked by hand below
    subs = [Subscriber(event_id, fan) for fan in fans]
    for sub in subs:
        broadcaster.add(sub)
    meta = Keys(rooms.keys.prefix).event(event_id).meta

    async with r.monitor() as monitor:
        await broadcaster.tick(now)
        marker = f"end-of-tick-{event_id}"
        await r.echo(marker)  # everything before the marker has been executed
        commands = []
        while True:
            entry = await monitor.next_command()
            if marker in entry["command"]:
                break
            commands.append(entry["command"])
    evalshas = [c for c in commands if c.startswith("EVALSHA") and meta in c]
    assert len(evalshas) == 1
    assert [json.loads(s.pending or "{}").get("position") for s in subs] == list(range(1, 301))

    # Nothing changed: nothing is handed over again...
    for sub in subs:
        sub.pending = None
    await broadcaster.tick(now + 1)
    assert all(sub.pending is None for sub in subs)
    # ...until a keep-alive is due.
    await broadcaster.tick(now + 16)
    assert all(sub.pending is not None for sub in subs)


async def _line_by_hand(
    rooms: Rooms, event_id: str, count: int, now: float, *, subnet: int, skip: int = 0
) -> tuple[list[str], Broadcaster, dict[str, Subscriber]]:
    """``count`` fans in line, and a broadcaster (not started: ticked by hand) with a
    subscriber for each but the first ``skip``."""
    fans = [f"v_{i:032x}" for i in range(count)]
    for i, fan in enumerate(fans):
        ip = f"10.{subnet}.{i >> 8}.{i & 255}"
        await rooms.join(event_id, fan, now=now, ip=ip, known_fan=False)
    broadcaster = Broadcaster(Hub(rooms), event_id)
    subs = {fan: Subscriber(event_id, fan) for fan in fans[skip:]}
    for sub in subs.values():
        broadcaster.add(sub)
    return fans, broadcaster, subs


async def test_every_fan_however_far_back_gets_each_new_position_at_the_next_tick(
    rooms: Rooms, http: httpx.AsyncClient
) -> None:
    """A fresh position at least every 2 s to every waiting fan (DESIGN.md): the far end of
    a long line is not skipped."""
    event_id = await new_event(http)
    count = 700
    fans = [f"v_{i:032x}" for i in range(count)]
    now = time.time()
    for i, fan in enumerate(fans):
        await rooms.join(event_id, fan, now=now, ip=f"10.8.{i >> 8}.{i & 255}", known_fan=False)
    broadcaster = Broadcaster(Hub(rooms), event_id)  # ticked by hand
    subs = {fan: Subscriber(event_id, fan) for fan in fans[2:]}
    for sub in subs.values():
        broadcaster.add(sub)
    await broadcaster.tick(now)
    assert all(sub.pending is not None for sub in subs.values())  # the first figure: at once
    for step, tick_at in enumerate((now + 1, now + 2), start=1):
        for sub in subs.values():
            sub.pending = None
        await rooms.leave(event_id, fans[step - 1])  # everyone moves up one place
        await broadcaster.tick(tick_at)
        moved = [json.loads(sub.pending)["position"] for sub in subs.values() if sub.pending]
        assert moved == list(range(3 - step, count + 1 - step))


async def _admit(r: Redis, rooms: Rooms, event_id: str, fan_id: str) -> str:
    """What the admission loop writes for one fan (see test_paused_sold_out_and_admitted...)."""
    ek = Keys(rooms.keys.prefix).event(event_id)
    claims = PassClaims("waitroom", fan_id, event_id, f"j-{fan_id}", 1, 1, 1800000000, 1)
    the_pass = PassKeys(Ed25519PrivateKey.generate()).sign(claims)
    await r.zrem(ek.queue, fan_id)
    await r.hset(ek.admitted, fan_id, the_pass)
    await r.hincrby(ek.meta, "admitted_total", 1)
    return the_pass


async def test_the_front_hears_of_its_admission_between_ticks_and_only_of_that(
    rooms: Rooms, r: Redis, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    count = FRONT_MIN_PLACES + 20
    now = time.time()
    fans, broadcaster, subs = await _line_by_hand(rooms, event_id, count, now, subnet=7)
    await broadcaster.tick(now)
    # The rate is unknown yet: the front is the first FRONT_MIN_PLACES places.
    assert broadcaster.front == set(fans[:FRONT_MIN_PLACES])
    for sub in subs.values():
        sub.pending = None
    first_pass = await _admit(r, rooms, event_id, fans[0])
    last_pass = await _admit(r, rooms, event_id, fans[-1])  # admitted from far back
    await broadcaster.front_tick(now + 0.2)
    handed = {fan: json.loads(sub.pending) for fan, sub in subs.items() if sub.pending}
    # Only the admitted fan of the front; nobody's position moves between ticks.
    assert handed == {fans[0]: {"type": "admitted", "pass": first_pass, "expires_at": 1800000000}}
    assert fans[0] not in broadcaster.front
    # The tick tells the rest, the admitted fan far back among them, and nothing twice.
    subs[fans[0]].pending = None
    await broadcaster.tick(now + 1)
    assert subs[fans[0]].pending is None
    assert json.loads(subs[fans[-1]].pending or "{}").get("pass") == last_pass
    assert json.loads(subs[fans[1]].pending or "{}").get("position") == 1


async def test_a_running_broadcaster_hands_the_pass_over_before_its_next_tick(
    rooms: Rooms, r: Redis, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    fan = "v_" + "6" * 32
    await rooms.join(event_id, fan, now=time.time(), ip="10.0.0.6", known_fan=False)
    hub = Hub(rooms, tick_s=2.0, front_tick_s=0.05)
    sub = hub.subscribe(event_id, fan)
    try:
        await asyncio.wait_for(sub.wait(), 10)  # the first tick: the fan's position
        assert json.loads(sub.pending or "{}")["position"] == 1
        sub.pending = None
        broadcaster = hub._broadcasters[event_id]
        ticks = broadcaster._ticks
        the_pass = await _admit(r, rooms, event_id, fan)
        await asyncio.wait_for(sub.wait(), 10)
        assert json.loads(sub.pending or "{}")["pass"] == the_pass
        assert broadcaster._ticks == ticks  # a look at the front did it, not the next tick
    finally:
        await hub.close()


async def test_the_sold_out_tick_closes_the_sockets_a_chunk_at_a_time(
    rooms: Rooms, r: Redis, http: httpx.AsyncClient
) -> None:
    """Each close wakes a connection that then sends and closes: all of a node's sockets
    woken in one loop turn held its loop for 130 ms in the cluster benchmark."""
    event_id = await new_event(http)
    count = 2 * HANDOVER_CHUNK + 10
    fans = [f"v_{i:032x}" for i in range(count)]
    now = time.time()
    for i, fan in enumerate(fans):
        await rooms.join(event_id, fan, now=now, ip=f"10.6.{i >> 8}.{i & 255}", known_fan=False)
    broadcaster = Broadcaster(Hub(rooms), event_id)  # ticked by hand
    subs = [Subscriber(event_id, fan) for fan in fans]
    for sub in subs:
        broadcaster.add(sub)
    await r.hset(Keys(rooms.keys.prefix).event(event_id).meta, "sold_out", "1")
    tick = asyncio.create_task(broadcaster.tick(now))
    closed_at_each_turn = set()
    while not tick.done():
        closed_at_each_turn.add(sum(sub.closed for sub in subs))
        await asyncio.sleep(0)
    await tick
    assert all(sub.close_with == (1000, "sold out") for sub in subs)
    # Some turns of the loop saw part of them closed: the closes came a chunk at a time.
    assert any(0 < closed < count for closed in closed_at_each_turn), closed_at_each_turn


async def test_broadcasters_stop_when_their_last_subscriber_leaves(
    rooms: Rooms, http: httpx.AsyncClient
) -> None:
    event_id = await new_event(http)
    await rooms.join(event_id, "v_" + "5" * 32, now=time.time(), ip="10.0.0.5", known_fan=False)
    hub = Hub(rooms, tick_s=0.05)
    sub = hub.subscribe(event_id, "v_" + "5" * 32)
    await asyncio.wait_for(sub.wait(), 2)
    assert hub.subscribers(event_id) == 1
    hub.unsubscribe(sub)
    await asyncio.sleep(0.2)
    assert hub.subscribers(event_id) == 0 and not hub._broadcasters
    again = hub.subscribe(event_id, "v_" + "5" * 32)
    await hub.close()
    assert again.closed and again.close_with == (1001, "server shutting down")
