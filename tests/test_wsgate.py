"""The queue WebSocket's defences: each attack fails, over real sockets to a real server, and
an honest fan next to it is not disturbed.

Addresses: Linux routes all of 127.0.0.0/8 to loopback, so a client that binds 127.0.0.x
reaches the server (on 127.0.0.1) from a real address of its own, no forwarded header needed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.harness import ADMIN_TOKEN, ServerThread, running
from tests.queue_support import create_event, fan_headers, new_ip, redis_client
from tests.test_errors import assert_error
from waitroom.core.keys import Keys
from waitroom.core.redis import Multiplexer
from waitroom.core.settings import Settings
from waitroom.line.ratelimit import ADDRESS_REQUESTS
from waitroom.line.wsgate import TICKET_TTL_S, AddressSlots, WsGate, origin_allowed

pytestmark = pytest.mark.anyio
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LISTED = "https://tickets.example.com"
#: Sockets one address may hold in the module's server (small, to reach it in a test).
PER_ADDRESS = 5

# --- the origin rule and the address slots, pure --------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        (None, "waitroom.example", (), True),  # not a browser
        ("https://waitroom.example", "waitroom.example", (), True),
        ("https://waitroom.example", "waitroom.example:443", (), True),
        ("http://waitroom.example:8000", "waitroom.example:8000", (), True),
        ("HTTPS://WaitRoom.Example", "waitroom.example", (), True),
        ("http://[::1]:8000", "[::1]:8000", (), True),
        ("https://evil.example", "waitroom.example", (), False),
        ("https://waitroom.example.evil.example", "waitroom.example", (), False),
        ("http://waitroom.example:8001", "waitroom.example:8000", (), False),
        ("https://waitroom.example", "waitroom.example:8443", (), False),
        ("null", "waitroom.example", (), False),
        ("https://waitroom.example", None, (), False),
        ("garbage", "waitroom.example", (), False),
        (LISTED, "waitroom.example", (LISTED,), True),
        (LISTED + ":443", "waitroom.example", (LISTED,), True),
        ("http://tickets.example.com", "waitroom.example", (LISTED,), False),
        ("https://evil.example", "waitroom.example", (LISTED,), False),
        ("https://evil.example", "waitroom.example", ("*",), True),
        ("null", "waitroom.example", ("*",), True),
    ],
)
def test_origins_pass_when_same_as_the_host_or_listed(
    origin: str | None, host: str | None, allowed: tuple[str, ...], expected: bool
) -> None:
    assert origin_allowed(origin, host, allowed) is expected


def test_address_slots_count_up_to_the_cap_and_free_on_leave() -> None:
    slots = AddressSlots(2)
    assert slots.enter("a") and slots.enter("a")
    assert not slots.enter("a")  # refused, and not counted
    assert slots.enter("b")
    slots.leave("a")
    assert slots.count("a") == 1 and slots.enter("a")
    for _ in range(2):
        slots.leave("a")
    assert slots.count("a") == 0 and slots._open == {"b": 1}  # nothing kept per idle address


# --- tickets, on real Redis ------------------------------------------------------------------


@pytest.fixture
async def gate(settings: Settings) -> AsyncIterator[WsGate]:
    mux = Multiplexer(settings.redis_url, timeout=2.0)
    try:
        yield WsGate(mux, Keys(settings.redis_prefix))
    finally:
        await mux.aclose()


async def test_a_ticket_stands_for_its_fan_on_its_event_once(
    gate: WsGate, settings: Settings
) -> None:
    ticket = await gate.issue_ticket("ev-a", "v_fan")
    async with redis_client(settings) as r:
        ttl = await r.pttl(Keys(settings.redis_prefix).event("ev-a").ws_ticket(ticket))
    assert 0 < ttl <= TICKET_TTL_S * 1000
    assert await gate.issue_ticket("ev-a", "v_fan") != ticket  # a new one every time
    assert await gate.redeem("ev-b", ticket) is None  # another event's
    assert await gate.redeem("ev-a", ticket) == "v_fan"
    assert await gate.redeem("ev-a", ticket) is None  # used
    assert await gate.redeem("ev-a", "x" * 31 + "}") is None  # not a ticket's shape


# --- over real sockets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(settings: Settings) -> Iterator[ServerThread]:
    """A server with an allowlisted origin and a small per-address cap."""
    configured = msgspec.structs.replace(
        settings, allowed_origins=(LISTED,), ws_max_per_address=PER_ADDRESS
    )
    with running(configured) as server:
        yield server


@pytest.fixture
async def http(guarded: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.url, timeout=10) as client:
        yield client


@pytest.fixture
async def r(settings: Settings) -> AsyncIterator[Redis]:
    async with redis_client(settings) as client:
        yield client


def new_event(server: ServerThread) -> str:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=10) as admin:
        return create_event(admin, prefix="wg")


async def new_fan(http: httpx.AsyncClient, event_id: str) -> str:
    """Join as a new visitor; its token."""
    response = await http.post(
        f"/v1/events/{event_id}/queue", headers={"X-Forwarded-For": new_ip()}
    )
    http.cookies.clear()
    assert response.status_code == 201, response.text
    token: str = response.json()["visitor_token"]
    return token


async def leave(http: httpx.AsyncClient, event_id: str, token: str) -> None:
    response = await http.delete(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))
    assert response.status_code == 200, response.text


def url(server: ServerThread, event_id: str, query: str = "") -> str:
    return f"{server.ws_url}/v1/events/{event_id}/queue/ws{query}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def first_message(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return message


async def closed(ws: ClientConnection) -> tuple[int, str]:
    """The code and reason the server closes ``ws`` with (messages before it are skipped)."""
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    received = caught.value.rcvd
    assert received is not None, "closed without a close frame"
    return received.code, received.reason


async def handshake(address: str, **kwargs: Any) -> tuple[int, str] | str:
    """ "open" when the socket brings a first message, else the code and reason it closed with."""
    async with connect(address, open_timeout=5, **kwargs) as ws:
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            return closed.rcvd.code, closed.rcvd.reason
    return "open"


async def refused(address: str, **kwargs: Any) -> tuple[int, str]:
    async with connect(address, open_timeout=5, **kwargs) as ws:
        return await closed(ws)


async def test_a_page_of_another_site_is_refused_4403_while_own_and_listed_origins_pass(
    guarded: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = new_event(guarded)
    token = await new_fan(http, event_id)
    at = url(guarded, event_id)
    # Cross-site WebSocket hijacking: the victim's browser would send the cookie along.
    for evil in ("https://evil.example", "null", f"http://127.0.0.1:{guarded.port + 1}"):
        cookie_and_origin = {"Cookie": f"wr_visitor={token}", "Origin": evil}
        assert await refused(at, additional_headers=cookie_and_origin) == (
            4403,
            "origin not allowed",
        )
    for origin in (f"http://127.0.0.1:{guarded.port}", LISTED, None):
        headers = {"Cookie": f"wr_visitor={token}"} | ({"Origin": origin} if origin else {})
        async with connect(at, additional_headers=headers) as ws:
            assert (await first_message(ws))["position"] == 1


async def test_a_fans_fourth_socket_replaces_the_oldest_with_4409(
    guarded: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = new_event(guarded)
    ahead = await new_fan(http, event_id)
    token, neighbour = await new_fan(http, event_id), await new_fan(http, event_id)
    at = url(guarded, event_id)
    sockets = [await connect(at, additional_headers=bearer(token)) for _ in range(4)]
    other = await connect(at, additional_headers=bearer(neighbour))
    try:
        oldest, *kept = sockets
        assert (await first_message(oldest))["position"] == 2
        assert await closed(oldest) == (4409, "replaced by a newer connection of the same fan")
        for ws in kept:
            assert (await first_message(ws))["position"] == 2
        assert (await first_message(other))["position"] == 3
        await leave(http, event_id, ahead)
        # The three newest and the neighbour stay live: the next tick reaches them all.
        for ws in kept:
            assert (await first_message(ws))["position"] == 1
        assert (await first_message(other))["position"] == 2
    finally:
        for ws in [*sockets, other]:
            await ws.close()


async def test_an_address_at_its_socket_cap_is_refused_4429_and_others_are_not(
    guarded: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = new_event(guarded)
    tokens = [await new_fan(http, event_id) for _ in range(PER_ADDRESS + 1)]
    at = url(guarded, event_id)
    farm = ("127.0.0.3", 0)
    held = [
        await connect(at, additional_headers=bearer(t), local_addr=farm)
        for t in tokens[:PER_ADDRESS]
    ]
    try:
        for ws in held:
            await first_message(ws)
        extra: dict[str, Any] = {"additional_headers": bearer(tokens[-1]), "local_addr": farm}
        assert await refused(at, **extra) == (4429, "too many connections from your address")
        # A fan at another address is not counted with them.
        async with connect(
            at, additional_headers=bearer(tokens[-1]), local_addr=("127.0.0.4", 0)
        ) as ws:
            assert "position" in await first_message(ws)
        # A slot comes back when a socket closes.
        await held.pop().close()
        await asyncio.sleep(0.2)
        async with connect(at, **extra) as ws:
            assert "position" in await first_message(ws)
    finally:
        for ws in held:
            await ws.close()


async def test_an_address_opening_sockets_too_fast_is_limited_across_tickets_and_handshakes(
    guarded: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = new_event(guarded)
    token = await new_fan(http, event_id)
    path = f"/v1/events/{event_id}/queue/ws-ticket"
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.5")
    async with httpx.AsyncClient(base_url=guarded.url, transport=transport) as farm:
        issued = 0
        while issued < 3000:
            answer = await farm.post(path, headers=bearer(token))
            if answer.status_code != 200:
                break
            issued += 1
    # A burst of at least the bucket's passes (a crowd behind one address reconnecting at
    # once), then it runs dry.
    assert ADDRESS_REQUESTS.burst <= issued < 3000
    error = assert_error(answer, 429, "rate_limited")
    assert float(answer.headers["retry-after"]) > 0
    assert error["details"]["limit"] == ADDRESS_REQUESTS.burst
    # A handshake without a ticket pays from the same bucket: one that finds it dry (the
    # bucket refills at 50/s, so the first few may find a token) is refused.
    for _ in range(ADDRESS_REQUESTS.burst):
        outcome = await handshake(
            url(guarded, event_id), additional_headers=bearer(token), local_addr=("127.0.0.5", 0)
        )
        if outcome != "open":
            break
    assert outcome[0] == 4429
    assert outcome[1].startswith("too many connections from your address; retry in")
    # Another address is not affected.
    honest = httpx.AsyncHTTPTransport(local_address="127.0.0.6")
    async with httpx.AsyncClient(base_url=guarded.url, transport=honest) as own:
        answer = await own.post(path, headers=bearer(token))
    assert answer.status_code == 200, answer.text
    async with connect(f"{guarded.ws_url}{answer.json()['url']}") as ws:
        assert (await first_message(ws))["position"] == 1


async def test_a_data_frame_from_a_fan_closes_the_socket_1008(
    guarded: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = new_event(guarded)
    talker, listener = await new_fan(http, event_id), await new_fan(http, event_id)
    at = url(guarded, event_id)
    async with connect(at, additional_headers=bearer(listener)) as honest:
        assert (await first_message(honest))["position"] == 2
        for frame in ("hello", b"\x00" * 10):
            async with connect(at, additional_headers=bearer(talker)) as ws:
                await first_message(ws)
                await ws.send(frame)
                assert await closed(ws) == (1008, "fans only listen: data frames are not accepted")
        await leave(http, event_id, talker)
        assert (await first_message(honest))["position"] == 1  # still live


async def test_a_ticket_opens_one_socket_for_its_fan_and_event_only(
    guarded: ServerThread, http: httpx.AsyncClient, r: Redis, settings: Settings
) -> None:
    event_id, other_event = new_event(guarded), new_event(guarded)
    await new_fan(http, event_id)
    token = await new_fan(http, event_id)
    await new_fan(http, other_event)

    response = await http.post(f"/v1/events/{event_id}/queue/ws-ticket", headers=bearer(token))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["expires_in_s"] == TICKET_TTL_S
    assert body["url"] == f"/v1/events/{event_id}/queue/ws?ticket={body['ticket']}"
    assert response.headers["cache-control"] == "no-store"
    # No cookie and no header: the ticket alone says who this is.
    async with connect(f"{guarded.ws_url}{body['url']}") as ws:
        assert (await first_message(ws))["position"] == 2
    replayed = await refused(f"{guarded.ws_url}{body['url']}")
    assert replayed == (4401, "ticket invalid, expired or already used")

    fresh = (
        await http.post(f"/v1/events/{event_id}/queue/ws-ticket", headers=bearer(token))
    ).json()
    wrong_event = url(guarded, other_event, f"?ticket={fresh['ticket']}")
    assert (await refused(wrong_event))[0] == 4401

    late = (await http.post(f"/v1/events/{event_id}/queue/ws-ticket", headers=bearer(token))).json()
    await r.delete(Keys(settings.redis_prefix).event(event_id).ws_ticket(late["ticket"]))
    assert (await refused(f"{guarded.ws_url}{late['url']}"))[0] == 4401  # as when expired
    forged = url(guarded, event_id, "?ticket=" + secrets.token_urlsafe(24))
    assert (await refused(forged))[0] == 4401

    assert_error(await http.post(f"/v1/events/{event_id}/queue/ws-ticket"), 401, "identity_missing")
    assert_error(
        await http.post("/v1/events/Not%20An%20Id/queue/ws-ticket", headers=bearer(token)),
        404,
        "event_not_found",
    )


async def test_a_token_in_the_url_is_refused_and_says_what_to_use(
    guarded: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = new_event(guarded)
    token = await new_fan(http, event_id)
    code, reason = await refused(url(guarded, event_id, f"?token={token}"))
    assert code == 4401 and "ticket" in reason and "Authorization" in reason
    # Refused even beside a good cookie: an old client must learn, not limp along.
    with_cookie = {"Cookie": f"wr_visitor={token}"}
    code, _ = await refused(
        url(guarded, event_id, f"?token={token}"), additional_headers=with_cookie
    )
    assert code == 4401


async def test_refusals_are_counted_by_close_code(
    guarded: ServerThread, http: httpx.AsyncClient
) -> None:
    event_id = new_event(guarded)
    await refused(url(guarded, event_id), additional_headers={"Origin": "https://evil.example"})
    metrics = (await http.get("/metrics")).text
    assert 'waitroom_websocket_server_closes_total{code="4403"}' in metrics


async def test_the_ticket_route_is_in_the_openapi_document(http: httpx.AsyncClient) -> None:
    document = (await http.get("/openapi.json")).json()
    operation = document["paths"]["/v1/events/{event_id}/queue/ws-ticket"]["post"]
    assert {"200", "401", "404", "429", "503"} <= set(operation["responses"])
    schema = document["components"]["schemas"]["WsTicket"]
    assert set(schema["required"]) == {"ticket", "expires_in_s", "url"}
