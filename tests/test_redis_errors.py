"""Both Redis clients raise the same exceptions for the same server states, and stay bounded.

The Multiplexer parses error replies with redis-py's own table of prefixes, so a reply of a
server that is loading, a read-only replica, out of memory... raises what redis-py's client
raises, and :func:`waitroom.core.redis.unavailable` (503 upstream) recognises it from
either. Each state is a real private Redis (:mod:`stress.private_services`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import msgspec
import pytest
import redis.exceptions as rx
from redis.asyncio import Redis

from stress.private_services import PrivateRedis
from tests.admission.support import wait_for
from tests.harness import base_settings
from waitroom.core.http import dependency_error
from waitroom.core.redis import Multiplexer, make_redis, unavailable

pytestmark = [pytest.mark.anyio, pytest.mark.not_on_cluster]

WRITE_SCRIPT = "return redis.call('SET', KEYS[1], ARGV[1])"
READ_SCRIPT = "return redis.call('GET', KEYS[1])"


@contextmanager
def loading() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        with server.client() as c:
            c.execute_command("DEBUG", "POPULATE", "30000", "filler")
            c.save()
        server.kill()
        server.start("--key-load-delay", "50", "--loading-process-events-interval-bytes", "1024")
        yield server
        assert server.loading(), "Redis loaded before the test was over"


def _in_sync(replica: PrivateRedis) -> bool:
    with replica.client() as c:
        info: dict[str, Any] = c.info("replication")
    return info.get("master_link_status") == "up"


@contextmanager
def read_only() -> Iterator[PrivateRedis]:
    with PrivateRedis() as primary, PrivateRedis(replicaof=("127.0.0.1", primary.port)) as r:
        wait_for(lambda: _in_sync(r), 10)
        yield r


@contextmanager
def master_down() -> Iterator[PrivateRedis]:
    with (
        PrivateRedis() as primary,
        PrivateRedis(
            replicaof=("127.0.0.1", primary.port), extra=["--replica-serve-stale-data", "no"]
        ) as r,
    ):
        wait_for(lambda: _in_sync(r), 10)
        primary.stop()
        wait_for(lambda: r.ping_reply().startswith(b"-MASTERDOWN"), 10)
        yield r


@contextmanager
def out_of_memory() -> Iterator[PrivateRedis]:
    with PrivateRedis(extra=["--maxmemory", "1"]) as server:
        yield server


@contextmanager
def busy() -> Iterator[PrivateRedis]:
    script = """
        local started = tonumber(redis.call('TIME')[1])
        while tonumber(redis.call('TIME')[1]) - started < 2 do end
        return 1"""
    with PrivateRedis(extra=["--busy-reply-threshold", "50"]) as server:

        def run() -> None:
            with server.client() as c:
                c.eval(script, 0)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        wait_for(lambda: server.ping_reply().startswith(b"-BUSY"), 5)
        yield server
        runner.join(10)


STATES: dict[str, tuple[Callable[[], Any], type[rx.RedisError], str]] = {
    # state: (server, class both clients raise, script the client runs)
    "LOADING": (loading, rx.BusyLoadingError, READ_SCRIPT),
    "READONLY": (read_only, rx.ReadOnlyError, WRITE_SCRIPT),
    "MASTERDOWN": (master_down, rx.MasterDownError, READ_SCRIPT),
    "OOM": (out_of_memory, rx.OutOfMemoryError, WRITE_SCRIPT),
    "BUSY": (busy, rx.ResponseError, READ_SCRIPT),
}


@asynccontextmanager
async def clients(url: str) -> AsyncIterator[tuple[Multiplexer, Redis]]:
    mux = Multiplexer(url, timeout=2.0)
    client = Redis.from_url(url)
    try:
        yield mux, client
    finally:
        await mux.aclose()
        await client.aclose()


async def _raised(call: Any) -> BaseException:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("no error")


@pytest.mark.parametrize("state", sorted(STATES))
async def test_both_clients_raise_the_same_class_and_it_is_a_503(state: str) -> None:
    make_server, expected, script = STATES[state]
    with make_server() as server:
        async with clients(server.url) as (mux, client):
            for name, call in (
                ("mux", mux.execute("EVAL", script, 1, "k", "v")),
                ("redis-py", client.eval(script, 1, "k", "v")),
            ):
                exc = await _raised(call)
                assert type(exc) is expected, (name, repr(exc), str(exc))
                assert unavailable(exc) or isinstance(exc, rx.ConnectionError), (name, exc)
                error = dependency_error(exc)
                assert error is not None and error.status == 503, (name, exc)
                if state == "BUSY":
                    assert str(exc).startswith("BUSY "), (name, exc)


async def test_errors_of_the_command_keep_their_class_and_message() -> None:
    with PrivateRedis() as server:
        async with clients(server.url) as (mux, client):
            await mux.execute("SET", "s", "1")
            exc = await _raised(mux.execute("LPUSH", "s", "x"))
            assert type(exc) is rx.ResponseError and str(exc).startswith("WRONGTYPE")
            assert dependency_error(exc) is None
            exc = await _raised(mux.evalsha("0" * 40, 0))
            assert type(exc) is rx.NoScriptError
            assert dependency_error(exc) is None
            await client.xgroup_create("s2", "g", mkstream=True)
            exc = await _raised(mux.execute("XGROUP", "CREATE", "s2", "g", "$"))
            assert type(exc) is rx.ResponseError and str(exc).startswith("BUSYGROUP")
            assert dependency_error(exc) is None


async def test_a_read_only_reply_makes_the_multiplexer_connect_again() -> None:
    with PrivateRedis() as server, PrivateRedis() as other:
        async with clients(server.url) as (mux, _):
            first = await mux.execute("CLIENT", "ID")
            with server.client() as c:
                c.replicaof("127.0.0.1", str(other.port))  # this server is demoted
            exc = await _raised(mux.execute("SET", "k", "v"))
            assert type(exc) is rx.ReadOnlyError
            # The connection was given up: the next command comes on a new one...
            assert await mux.execute("CLIENT", "ID") != first
            with server.client() as c:
                c.replicaof("NO", "ONE")  # ...and writes once the address leads to a primary.
            assert await mux.execute("SET", "k", "v") == b"OK"


async def test_a_read_only_reply_makes_redis_pys_pool_connect_again() -> None:
    with PrivateRedis() as server, PrivateRedis() as other:
        settings = msgspec.structs.replace(base_settings(), redis_url=server.url)
        client = make_redis(settings)
        try:
            first = await client.client_id()
            with server.client() as c:
                c.replicaof("127.0.0.1", str(other.port))
            exc = await _raised(client.set("k", "v"))
            assert type(exc) is rx.ReadOnlyError
            assert dependency_error(exc) is not None
            # Nothing was retried, and the connection was closed: the next command, on the
            # same pooled connection, connects again.
            assert await client.client_id() != first
            with server.client() as c:
                c.replicaof("NO", "ONE")
            assert await client.set("k", "v")
        finally:
            await client.aclose()


async def test_redis_pys_client_gives_up_on_a_frozen_server_within_its_bound() -> None:
    settings = msgspec.structs.replace(base_settings(), dependency_timeout_s=0.5)
    with PrivateRedis() as server:
        settings = msgspec.structs.replace(settings, redis_url=server.url)
        client = make_redis(settings)
        try:
            assert await client.ping()
            server.pause()
            try:
                started = time.monotonic()
                exc = await _raised(client.get("k"))
                elapsed = time.monotonic() - started
            finally:
                server.resume()
            assert isinstance(exc, rx.TimeoutError | rx.ConnectionError), repr(exc)
            # The socket timeout: the dependency timeout, or a second past the longest
            # blocking command (1 s) when that is longer.
            assert elapsed < 2.0 + 0.5, elapsed
            assert await client.ping()
        finally:
            await client.aclose()
