"""Every way Redis or PostgreSQL can fail a request answers 503 with Retry-After, in time.

Real servers throughout: the app runs against a private Redis or PostgreSQL
(:mod:`stress.private_services`) that each test puts in the state it is about: Redis loading
its data, a primary demoted to a read-only replica (a failover), a replica whose master is
down, a script running too long, out of memory, stopped, frozen; PostgreSQL stopped (fast
and immediate), stopped in the middle of a query, frozen. Every answer must be the
documented error body with status 503 and ``Retry-After``, never a 500, and come within the
dependency timeout and a second; once the dependency is back, the same routes answer again
without restarting the app. The last tests check the mapping itself, exception by exception.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis.exceptions as rx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from admission.passes import PassClaims, PassKeys, new_jti
from stress.private_services import PrivatePostgres, PrivateRedis, process_alive
from tests.admission.support import create_event, join, wait_for
from tests.harness import (
    ADMIN_TOKEN,
    ServerThread,
    base_settings,
    free_port,
    fresh_settings,
    running,
    sync_redis,
)
from tests.queue_support import fan_headers, new_ip
from tests.test_errors import assert_error
from waitroom.core.db import (
    MIN_STATEMENT_TIMEOUT_S,
    DatabaseUnreachable,
    PoolTimeout,
    create_pool,
    drop_database,
)
from waitroom.core.errors import Unavailable
from waitroom.core.http import dependency_error
from waitroom.core.redis import UNAVAILABLE_REPLIES, reply_error
from waitroom.core.settings import Settings

#: The default WAITROOM_DEPENDENCY_TIMEOUT_S, and what every failing request must stay within.
TIMEOUT = 2.0
BOUND = TIMEOUT + 1.0
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

Probe = Callable[[httpx.Client], httpx.Response]


# --- helpers ---------------------------------------------------------------------------------


def assert_unavailable(
    response: httpx.Response, dependency: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """A 503 with the documented body and a whole-seconds Retry-After that the body repeats."""
    error = assert_error(response, 503, code)
    retry_after = response.headers.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, (
        response.headers
    )
    assert error["details"]["retry_after_s"] == int(retry_after)
    if dependency is not None:
        assert error["details"].get("dependency") == dependency, error
    return error


@dataclass
class Sale:
    """A running app with an event on sale and one fan in line."""

    settings: Settings
    server: ServerThread
    event_id: str
    fan_id: str
    token: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=30)

    def queue_pass(self) -> str:
        """A good queue pass of the fan (signed with the app's key; never admitted)."""
        now = int(time.time())
        claims = PassClaims(
            iss=self.settings.pass_issuer,
            sub=self.fan_id,
            evt=self.event_id,
            jti=new_jti(),
            iat=now,
            nbf=now,
            exp=now + 600,
            seq=1,
        )
        return PassKeys.from_settings(self.settings).sign(claims)

    def ws_close(self) -> tuple[int, str] | str:
        """How the fan's queue WebSocket ends: its close code and reason, or "open"."""
        at = f"{self.server.ws_url}/v1/events/{self.event_id}/queue/ws"
        with ws_connect(at, additional_headers=fan_headers(self.token), open_timeout=10) as ws:
            try:
                ws.recv(timeout=10)
            except ConnectionClosed as closed:
                assert closed.rcvd is not None, "closed without a close frame"
                return closed.rcvd.code, closed.rcvd.reason
        return "open"


@contextmanager
def sale(settings: Settings) -> Iterator[Sale]:
    with running(settings) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as admin:
            event_id = create_event(admin, prefix="dep")
        fan_id, token = join(http, event_id)
        yield Sale(settings, server, event_id, fan_id, token)


def redis_probes(s: Sale, *, reads: bool = True) -> dict[str, Probe]:
    """Requests of every kind that need Redis: the fans' line (through the Multiplexer),
    checkout's pass gate and the operators' routes (through redis-py)."""
    event = f"/v1/events/{s.event_id}"
    fan = fan_headers(s.token)
    probes: dict[str, Probe] = {
        "join": lambda c: c.post(f"{event}/queue", headers={"X-Forwarded-For": new_ip()}),
        "status": lambda c: c.get(f"{event}/queue/me", headers=fan),
        "ws-ticket": lambda c: c.post(f"{event}/queue/ws-ticket", headers=fan),
        "admission": lambda c: c.patch(
            f"/v1/admin/events/{s.event_id}/admission",
            json={"rate_per_second": 5.0},
            headers=ADMIN,
        ),
    }
    if reads:  # the pass gate only reads: a read-only replica serves it
        probes["reserve"] = lambda c: c.post(
            f"{event}/reservations",
            json={"ticket_type": "ga", "quantity": 1},
            headers={**fan, "X-Queue-Pass": s.queue_pass(), "Idempotency-Key": new_jti()},
        )
    return probes


def probe_all(
    s: Sale, probes: dict[str, Probe], *, parallel: bool = False
) -> dict[str, tuple[httpx.Response, float]]:
    """Each probe's answer and how long it took (all at once with ``parallel``)."""

    def one(probe: Probe) -> tuple[httpx.Response, float]:
        with s.client() as c:
            started = time.monotonic()
            response = probe(c)
            return response, time.monotonic() - started

    if not parallel:
        return {name: one(probe) for name, probe in probes.items()}
    with ThreadPoolExecutor(len(probes)) as pool:
        futures = {name: pool.submit(one, probe) for name, probe in probes.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_all_unavailable(
    answers: dict[str, tuple[httpx.Response, float]],
    dependency: str | None,
    bounds: dict[str, float] | None = None,
) -> None:
    """Every answer a 503 about ``dependency``, each within :data:`BOUND` (or its own)."""
    for name, (response, elapsed) in answers.items():
        try:
            assert_unavailable(response, dependency)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        bound = (bounds or {}).get(name, BOUND)
        assert elapsed < bound, f"{name} took {elapsed:.2f} s"


def assert_status_ok(s: Sale, within: float = 10.0) -> None:
    """The fan's status answers 200 again (the app reconnects by itself)."""

    def ok() -> bool:
        with s.client() as c:
            response = c.get(f"/v1/events/{s.event_id}/queue/me", headers=fan_headers(s.token))
        assert response.status_code in (200, 503), response.text
        return response.status_code == 200

    wait_for(ok, within, every=0.1)


def redis_info(server: PrivateRedis, field: str) -> str:
    with server.client() as c:
        info: dict[str, Any] = c.info("replication")
    return str(info.get(field, ""))


def in_sync(replica: PrivateRedis) -> bool:
    return redis_info(replica, "master_link_status") == "up"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """This module's database on the shared PostgreSQL; each Redis test brings its Redis."""
    value = fresh_settings(
        tmp_path_factory.mktemp("deps"), dependency_timeout_s=TIMEOUT, view_cache_ttl_s=0.05
    )
    try:
        yield value
    finally:
        asyncio.run(drop_database(value.database_url))


def on_redis(base: Settings, server: PrivateRedis) -> Settings:
    return msgspec.structs.replace(base, redis_url=server.url)


@pytest.fixture
def on_private_postgres(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[PrivatePostgres, Settings]]:
    """A private PostgreSQL and settings whose migrated database lives in it."""
    with PrivatePostgres() as pg:
        monkeypatch.setenv("WAITROOM_DATABASE_URL", pg.dsn)
        settings = fresh_settings(tmp_path, dependency_timeout_s=TIMEOUT, view_cache_ttl_s=0.05)
        try:
            yield pg, settings
        finally:
            client = sync_redis(settings.redis_url)
            try:
                keys = list(client.scan_iter(match=f"{settings.redis_prefix}:*", count=1000))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()


# --- Redis -----------------------------------------------------------------------------------


def test_redis_loading_its_data_is_503_on_every_route_then_serves_again(base: Settings) -> None:
    with PrivateRedis() as redis_server, sale(on_redis(base, redis_server)) as s:
        with redis_server.client() as c:
            c.execute_command("DEBUG", "POPULATE", "30000", "filler")
            c.save()
        redis_server.kill()
        # Each key takes 50 us or more to load: a few seconds of LOADING, answered promptly.
        redis_server.start(
            "--key-load-delay", "50", "--loading-process-events-interval-bytes", "1024"
        )
        assert redis_server.loading()
        assert_all_unavailable(probe_all(s, redis_probes(s)), "redis")
        assert s.ws_close() == (1013, "service unavailable, try again later")
        with s.client() as c:
            assert_unavailable(c.get("/readyz"), code="not_ready")
        assert redis_server.loading(), "Redis loaded before every route was tried"
        wait_for(lambda: not redis_server.loading(), 60, every=0.1)
        assert_status_ok(s)
        assert s.ws_close() == "open"


def test_a_primary_demoted_to_a_read_only_replica_is_503_and_recovers(base: Settings) -> None:
    with (
        PrivateRedis() as primary,
        sale(on_redis(base, primary)) as s,
        PrivateRedis(replicaof=("127.0.0.1", primary.port)) as other,
    ):
        wait_for(lambda: in_sync(other), 10)
        # A failover: the other server is promoted, and the app's address now leads to a
        # replica (the old primary, following the new one).
        with other.client() as c:
            c.replicaof("NO", "ONE")
        with primary.client() as c:
            c.replicaof("127.0.0.1", str(other.port))
        wait_for(lambda: in_sync(primary), 10)
        assert_all_unavailable(probe_all(s, redis_probes(s, reads=False)), "redis")
        # Failing back: the same address is a primary again, and the app writes to it.
        with primary.client() as c:
            c.replicaof("NO", "ONE")
        assert_status_ok(s)
        with s.client() as c:
            joined = c.post(f"/v1/events/{s.event_id}/queue", headers={"X-Forwarded-For": new_ip()})
        assert joined.status_code == 201, joined.text


def test_a_replica_whose_master_is_down_is_503(base: Settings) -> None:
    with (
        PrivateRedis() as primary,
        sale(on_redis(base, primary)) as s,
        PrivateRedis(replicaof=("127.0.0.1", primary.port)) as other,
    ):
        wait_for(lambda: in_sync(other), 10)
        with other.client() as c:
            c.replicaof("NO", "ONE")
        with primary.client() as c:
            c.config_set("replica-serve-stale-data", "no")
            c.replicaof("127.0.0.1", str(other.port))
        wait_for(lambda: in_sync(primary), 10)
        other.stop()
        wait_for(lambda: primary.ping_reply().startswith(b"-MASTERDOWN"), 10)
        assert_all_unavailable(probe_all(s, redis_probes(s)), "redis")
        assert s.ws_close() == (1013, "service unavailable, try again later")
        with s.client() as c:
            assert_unavailable(c.get("/readyz"), code="not_ready")
        with primary.client() as c:
            c.replicaof("NO", "ONE")
        assert_status_ok(s)


def test_a_script_running_too_long_is_503(base: Settings) -> None:
    busy_script = """
        local started = tonumber(redis.call('TIME')[1])
        while tonumber(redis.call('TIME')[1]) - started < 3 do end
        return 1"""
    with (
        PrivateRedis(extra=["--busy-reply-threshold", "50"]) as redis_server,
        sale(on_redis(base, redis_server)) as s,
    ):
        outcome: list[object] = []

        def run_script() -> None:
            with redis_server.client() as c:
                outcome.append(c.eval(busy_script, 0))

        script = threading.Thread(target=run_script, daemon=True)
        script.start()
        wait_for(lambda: redis_server.ping_reply().startswith(b"-BUSY"), 5)
        assert_all_unavailable(probe_all(s, redis_probes(s)), "redis")
        assert redis_server.ping_reply().startswith(b"-BUSY"), "the script ended too soon"
        script.join(10)
        assert outcome == [1]
        assert_status_ok(s)


def test_redis_out_of_memory_refuses_writes_with_503(base: Settings) -> None:
    with PrivateRedis() as redis_server, sale(on_redis(base, redis_server)) as s:
        with redis_server.client() as c:
            c.config_set("maxmemory", "1")  # with noeviction: every write is refused
        assert_all_unavailable(probe_all(s, redis_probes(s, reads=False)), "redis")
        with redis_server.client() as c:
            c.config_set("maxmemory", "0")
        with s.client() as c:
            joined = c.post(f"/v1/events/{s.event_id}/queue", headers={"X-Forwarded-For": new_ip()})
        assert joined.status_code == 201, joined.text


def test_redis_stopped_or_frozen_is_503_within_the_timeout(base: Settings) -> None:
    with (
        PrivateRedis(appendonly=True) as redis_server,
        sale(on_redis(base, redis_server)) as s,
    ):
        redis_server.stop()
        assert_all_unavailable(probe_all(s, redis_probes(s)), "redis")
        assert s.ws_close() == (1013, "service unavailable, try again later")
        redis_server.start()
        assert_status_ok(s)

        # Frozen: the connections stay open and nothing answers; only the timeouts end it.
        redis_server.pause()
        try:
            answers = probe_all(s, redis_probes(s), parallel=True)
            started = time.monotonic()
            assert s.ws_close() == (1013, "service unavailable, try again later")
            assert time.monotonic() - started < BOUND
        finally:
            redis_server.resume()
        # An operator's request waits for the login throttle (waitroom.admin_auth, at most
        # THROTTLE_TIMEOUT_S: it lets operators in when Redis fails), then for the route's
        # own Redis call: still within the bound.
        assert_all_unavailable(answers, "redis")
        assert_status_ok(s)


# --- PostgreSQL ------------------------------------------------------------------------------


def postgres_probes(s: Sale) -> dict[str, Probe]:
    """Requests that need PostgreSQL: public event info, the operators' reads, the fan's
    orders and checkout's pass check (this fan was never admitted: PostgreSQL decides)."""
    fan = fan_headers(s.token)
    return {
        "event": lambda c: c.get(f"/v1/events/{s.event_id}"),
        "admin-list": lambda c: c.get("/v1/admin/events", headers=ADMIN),
        "admin-event": lambda c: c.get(f"/v1/admin/events/{s.event_id}", headers=ADMIN),
        "orders": lambda c: c.get("/v1/orders", headers=fan),
        "reserve": lambda c: c.post(
            f"/v1/events/{s.event_id}/reservations",
            json={"ticket_type": "ga", "quantity": 1},
            headers={**fan, "X-Queue-Pass": s.queue_pass(), "Idempotency-Key": new_jti()},
        ),
    }


def assert_postgres_serves(s: Sale, within: float = 15.0) -> None:
    """Every PostgreSQL route answers again (the pool connects on demand)."""

    def ok() -> bool:
        answers = probe_all(s, postgres_probes(s))
        for name, (response, _) in answers.items():
            assert response.status_code != 500, f"{name}: {response.text}"
        return all(
            response.status_code < 500
            for name, (response, _) in answers.items()
            if name != "reserve"  # a pass nobody admitted is "not on record yet": 503
        )

    wait_for(ok, within, every=0.2)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_stopped_mid_sale_is_503_then_serves_again(
    on_private_postgres: tuple[PrivatePostgres, Settings], mode: str
) -> None:
    pg, settings = on_private_postgres
    with sale(settings) as s:
        assert_postgres_serves(s)
        pg.stop(mode)
        time.sleep(0.1)  # past the cached views' lifetime
        assert_all_unavailable(probe_all(s, postgres_probes(s)), "postgresql")
        with s.client() as c:
            assert_unavailable(c.get("/readyz"), code="not_ready")
            # The line lives in Redis: joining a room already loaded goes on.
            joined = c.post(f"/v1/events/{s.event_id}/queue", headers={"X-Forwarded-For": new_ip()})
            assert joined.status_code in (201, 503), joined.text
        pg.start()
        assert_postgres_serves(s)


def test_postgresql_stopped_in_the_middle_of_a_query_is_503(
    on_private_postgres: tuple[PrivatePostgres, Settings],
) -> None:
    pg, settings = on_private_postgres
    with sale(settings) as s:
        assert_postgres_serves(s)
        with holding_lock(pg, settings.database_url, "events"):
            # The request's query waits behind the lock, on a live connection...
            stuck = ThreadPoolExecutor(1)
            answer = stuck.submit(lambda: probe_all(s, {"list": postgres_probes(s)["admin-list"]}))
            wait_for(lambda: asyncio.run(_lock_waiters(pg.dsn_for(_db(settings)))) > 0, 10)
            # ...when the server goes away under it.
            stopped = time.monotonic()
            pg.stop("immediate")
            response, _ = answer.result(timeout=30)["list"]
            elapsed = time.monotonic() - stopped
            stuck.shutdown()
        assert_unavailable(response, "postgresql")
        assert elapsed < BOUND, elapsed
        pg.start()
        assert_postgres_serves(s)


def test_postgresql_frozen_is_503_within_the_timeout(
    on_private_postgres: tuple[PrivatePostgres, Settings],
) -> None:
    pg, settings = on_private_postgres
    with sale(settings) as s:
        assert_postgres_serves(s)
        pg.pause()
        try:
            time.sleep(0.1)  # past the cached views' lifetime
            answers = probe_all(s, postgres_probes(s), parallel=True)
        finally:
            pg.resume()
        assert_all_unavailable(answers, None)
        for name, (response, _) in answers.items():
            assert response.json()["error"]["details"].get("dependency") in (None, "postgresql"), (
                name
            )
        assert_postgres_serves(s)


def _db(settings: Settings) -> str:
    return settings.database_url.rsplit("/", 1)[1]


async def _lock_waiters(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return count
    finally:
        await conn.close()


@contextmanager
def holding_lock(pg: PrivatePostgres, dsn: str, table: str) -> Iterator[None]:
    """``table`` locked by another session until the block ends (or the server does)."""
    ready = threading.Event()
    release = threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                ready.set()
                while not release.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            conn.terminate()

    def run() -> None:
        try:
            asyncio.run(hold())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # the server went away: that is the test
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join(10)


# --- the pool's bounds ------------------------------------------------------------------------


async def _sleepers(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            # Running, not merely the last statement of an idle session (a pooled
            # connection keeps showing its last statement until it runs another).
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
            " AND state = 'active' AND pid <> pg_backend_pid()"
        )
        return count
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_a_statement_past_its_timeout_fails_at_once_and_is_still_cancelled() -> None:
    with PrivatePostgres() as pg:
        settings = msgspec.structs.replace(
            base_settings(), database_url=pg.dsn, dependency_timeout_s=0.5
        )
        pool = await create_pool(settings)
        try:
            # A live server: the statement is cancelled on the server too, in the background.
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await pool.fetchval("SELECT pg_sleep(30)")
            elapsed = time.monotonic() - started
            assert MIN_STATEMENT_TIMEOUT_S <= elapsed < MIN_STATEMENT_TIMEOUT_S + 0.3, elapsed
            for _ in range(100):
                if not await _sleepers(pg.dsn):
                    break
                await asyncio.sleep(0.05)
            assert await _sleepers(pg.dsn) == 0
            assert await pool.fetchval("SELECT 1") == 1
            # A frozen server: the caller is answered when the statement times out, without
            # also waiting (the acquire bound) for a cancellation nobody will acknowledge.
            pg.pause()
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await pool.fetchval("SELECT 1")
                elapsed = time.monotonic() - started
            finally:
                pg.resume()
            assert elapsed < MIN_STATEMENT_TIMEOUT_S + 0.3, elapsed
            assert await pool.fetchval("SELECT 1") == 1
        finally:
            await asyncio.wait_for(pool.close(), 10)


@pytest.mark.anyio
async def test_a_refused_connection_names_postgresql() -> None:
    settings = msgspec.structs.replace(
        base_settings(), database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    )
    pool = await create_pool(settings)
    try:
        with pytest.raises(DatabaseUnreachable) as caught:
            await pool.fetchval("SELECT 1")
        error = dependency_error(caught.value)
        assert error is not None and error.details["dependency"] == "postgresql"
    finally:
        await pool.close()


# --- the private servers themselves ----------------------------------------------------------


def test_a_private_redis_stops_restarts_and_loses_its_data_on_demand() -> None:
    with PrivateRedis(appendonly=True) as server:
        port, directory = server.port, server.dir
        with server.client() as c:
            c.set("k", "v")
        server.stop()
        assert not server.answers()
        server.start()
        with server.client() as c:
            assert c.get("k") == b"v"  # from the append-only file
        server.kill()
        server.start()
        with server.client() as c:
            assert c.get("k") == b"v"
        server.pause()
        assert server.ping_reply(timeout=0.3) == b""
        server.resume()
        assert server.ping_reply() == b"+PONG"
        server.restart_empty()
        with server.client() as c:
            assert c.get("k") is None
        assert server.port == port
        proc = server.proc
    assert proc is not None and proc.poll() is not None
    assert not directory.exists()


def test_a_private_postgresql_stops_and_restarts() -> None:
    async def query(dsn: str, sql: str) -> Any:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    with PrivatePostgres() as pg:
        directory = pg.dir
        asyncio.run(query(pg.dsn, "CREATE TABLE kept (x int)"))
        for mode in ("fast", "immediate"):
            pg.stop(mode)
            assert pg.pid is None
            with pytest.raises(OSError):
                asyncio.run(query(pg.dsn, "SELECT 1"))
            pg.start()
            assert asyncio.run(query(pg.dsn, "SELECT count(*) FROM kept")) == 0
        pid = pg.pid
    assert pid is not None and not directory.exists()
    assert not process_alive(pid)


# --- the mapping itself ----------------------------------------------------------------------

_REDIS_UNAVAILABLE: list[BaseException] = [
    rx.ConnectionError("Connection refused"),
    rx.TimeoutError("Timeout reading from socket"),
    rx.BusyLoadingError("Redis is loading the dataset in memory"),
    rx.ReadOnlyError("You can't write against a read only replica."),
    rx.MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
    rx.ClusterDownError("The cluster is down"),
    rx.TryAgainError("Multiple keys request during rehashing of slot"),
    rx.MovedError("3999 127.0.0.1:6381"),
    rx.AskError("3999 127.0.0.1:6381"),
    rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    rx.ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL"),
    rx.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently"),
    rx.ResponseError("NOREPLICAS Not enough good replicas to write."),
    # redis-py's pipelines rewrite the message of the command that failed.
    rx.ResponseError(
        "Command # 1 (EXISTS k) of pipeline caused error: ('BUSY Redis is busy running a script',)"
    ),
    rx.AuthenticationError("invalid username-password pair"),
    rx.ClusterError("TTL exhausted."),
    rx.SlotNotCoveredError("Slot 3999 is not covered by the cluster."),
    rx.MaxConnectionsError("Too many connections"),
]
_POSTGRES_UNAVAILABLE: list[BaseException] = [
    DatabaseUnreachable("could not connect to PostgreSQL: [Errno 111] Connection refused"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle"),
    asyncpg.PostgresConnectionError("connection failure"),
    asyncpg.exceptions.ConnectionFailureError("connection failure"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CrashShutdownError("terminating connection because of crash"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only txn"),
    asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
    asyncpg.exceptions.DiskFullError("could not extend file"),
    asyncpg.exceptions.PostgresIOError("could not read block"),
    asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
]
_OTHER_UNAVAILABLE: list[BaseException] = [
    ConnectionRefusedError(111, "Connection refused"),
    OSError(113, "No route to host"),
    TimeoutError(),  # asyncpg's command_timeout
    PoolTimeout("no PostgreSQL connection came free within 2 s"),
]
_NOT_DEPENDENCY: list[BaseException] = [
    rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    rx.ResponseError("BUSYGROUP Consumer Group name already exists"),
    rx.ResponseError("Command # 2 (GET k) of pipeline caused error: ('WRONGTYPE Operation',)"),
    rx.ResponseError("BUSYKEY Target key name already exists."),
    rx.ResponseError("ERR Error running script: user_script:1: attempt to compare nil"),
    rx.NoScriptError("No matching script. Please use EVAL."),
    rx.ClusterCrossSlotError("Keys in request don't hash to the same slot"),
    asyncpg.exceptions.UniqueViolationError("duplicate key value"),
    asyncpg.exceptions.SerializationError("could not serialize access"),
    asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
    asyncpg.exceptions.CheckViolationError("violates check constraint"),
    ValueError("a bug"),
    KeyError("a bug"),
]


def _name(exc: BaseException) -> str:
    return f"{type(exc).__name__}:{str(exc)[:12]}"


@pytest.mark.parametrize(
    "exc", _REDIS_UNAVAILABLE + _POSTGRES_UNAVAILABLE + _OTHER_UNAVAILABLE, ids=_name
)
def test_every_dependency_failure_maps_to_503_with_retry_after(exc: BaseException) -> None:
    error = dependency_error(exc)
    assert isinstance(error, Unavailable)
    assert error.status == 503
    assert error.retry_after >= 1
    assert error.headers["Retry-After"] == str(error.retry_after)
    assert error.code in ("unavailable", "database_busy")
    if exc in _REDIS_UNAVAILABLE:
        assert error.details["dependency"] == "redis"
    elif exc in _POSTGRES_UNAVAILABLE:
        assert error.details["dependency"] == "postgresql"


@pytest.mark.parametrize("exc", _NOT_DEPENDENCY, ids=_name)
def test_errors_of_the_request_or_of_our_code_are_not_503(exc: BaseException) -> None:
    assert dependency_error(exc) is None


@pytest.mark.parametrize("prefix", sorted(UNAVAILABLE_REPLIES))
def test_the_multiplexers_error_replies_map_like_redis_pys(prefix: str) -> None:
    # What the Multiplexer raises for each reply (redis-py's own parser table).
    message = f"{prefix} 3999 127.0.0.1:6381" if prefix in ("MOVED", "ASK") else f"{prefix} no"
    error = dependency_error(reply_error(message))
    assert isinstance(error, Unavailable) and error.details["dependency"] == "redis"


def test_an_exception_group_is_a_dependency_failure_only_when_all_of_it_is() -> None:
    both = ExceptionGroup("both", [rx.ConnectionError("x"), asyncpg.InterfaceError("y")])
    assert isinstance(dependency_error(both), Unavailable)
    mixed = ExceptionGroup("mixed", [rx.ConnectionError("x"), ValueError("bug")])
    assert dependency_error(mixed) is None
