"""Three ``waitroom serve`` nodes behind a real HAProxy, on a real Redis Cluster (issue 13).

The module starts a private 6-node Redis Cluster (``scripts/services --cluster`` in a
temporary ``SERVICES_RUN_DIR``, never the machine's Redis) and, on it and a fresh database,
three nodes, the workers and the mock provider behind HAProxy rendered from
``deploy/haproxy.cfg`` (:mod:`stress.nodes`). Fans speak only to the load balancer, so any
of their requests may land on any node (HAProxy names the node that answered in
``X-Waitroom-Node``, and the tests check that all three did). What must hold:

- joins, positions, leaves, admission and reservations work whichever node answers, and
  fans are admitted exactly in join order;
- an event's inventory actor lives on one node (its lease in Redis names that process) and
  the others forward to it;
- when that node is killed (SIGKILL) mid-sale another owns the event within 3 s, measured
  from the kill to the first successful reservation through the load balancer, with no 5xx
  but 503 and nothing oversold;
- when a node is stopped (SIGTERM) while fans hold WebSockets through HAProxy, its sockets
  close with 1012 (service restart), and fans reconnecting through the load balancer (a
  script, and the real waiting page in Chromium) keep their place.

Each test leaves the three nodes running for the next.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import websockets
from playwright.async_api import ConsoleMessage, async_playwright, expect
from playwright.async_api import WebSocket as PageSocket

from stress.nodes import NODE_HEADER, Node, Nodes, running_nodes
from stress.private_services import private_cluster
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS
from tests.harness import async_redis, base_settings
from waitroom.core.keys import Keys

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    # It starts a cluster of its own: the --cluster pass need not run it again.
    pytest.mark.not_on_cluster,
    pytest.mark.timeout(300),
]

#: The longest an event may go without an owner after its owner node dies (issue 13).
FAILOVER_S = 3.0
#: Close codes that tell the waiting page to reconnect: service restart, going away.
RECONNECT_CODES = (1012, 1001)


# --- the stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis Cluster (3 primaries, 3 replicas) for the module: its URL."""
    with private_cluster(tmp_path_factory.mktemp("nodes-cluster")) as url:
        yield url


@pytest.fixture(scope="module")
async def nodes(cluster_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Nodes]:
    # The actor is hosted by the first reservation's node, not warmed by the admission
    # leader's (ADR 0022): these tests count where reservations land and are forwarded, and
    # where sockets go while every node has an equal share of the line.
    settings = msgspec.structs.replace(
        base_settings(),
        admission_loop=True,
        challenge=False,
        log_level="warning",
        warm_inventory=False,
    )
    async with running_nodes(
        settings, tmp_path_factory.mktemp("nodes-run"), count=3, redis_url=cluster_url
    ) as running:
        yield running


@pytest.fixture
async def lb_admin(nodes: Nodes) -> AsyncIterator[httpx.AsyncClient]:
    """The operators' client, through the load balancer."""
    async with httpx.AsyncClient(
        base_url=nodes.url, headers=nodes.admin_headers, timeout=10
    ) as client:
        yield client


# --- fans ----------------------------------------------------------------------------------


@dataclass
class Calls:
    """Every answer the fans got: (route, status, node, started, ended)."""

    rows: list[tuple[str, int, str, float, float]] = field(default_factory=list)

    def nodes(self, route: str) -> set[str]:
        return {node for r, _, node, _, _ in self.rows if r == route}

    def server_errors(self) -> list[tuple[str, int, str]]:
        """Answers 5xx other than 503 (HAProxy's 502 and 504 included)."""
        return [(r, s, n) for r, s, n, _, _ in self.rows if s >= 500 and s != 503]


