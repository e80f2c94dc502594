"""The pipelined Redis connection: ordered replies, errors, timeouts and reconnection."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator

import pytest
from redis import exceptions as rx

from tests.harness import free_port
from tests.queue_support import redis_client
from waitroom.core.lua_scripts import Script
from waitroom.core.redis import Multiplexer
from waitroom.core.settings import Settings

#: The single-node Multiplexer (tests/test_redis_cluster.py has the cluster's).
pytestmark = [pytest.mark.anyio, pytest.mark.not_on_cluster]


@pytest.fixture
async def mux(settings: Settings) -> AsyncIterator[Multiplexer]:
    client = Multiplexer(settings.redis_url, timeout=2.0)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def key(settings: Settings) -> str:
    return f"{settings.redis_prefix}:mux:{secrets.token_hex(4)}"


async def test_replies_come_back_typed_and_in_order(mux: Multiplexer, key: str) -> None:
    assert await mux.execute("PING") == b"PONG"
    assert await mux.execute("SET", key, "v", "EX", 60) == b"OK"
    assert await mux.execute("GET", key) == b"v"
    assert await mux.execute("GET", key + ":missing") is None
    nested = await mux.execute("EVAL", "return {1, 'two', {3}, false}", 0)
    assert nested == [1, b"two", [3], None]
    counts = await asyncio.gather(*(mux.execute("INCR", key + ":n") for _ in range(2000)))
    assert counts == list(range(1, 2001))  # one connection, FIFO: submission order kept
    await mux.execute("DEL", key, key + ":n")


async def test_error_replies_raise_and_leave_the_connection_usable(
    mux: Multiplexer, key: str
) -> None:
    await mux.execute("SET", key, "text", "EX", 60)
    with pytest.raises(rx.ResponseError, match="WRONGTYPE"):
        await mux.execute("LPUSH", key, "x")
    with pytest.raises(rx.NoScriptError):
        await mux.evalsha("0" * 40, 0)
    assert await mux.execute("GET", key) == b"text"
    await mux.execute("DEL", key)


async def test_a_script_redis_does_not_know_is_loaded_on_first_use(mux: Multiplexer) -> None:
    script = Script("waitroom.line.lua", "leave.lua")
    # A variant no one has loaded: a unique comment changes the SHA.
    script.source += f"\n-- {secrets.token_hex(8)}\n"
    script.sha = hashlib.sha1(script.source.encode(), usedforsecurity=False).hexdigest()
    assert await script(mux, ["m", "q", "p", "f", "s", "a"], ["fan"]) == b"no_room"


async def test_a_cancelled_caller_does_not_shift_the_others_replies(
    mux: Multiplexer, key: str
) -> None:
    slow = asyncio.create_task(mux.execute("EVAL", "return redis.call('ECHO', 'slow')", 0))
    quick = asyncio.create_task(mux.execute("ECHO", "quick"))
    await asyncio.sleep(0)
    slow.cancel()
    assert await quick == b"quick"
    assert await mux.execute("ECHO", "after") == b"after"


async def test_a_killed_connection_fails_its_callers_and_the_next_call_reconnects(
    mux: Multiplexer, settings: Settings
) -> None:
    connection_id = await mux.execute("CLIENT", "ID")
    async with redis_client(settings) as admin:
        # A command in flight while the connection is killed under it.
        blocked = asyncio.create_task(mux.execute("BLPOP", f"nothing:{connection_id}", 5))
        await asyncio.sleep(0.1)
        await admin.client_kill_filter(_id=str(connection_id))
    with pytest.raises(rx.ConnectionError):
        await blocked
    assert await mux.execute("PING") == b"PONG"


async def test_a_silent_redis_times_out_every_waiting_command(silent_port: int) -> None:
    mux = Multiplexer(f"redis://127.0.0.1:{silent_port}/0", timeout=0.3)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(mux.execute("PING") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, rx.TimeoutError) for r in results), results
        assert loop.time() - started < 1.5
    finally:
        await mux.aclose()


async def test_a_redis_that_is_down_is_a_connection_error(mux: Multiplexer) -> None:
    down = Multiplexer(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    try:
        with pytest.raises(rx.ConnectionError):
            await down.execute("PING")
        with pytest.raises(rx.ConnectionError):
            await down.execute("PING")  # and again: a failed attempt is not cached
    finally:
        await down.aclose()


async def test_closing_fails_what_still_waits_and_refuses_new_commands(settings: Settings) -> None:
    mux = Multiplexer(settings.redis_url, timeout=2.0)
    waiting = asyncio.create_task(mux.execute("BLPOP", f"nothing:{secrets.token_hex(4)}", 5))
    await asyncio.sleep(0.1)
    await mux.aclose()
    with pytest.raises(rx.ConnectionError):
        await waiting
    with pytest.raises(rx.ConnectionError):
        await mux.execute("PING")


async def test_the_database_number_of_the_url_is_selected(settings: Settings, key: str) -> None:
    base = settings.redis_url.rsplit("/", 1)[0]
    mux = Multiplexer(f"{base}/3", timeout=2.0)
    try:
        await mux.execute("SET", key, "in-db-3", "EX", 30)
        async with redis_client(settings) as db0:
            assert await db0.get(key) is None
        assert await mux.execute("GET", key) == b"in-db-3"
        await mux.execute("DEL", key)
    finally:
        await mux.aclose()


async def test_a_connection_whose_reader_never_ran_still_closes_its_socket(
    settings: Settings,
) -> None:
    # As when the loop shuts down right after a connect: the reader task is cancelled before
    # its first step, so none of its own code runs.
    from waitroom.core.redis import _Connection

    host, port = settings.redis_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    conn = _Connection(reader, writer, timeout=2.0)
    conn._read_task.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert conn._read_task.cancelled()
    assert writer.is_closing() and isinstance(conn.failure, rx.ConnectionError)
    with pytest.raises(rx.ConnectionError):
        conn.send(b"*1\r\n$4\r\nPING\r\n")
    await writer.wait_closed()
