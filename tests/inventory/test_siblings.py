"""Forwarding to an owner on the same machine over its local socket (inventory.siblings).

Two :class:`InventoryHost` in this process stand for two worker processes of one machine:
their node ids name this host and this pid, so each reaches the other's socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import asyncpg
import pytest
from redis.asyncio import Redis

from inventory.actor import ActorStopped
from inventory.forwarding import FORWARD_BATCHES, Forwarder, OwnerGone
from inventory.hosting import InventoryHost
from inventory.ledger import Reserve, Reserved
from inventory.siblings import FORWARDED_LOCALLY, MAX_FRAME, Siblings, address, sibling_pid
from tests.inventory.conftest import held_sold, make_event
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings

pytestmark = pytest.mark.anyio

_SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),  # what serve runs
        pytest.param(("asyncio", {}), id="asyncio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Both event loops: uvloop takes socket addresses its own way (see siblings.listen)."""
    param: tuple[str, dict[str, Any]] = request.param
    return param


def _local_id() -> str:
    """A node id as hosting makes them: this host, this pid, 8 hex digits."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def pair(
    pool: asyncpg.Pool[Any], redis: Redis, settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[InventoryHost, InventoryHost]]:
    local = getattr(request, "param", True)
    keys = Keys(settings.redis_prefix)
    a = InventoryHost(pool, redis, keys, lease_ttl_s=1.5, local_forwarding=local)
    b = InventoryHost(pool, redis, keys, lease_ttl_s=1.5, local_forwarding=local)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def _owned_by_a(pool: asyncpg.Pool[Any], a: InventoryHost, b: InventoryHost) -> str:
    event_id = await make_event(pool, quantity=200, per_fan=1)
    assert isinstance(await a.ask(event_id, Reserve("owner", "ga", 1, "k-owner", None)), Reserved)
    assert isinstance(await b.ask(event_id, Reserve("warm", "ga", 1, "k-warm", None)), Reserved)
    assert a.owns(event_id) and not b.owns(event_id)
    return event_id


async def _asked_through(
    b: InventoryHost, event_id: str, count: int
) -> tuple[list[Reserved], float, float]:
    """``count`` reservations asked at once through ``b``: their results, and how many
    inbox entries and commands over a local socket they took."""
    batches = FORWARD_BATCHES._value.get()
    local = FORWARDED_LOCALLY._value.get()
    results = await asyncio.gather(
        *(b.ask(event_id, Reserve(f"fan{i}", "ga", 1, f"k{i}", None)) for i in range(count))
    )
    reserved = [r for r in results if isinstance(r, Reserved)]
    assert len(reserved) == count, results
    return (
        reserved,
        FORWARD_BATCHES._value.get() - batches,
        FORWARDED_LOCALLY._value.get() - local,
    )


async def test_an_owner_on_this_machine_is_asked_over_its_socket_not_through_redis(
    pool: asyncpg.Pool[Any],
    pair: tuple[InventoryHost, InventoryHost],
    redis: Redis,
    settings: Settings,
) -> None:
    a, b = pair
    event_id = await _owned_by_a(pool, a, b)
    results, entries, local = await _asked_through(b, event_id, 60)
    assert len({r.hold.id for r in results}) == 60
    assert local == 60
    assert entries == 0  # nothing went into the inbox
    assert await redis.xlen(Keys(settings.redis_prefix).event(event_id).inbox) == 0
    assert not b.owns(event_id)
    assert await held_sold(pool, event_id) == (62, 0, 200)
    # A replay is answered the same, over the same wire.
    again = await b.ask(event_id, Reserve("fan7", "ga", 1, "k7", None))
    assert isinstance(again, Reserved) and again.hold.id == results[7].hold.id


@pytest.mark.parametrize("pair", [False], indirect=True)
async def test_with_local_forwarding_off_the_commands_go_through_the_inbox(
    pool: asyncpg.Pool[Any], pair: tuple[InventoryHost, InventoryHost]
) -> None:
    a, b = pair
    event_id = await _owned_by_a(pool, a, b)
    _, entries, local = await _asked_through(b, event_id, 20)
    assert entries > 0
    assert local == 0


async def test_the_owner_stopping_answers_its_local_askers_and_the_other_takes_over(
    pool: asyncpg.Pool[Any], pair: tuple[InventoryHost, InventoryHost]
) -> None:
    a, b = pair
    event_id = await _owned_by_a(pool, a, b)
    await a.stop()
    result = await b.ask(event_id, Reserve("after", "ga", 1, "k-after", None), timeout=5)
    assert isinstance(result, Reserved)
    assert b.owns(event_id)


class _Silent(asyncio.Protocol):
    """A socket that takes commands and never answers."""

    def __init__(self, connections: list[asyncio.Transport], made: asyncio.Event) -> None:
        self._connections = connections
        self._made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.append(cast(asyncio.Transport, transport))
        self._made.set()


async def _listen_at(name: str, protocol: Callable[[], asyncio.Protocol]) -> asyncio.AbstractServer:
    """A server on the abstract socket ``name`` (its socket made here, as siblings does)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(name)
    sock.listen(8)
    sock.setblocking(False)
    return await asyncio.get_running_loop().create_unix_server(protocol, sock=sock)


async def _forwarder(redis: Redis, settings: Settings) -> Forwarder:
    forwarder = Forwarder(redis, Keys(settings.redis_prefix), _local_id())
    forwarder.start()
    await forwarder.listen_locally(lambda _event: None)
    return forwarder