class Fan:
    """One fan, with its own connection to the load balancer and its own address."""

    def __init__(self, nodes: Nodes, event_id: str, calls: Calls) -> None:
        self.event_id = event_id
        self.calls = calls
        self.ip = f"198.51.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
        self.http = httpx.AsyncClient(
            base_url=nodes.url, timeout=15, headers={"X-Forwarded-For": self.ip}
        )
        self.ws_base = nodes.ws_url
        self.origin = nodes.url
        self.fan_id = ""
        self.token = ""
        self.queue_pass = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def call(self, route: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a connection closed without an answer is sent again, as browsers do.

        HAProxy closes a fan's kept-alive connection, without a word, when the node behind
        it dies with the fan's request unanswered (it cannot know whether the node applied
        it): the client is to send it again (RFC 9112, 9.3.1), which waitroom's writes
        allow by their Idempotency-Key. Such a close is recorded with status 0.
        """
        for attempt in range(3):
            started = time.monotonic()
            try:
                response = await self.http.request(method, path, **kwargs)
            except (httpx.RemoteProtocolError, httpx.ConnectError):
                self.calls.rows.append((route, 0, "", started, time.monotonic()))
                if attempt == 2:
                    raise
                continue
            self.calls.rows.append(
                (
                    route,
                    response.status_code,
                    response.headers.get(NODE_HEADER, ""),
                    started,
                    time.monotonic(),
                )
            )
            return response
        raise AssertionError("unreachable")

    async def join(self) -> dict[str, Any]:
        response = await self.call("join", "POST", f"/v1/events/{self.event_id}/queue")
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        self.fan_id, self.token = body["fan_id"], body["visitor_token"]
        return body

    async def me(self) -> dict[str, Any]:
        response = await self.call(
            "me", "GET", f"/v1/events/{self.event_id}/queue/me", headers=self.headers
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def leave(self) -> None:
        response = await self.call(
            "leave", "DELETE", f"/v1/events/{self.event_id}/queue/me", headers=self.headers
        )
        assert response.status_code == 200, response.text

    async def admitted(self, timeout: float = 30.0) -> str:
        """Poll until admitted; the pass."""
        deadline = time.monotonic() + timeout
        while True:
            body = await self.me()
            if body["status"] == "admitted":
                self.queue_pass = body["queue_pass"]
                return self.queue_pass
            assert time.monotonic() < deadline, f"not admitted within {timeout} s: {body}"
            await asyncio.sleep(0.2)

    async def reserve(self, key: str) -> httpx.Response:
        return await self.call(
            "reserve",
            "POST",
            f"/v1/events/{self.event_id}/reservations",
            json={"ticket_type": "ga", "quantity": 1},
            headers={**self.headers, "X-Queue-Pass": self.queue_pass, "Idempotency-Key": key},
        )

    async def websocket(self) -> websockets.ClientConnection:
        """A WebSocket through the load balancer, with a one-time ticket."""
        response = await self.call(
            "ws-ticket", "POST", f"/v1/events/{self.event_id}/queue/ws-ticket", headers=self.headers
        )
        assert response.status_code == 200, response.text
        return await websockets.connect(
            self.ws_base + response.json()["url"],
            additional_headers={"X-Forwarded-For": self.ip, "Origin": self.origin},
        )

    async def aclose(self) -> None:
        await self.http.aclose()


@pytest.fixture
async def calls() -> AsyncIterator[Calls]:
    record = Calls()
    yield record
    assert record.server_errors() == []


async def create_event(
    admin: httpx.AsyncClient,
    *,
    quantity: int,
    rate: float,
    max_active: int = 1000,
    paused: bool = False,
) -> str:
    event_id = f"n-{uuid.uuid4().hex[:10]}"
    response = await admin.post(
        "/v1/admin/events",
        json={
            "id": event_id,
            "name": "Several nodes",
            "ticket_types": [
                {"name": "ga", "quantity": quantity, "price_minor": 1000, "currency": "EUR"}
            ],
            "room": {"rate_per_second": rate, "max_active": max_active, "pass_ttl_s": 900},
        },
    )
    assert response.status_code == 201, response.text
    if paused:
        patch = await admin.patch(f"/v1/admin/events/{event_id}/admission", json={"paused": True})
        assert patch.status_code == 200, patch.text
    return event_id


async def sale_counts(nodes: Nodes, event_id: str) -> tuple[int, int, int, int]:
    """(quantity, held, sold, hold rows) of the event's ticket type, from PostgreSQL."""
    conn = await asyncpg.connect(nodes.settings.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT quantity, held, sold FROM ticket_types WHERE event_id = $1", event_id
        )
        holds = await conn.fetchval(
            "SELECT coalesce(sum(quantity), 0) FROM holds WHERE event_id = $1"
            " AND status IN ('held', 'paid')",
            event_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["quantity"]), int(row["held"]), int(row["sold"]), int(holds)


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def established_to(port: int) -> int:
    """TCP connections established to ``port`` on this machine (``/proc/net/tcp``)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        count += state == "01" and int(local.rsplit(":", 1)[1], 16) == port
    return count


async def node_metric(node: Node, name: str, labels: str = "") -> float:
    """One figure of the node's /metrics, asked of the node itself (not through HAProxy)."""
    async with httpx.AsyncClient(timeout=5) as http:
        return metric((await http.get(f"{node.url}/metrics")).text, name, labels)


# --- the tests -----------------------------------------------------------------------------


async def test_fans_are_served_by_every_node_and_admitted_in_join_order(
    nodes: Nodes, lb_admin: httpx.AsyncClient, calls: Calls
) -> None:
    event_id = await create_event(lb_admin, quantity=100, rate=25, paused=True)
    fans = [Fan(nodes, event_id, calls) for _ in range(30)]
    try:
        # One after another, so that the join order is known.
        positions = [(await fan.join())["position"] for fan in fans]
        assert positions == list(range(1, 31))
        # Each fan asks for its place three times; round-robin sends the asks everywhere.
        for _ in range(3):
            seen = await asyncio.gather(*(fan.me() for fan in fans))
            assert [body["position"] for body in seen] == list(range(1, 31))
        leavers = {fans[4].fan_id, fans[11].fan_id}
        for fan in fans:
            if fan.fan_id in leavers:
                await fan.leave()
        staying = [fan for fan in fans if fan.fan_id not in leavers]
        seen = await asyncio.gather(*(fan.me() for fan in staying))
        assert [body["position"] for body in seen] == list(range(1, 29))

        resumed = await lb_admin.patch(
            f"/v1/admin/events/{event_id}/admission", json={"paused": False}
        )
        assert resumed.status_code == 200, resumed.text
        await asyncio.gather(*(fan.admitted() for fan in staying))
        # Reservations through the load balancer: every one succeeds, whichever node it
        # reaches, although only one node hosts the event's inventory.
        replies = await asyncio.gather(*(fan.reserve(uuid.uuid4().hex) for fan in staying))
        assert [r.status_code for r in replies] == [201] * len(staying), [
            r.text for r in replies if r.status_code != 201
        ]
    finally:
        await asyncio.gather(*(fan.aclose() for fan in fans))

    names = {node.name for node in nodes.nodes}
    for route in ("join", "me", "leave", "reserve"):
        assert calls.nodes(route) <= names
    for route in ("join", "me", "reserve"):
        assert calls.nodes(route) == names, (route, calls.nodes(route))

    # Admitted exactly in join order, across the nodes' admission loops: in Redis...
    ek = Keys(nodes.settings.redis_prefix).event(event_id)
    redis = async_redis(nodes.settings.redis_url)
    try:
        order = [
            f.decode() if isinstance(f, bytes) else f for f in await redis.lrange(ek.order, 0, -1)
        ]
    finally:
        await redis.aclose()
    assert order == [fan.fan_id for fan in staying]
    # ... and in PostgreSQL's record of the passes.
    conn = await asyncpg.connect(nodes.settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT fan_id FROM queue_passes WHERE event_id = $1 ORDER BY seq", event_id
        )
        owner_row = await conn.fetchrow(
            "SELECT epoch, owner FROM inventory_owners WHERE event_id = $1", event_id
        )
    finally:
        await conn.close()
    assert [r["fan_id"] for r in rows] == [fan.fan_id for fan in staying]

    # One owner: the lease in Redis names one node's process, the fencing row agrees, and
    # the other two forwarded their share of the reservations to it.
    owner = await nodes.owner(event_id)
    assert owner is not None, await nodes.owner_lease(event_id)
    assert owner_row is not None and owner_row["owner"] == await nodes.owner_lease(event_id)
    forwarded = {
        node.name: await node_metric(node, "waitroom_inventory_forwarded_total", '{outcome="ok"}')
        for node in nodes.nodes
    }
    assert all(forwarded[node.name] > 0 for node in nodes.nodes if node is not owner), forwarded
    quantity, held, sold, holds = await sale_counts(nodes, event_id)
    assert held + sold == holds == len(staying) <= quantity