async def test_asks_in_flight_on_a_lost_connection_fail_at_once_as_owner_gone(
    redis: Redis, settings: Settings
) -> None:
    owner = _local_id()
    connections: list[asyncio.Transport] = []
    made = asyncio.Event()
    server = await _listen_at(address(owner), lambda: _Silent(connections, made))
    forwarder = await _forwarder(redis, settings)
    try:
        ask = asyncio.create_task(
            forwarder.ask("ev", Reserve("f", "ga", 1, "k", None), 30, owner=owner)
        )
        await asyncio.wait_for(made.wait(), 2)
        await asyncio.sleep(0.05)
        assert not ask.done()
        connections[0].close()  # the owner process died
        with pytest.raises(OwnerGone):
            await asyncio.wait_for(ask, 2)
    finally:
        await forwarder.stop(ActorStopped())
        server.close()


async def test_a_socket_that_is_not_the_owner_process_is_not_trusted(
    redis: Redis, settings: Settings
) -> None:
    """The owner's id names pid 1: a socket of that name served by this process is an
    impostor, so the command goes through Redis instead."""
    owner = f"{socket.gethostname()}:1:{uuid.uuid4().hex[:8]}"
    server = await _listen_at(address(owner), lambda: _Silent([], asyncio.Event()))
    forwarder = await _forwarder(redis, settings)
    batches = FORWARD_BATCHES._value.get()
    try:
        with pytest.raises(Exception) as failed:  # nobody serves the inbox: its deadline
            await forwarder.ask("ev", Reserve("f", "ga", 1, "k", None), 0.3, owner=owner)
        assert "inventory_timeout" in repr(failed.value) or "did not answer" in str(failed.value)
        assert FORWARD_BATCHES._value.get() == batches + 1  # it went into the inbox
    finally:
        await forwarder.stop(ActorStopped())
        server.close()


def test_only_node_ids_of_this_host_are_siblings() -> None:
    host = socket.gethostname()
    assert sibling_pid(f"{host}:123:0123abcd", host) == 123
    assert sibling_pid(f"node1/{host}:123:0123abcd", host) == 123
    assert sibling_pid(f"{host}x:123:0123abcd", host) is None
    assert sibling_pid("node-a", host) is None
    assert sibling_pid(f"{host}:12x:0123abcd", host) is None


async def _raw(owner: str, data: bytes) -> bytes:
    """What the owner's socket sends back to ``data`` before it closes (or 1 s passes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address(owner))
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 1)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x05hello",  # not msgpack of commands
        (MAX_FRAME + 1).to_bytes(4, "big"),  # a length past the bound
        b"\x00\x00\x00\x02\x92\x01",  # the wrong shape
    ],
)
async def test_a_bad_frame_closes_that_connection_and_the_owner_serves_on(
    pool: asyncpg.Pool[Any], pair: tuple[InventoryHost, InventoryHost], data: bytes
) -> None:
    a, b = pair
    event_id = await _owned_by_a(pool, a, b)
    assert await _raw(a.node_id, data) == b""  # closed, nothing answered
    result = await b.ask(event_id, Reserve("after", "ga", 1, "k-after", None))
    assert isinstance(result, Reserved)


async def test_a_process_of_another_user_is_refused(pool: asyncpg.Pool[Any]) -> None:
    """Abstract sockets have no file permissions: the owner checks who connected."""
    served: list[str] = []
    siblings = Siblings(_local_id(), lambda event: served.append(event), print, print)
    assert await siblings.listen()
    name = address(siblings._node_id)
    script = "\n".join(
        [
            "import socket",
            "s = socket.socket(socket.AF_UNIX)",
            f"s.connect({name!r})",
            "s.settimeout(2)",
            "try:",
            "    s.sendall(b'\\x00\\x00\\x00\\x01\\x90')",
            "    print(repr(s.recv(100)))",
            # Closed with the frame unread, or before it could even be sent.
            "except (ConnectionResetError, BrokenPipeError):",
            "    print(repr(b''))",
        ]
    )
    try:
        out = await asyncio.to_thread(
            subprocess.run,
            # The system's Python: another user may not run the one under /root.
            [_SYSTEM_PYTHON if os.getuid() == 0 else sys.executable, "-c", script],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=20,
            user=65534 if os.getuid() == 0 else None,
        )
    finally:
        await siblings.close()
    assert out.returncode == 0, out.stderr
    if os.getuid() == 0:
        assert out.stdout.strip() == "b''"  # closed at once
        assert served == []


async def test_asks_that_reach_an_owner_still_starting_wait_for_its_actor(
    pool: asyncpg.Pool[Any], pair: tuple[InventoryHost, InventoryHost]
) -> None:
    """Both processes ask for a fresh event at once: one claims the lease and starts its
    actor (an epoch in PostgreSQL, the ledger loaded), and the other's asks reach it over
    the socket before the actor is up. They wait for it (through the inbox they waited in
    the stream), not 503."""
    a, b = pair
    for _ in range(3):
        event_id = await make_event(pool, quantity=500, per_fan=1)
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).ask(event_id, Reserve(f"fan{i}", "ga", 1, f"k{i}", None))
                for i in range(80)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(r, Reserved) for r in results), [
            r for r in results if not isinstance(r, Reserved)
        ][:3]
        assert a.owns(event_id) != b.owns(event_id)