async def test_a_fans_checkout_goes_straight_to_the_node_hosting_the_actor(
    nodes: Nodes, lb_admin: httpx.AsyncClient, calls: Calls
) -> None:
    """Owner affinity (issue 14, ADR 0017): once a fan knows the owner (the cookie on its
    admitted status), HAProxy sends its reservations to that node: nothing is forwarded."""
    event_id = await create_event(lb_admin, quantity=100, rate=50)
    fans = [Fan(nodes, event_id, calls) for _ in range(12)]
    try:
        for fan in fans:
            await fan.join()
        await asyncio.gather(*(fan.admitted() for fan in fans))
        # The first reservation makes some node the owner (whichever HAProxy picked).
        first = await fans[0].reserve(uuid.uuid4().hex)
        assert first.status_code == 201, first.text
        owner = await nodes.owner(event_id)
        assert owner is not None, await nodes.owner_lease(event_id)
        # Each fan's status, asked through the balancer, names the owner in its cookie
        # (httpx keeps it for the fan's next requests, as a browser does).
        for fan in fans[1:]:
            await fan.me()
            assert fan.http.cookies.get("waitroom_node") == owner.name, fan.http.cookies
        before = {
            node.name: await node_metric(
                node, "waitroom_inventory_forwarded_total", '{outcome="ok"}'
            )
            for node in nodes.nodes
        }
        replies = [await fan.reserve(uuid.uuid4().hex) for fan in fans[1:]]
        assert [r.status_code for r in replies] == [201] * len(replies), [r.text for r in replies]
        assert {r.headers.get(NODE_HEADER) for r in replies} == {owner.name}
        after = {
            node.name: await node_metric(
                node, "waitroom_inventory_forwarded_total", '{outcome="ok"}'
            )
            for node in nodes.nodes
        }
        assert after == before
        # A cookie naming another node (stale, or forged) is only a hint: that node
        # forwards, and its answer names the owner again.
        other = next(node for node in nodes.nodes if node is not owner and node.alive)
        late = Fan(nodes, event_id, calls)
        fans.append(late)
        await late.join()
        await late.admitted()
        late.http.cookies.clear()
        late.http.cookies.set(
            "waitroom_node",
            other.name,
            domain="127.0.0.1",
            path=f"/v1/events/{event_id}/reservations",
        )
        reply = await late.reserve(uuid.uuid4().hex)
        assert reply.status_code == 201, reply.text
        assert reply.headers.get(NODE_HEADER) == other.name
        assert late.http.cookies.get("waitroom_node") == owner.name
    finally:
        await asyncio.gather(*(fan.aclose() for fan in fans))
    quantity, held, sold, holds = await sale_counts(nodes, event_id)
    assert held + sold == holds == len(fans) <= quantity


async def test_the_waiting_page_learns_the_owner_before_it_goes_to_checkout(
    nodes: Nodes, lb_admin: httpx.AsyncClient, calls: Calls
) -> None:
    """Admitted over the WebSocket (whose messages cannot set cookies), the real page asks
    for its status once before leaving for checkout: the browser then holds the cookie
    that sends its reservations to the node hosting the actor."""
    event_id = await create_event(lb_admin, quantity=10, rate=50, paused=True)
    # Someone has reserved already: the event has an owner.
    buyer = Fan(nodes, event_id, calls)
    try:
        await buyer.join()
        resumed = await lb_admin.patch(
            f"/v1/admin/events/{event_id}/admission", json={"paused": False}
        )
        assert resumed.status_code == 200, resumed.text
        await buyer.admitted()
        assert (await buyer.reserve(uuid.uuid4().hex)).status_code == 201
        paused = await lb_admin.patch(
            f"/v1/admin/events/{event_id}/admission", json={"paused": True}
        )
        assert paused.status_code == 200, paused.text
    finally:
        await buyer.aclose()
    owner = await nodes.owner(event_id)
    assert owner is not None, await nodes.owner_lease(event_id)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        context = await browser.new_context(base_url=nodes.url)
        page = await context.new_page()
        await page.goto(f"/events/{event_id}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        assert not [c for c in await context.cookies() if c["name"] == "waitroom_node"]
        resumed = await lb_admin.patch(
            f"/v1/admin/events/{event_id}/admission", json={"paused": False}
        )
        assert resumed.status_code == 200, resumed.text
        await page.wait_for_url(re.compile(rf".*/events/{event_id}/checkout$"), timeout=15_000)
        cookies = {c["name"]: c["value"] for c in await context.cookies()}
        assert cookies.get("waitroom_node") == owner.name, cookies
        await context.close()
        await browser.close()


async def test_the_owner_killed_mid_sale_is_replaced_within_3_s(
    nodes: Nodes, lb_admin: httpx.AsyncClient, calls: Calls
) -> None:
    tickets, count = 150, 140
    event_id = await create_event(lb_admin, quantity=tickets, rate=200)
    fans = [Fan(nodes, event_id, calls) for _ in range(count)]
    acked: dict[str, str] = {}  # fan id -> hold id
    killed_at = 0.0
    buyers: list[asyncio.Task[None]] = []
    try:
        gate = asyncio.Semaphore(16)

        async def join(fan: Fan) -> None:
            async with gate:
                await fan.join()
                await fan.admitted()

        await asyncio.gather(*(join(fan) for fan in fans))
        # Reservations at a steady pace, 6 at a time, each retried on 503 with its key.
        queue: asyncio.Queue[Fan] = asyncio.Queue()
        for fan in fans:
            queue.put_nowait(fan)
        enough = asyncio.Event()

        async def buyer() -> None:
            while not queue.empty():
                fan = queue.get_nowait()
                key = uuid.uuid4().hex
                while True:
                    response = await fan.reserve(key)
                    if response.status_code == 201:
                        acked[fan.fan_id] = response.json()["id"]
                        if len(acked) >= 40:
                            enough.set()
                        break
                    assert response.status_code == 503, response.text
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.05)

        buyers.extend(asyncio.create_task(buyer()) for _ in range(6))
        await asyncio.wait_for(enough.wait(), 60)
        victim = await nodes.owner(event_id)
        assert victim is not None, await nodes.owner_lease(event_id)
        await nodes.kill(victim)
        killed_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*buyers), 120)
    finally:
        for task in buyers:
            task.cancel()
        await asyncio.gather(*buyers, return_exceptions=True)
        await asyncio.gather(*(fan.aclose() for fan in fans))

    after = sorted(
        ended - killed_at
        for route, status, _, started, ended in calls.rows
        if route == "reserve" and status == 201 and started >= killed_at
    )
    assert after, "no reservation succeeded after the kill"
    failover_s = after[0]
    since = [s for route, s, _, _, ended in calls.rows if route == "reserve" and ended >= killed_at]
    print(
        f"owner killed: first reservation through the LB {failover_s:.2f} s later;"
        f" since the kill {since.count(201)} reserved, {since.count(503)} answers 503,"
        f" {since.count(0)} connections closed unanswered (sent again)"
    )
    assert failover_s <= FAILOVER_S, failover_s
    new_owner = await nodes.owner(event_id)
    assert new_owner is not None and new_owner is not victim
    # Every fan got its ticket, each acknowledged hold is in PostgreSQL, none oversold.
    assert len(acked) == count
    quantity, held, sold, holds = await sale_counts(nodes, event_id)
    assert held + sold == holds == count <= quantity
    conn = await asyncpg.connect(nodes.settings.database_url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM holds WHERE id = ANY($1::uuid[])", list(acked.values())
        )
    finally:
        await conn.close()
    assert stored == count

    await nodes.restart(victim)
    await nodes.wait_in_rotation()


async def test_a_stopping_node_closes_its_websockets_with_1012_and_fans_reconnect_in_place(
    nodes: Nodes, lb_admin: httpx.AsyncClient, calls: Calls
) -> None:
    # max_active 1 and a first fan who holds the one pass: the line does not move, and
    # everyone behind is told a position.
    event_id = await create_event(lb_admin, quantity=10, rate=50, max_active=1)
    holder = Fan(nodes, event_id, calls)
    fans = [Fan(nodes, event_id, calls) for _ in range(12)]
    sockets: list[websockets.ClientConnection] = []
    try:
        await holder.join()
        await holder.admitted()
        for fan in fans:
            await fan.join()
        assert [(await fan.me())["position"] for fan in fans] == list(range(1, 13))
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
            )
            context = await browser.new_context(base_url=nodes.url)
            # As tests/browser_support.py's PageProblems: uncaught errors, CSP violations.
            problems: list[str] = []

            def on_console(message: ConsoleMessage) -> None:
                if "Content Security Policy" in message.text:
                    problems.append(message.text)

            context.on("console", on_console)
            context.on("weberror", lambda web_error: problems.append(web_error.error.message))
            page = await context.new_page()
            page_sockets: list[PageSocket] = []
            page.on("websocket", lambda socket: page_sockets.append(socket))
            await page.goto(f"/events/{event_id}")
            await expect(page.locator("#position")).to_have_text("You are number 13 in line")
            await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
            # The page's socket is the only one yet: its node is the one to stop.
            counts = [await node_metric(n, "waitroom_websocket_connections") for n in nodes.nodes]
            assert sorted(counts) == [0, 0, 1], counts
            victim = nodes.nodes[counts.index(1)]

            for fan in fans:
                sockets.append(await fan.websocket())
            first = [msgspec.json.decode(await ws.recv()) for ws in sockets]
            assert [m["position"] for m in first] == list(range(1, 13)), first
            on_victim = await node_metric(victim, "waitroom_websocket_connections")
            assert on_victim >= 3, on_victim  # the page and some of the scripted fans
            # HAProxy brought them to the node's WebSocket port, not its HTTP one.
            assert victim.ws_port is not None
            assert established_to(victim.ws_port) == on_victim

            stop = asyncio.create_task(nodes.terminate(victim))
            # Positions keep coming on the other sockets (the estimate moves each tick):
            # watch every socket for a fixed while, well past the node's exit.
            until = time.monotonic() + 5

            async def outcome(ws: websockets.ClientConnection) -> int | None:
                """The close code the server sent, or None if the socket stayed open."""
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), max(0.0, until - time.monotonic()))
                except TimeoutError:
                    return None
                except websockets.ConnectionClosed as closed:
                    return closed.rcvd.code if closed.rcvd is not None else 1006

            closes = await asyncio.gather(*(outcome(ws) for ws in sockets))
            stopped_in = await stop
            print(f"{victim.name} stopped in {stopped_in:.2f} s; closes {closes}")
            dropped = [i for i, code in enumerate(closes) if code is not None]
            # The page's socket and the scripted ones on that node, all told to reconnect.
            assert len(dropped) == on_victim - 1, closes
            assert all(closes[i] in RECONNECT_CODES for i in dropped), closes

            # Back through the load balancer (so on another node), at the same place.
            for i in dropped:
                sockets[i] = await fans[i].websocket()
                message = msgspec.json.decode(await asyncio.wait_for(sockets[i].recv(), 5))
                assert message["type"] == "position" and message["position"] == i + 1, message
            assert [(await fan.me())["position"] for fan in fans] == list(range(1, 13))
            # The page reconnects by itself, with a new socket, and shows the same place.
            await expect(page.locator("#connection")).to_have_attribute(
                "data-state", "live", timeout=15_000
            )
            await expect(page.locator("#position")).to_have_text("You are number 13 in line")
            assert len(page_sockets) == 2, [s.url for s in page_sockets]
            live = [await node_metric(n, "waitroom_websocket_connections") for n in nodes.nodes
                    if n.alive]  # fmt: skip
            assert sum(live) == len(fans) + 1, live
            await context.close()
            await browser.close()
            assert not problems, problems
    finally:
        for ws in sockets:
            await ws.close()
        await asyncio.gather(*(fan.aclose() for fan in [holder, *fans]))
    await nodes.restart(victim)
    await nodes.wait_in_rotation()
