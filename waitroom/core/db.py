"""PostgreSQL adapter: the connection pool and the versioned, checksummed migrations.

Migrations are the ``NNNN_name.sql`` files in ``waitroom/migrations``: append-only, applied in
version order, each recorded in ``schema_migrations`` with the sha256 of the file as applied.
A file may never change once released: :func:`migrate` and :func:`require_current_schema`
refuse a database that recorded a different checksum, or a version this release does not
ship (a newer release migrated it), with a one-line :class:`~waitroom.core.errors.SchemaError`.
``serve`` and ``workers`` start only on a database that has every migration applied.

Each migration runs in its own transaction, unless its first line is
``-- waitroom: no-transaction`` (for ``CREATE INDEX CONCURRENTLY`` and the like): then its
statements run one at a time, outside any transaction, and must be safe to run again
(``IF NOT EXISTS``), since a crash may leave such a migration half applied.

A session-level advisory lock makes ``waitroom migrate`` safe when several processes run it
at once: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from waitroom.core.errors import SchemaError
from waitroom.core.runtime import cancel_and_wait
from waitroom.core.settings import Settings

log = logging.getLogger("waitroom.db")

#: Seconds between two tries of the migration lock while another process holds it.
MIGRATION_LOCK_POLL_S = 0.1
#: Arbitrary constant naming the advisory lock that serializes migrations.
MIGRATION_LOCK_ID = 0x77616974726F6F6D  # "waitroom"
#: First line of a migration that must run outside a transaction.
NO_TRANSACTION = "-- waitroom: no-transaction"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: Version numbers no migration file has, on purpose, and why: versions need not be
#: contiguous, but a gap should not look like a file lost on the way.
RETIRED_VERSIONS: dict[int, str] = {
    3: "0003_inventory was retired before the first release, 0.1.0",
}
#: Statement boundaries of a no-transaction migration: a semicolon ending a line.
_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)

_CREATE_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())"""
# Releases before checksums recorded none; the column is added, and filled from the files of
# this release ("adopted"), the first time this release migrates such a database.
_ADD_CHECKSUM = "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text"


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the file's text, as recorded when it is applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        """False for a migration marked to run outside a transaction."""
        return not self.sql.startswith(NO_TRANSACTION)

    def statements(self) -> list[str]:
        """The statements of a no-transaction migration, in order."""
        parts = _STATEMENT_END.split(self.sql)
        return [s.strip() for s in parts if _has_code(s)]


def _has_code(sql: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in sql.splitlines())


def migrations(package: str = "waitroom.migrations") -> list[Migration]:
    """The migration files shipped in ``package``, in version order."""
    found = []
    for entry in resources.files(package).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise SchemaError(f"migration file {entry.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"duplicate migration versions: {versions}")
    return found


@dataclass(frozen=True, slots=True)
class SchemaState:
    """How a database's recorded migrations compare with this release's files."""

    #: Versions this release ships that the database has not applied.
    pending: list[int]
    #: Versions applied before checksums were recorded (filled in by the next migrate).
    unchecked: list[int]


async def schema_state(conn: Any, shipped: list[Migration] | None = None) -> SchemaState:
    """Compare ``conn``'s ``schema_migrations`` with ``shipped``; raise on drift.

    Raises :class:`SchemaError` when the database recorded a version this release does not
    ship, or a checksum other than its file's.
    """
    shipped = migrations() if shipped is None else shipped
    by_version = {m.version: m for m in shipped}
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return SchemaState(pending=sorted(by_version), unchecked=[])
    has_checksum = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
        " WHERE table_name = 'schema_migrations' AND column_name = 'checksum'"
        " AND table_schema = current_schema())"
    )
    column = "checksum" if has_checksum else "NULL::text AS checksum"
    rows = await conn.fetch(f"SELECT version, {column} FROM schema_migrations ORDER BY version")
    unknown = [r["version"] for r in rows if r["version"] not in by_version]
    if unknown:
        raise SchemaError(
            f"the database has migration {unknown[0]}, which this release does not ship"
            " (was it migrated by a newer release?)"
        )
    for row in rows:
        expected = by_version[row["version"]].checksum
        if row["checksum"] is not None and row["checksum"] != expected:
            raise SchemaError(
                f"migration {row['version']} was changed after it was applied"
                f" (recorded sha256 {row['checksum'][:12]}, file {expected[:12]});"
                " add a new migration instead of editing a released one"
            )
    applied = {r["version"] for r in rows}
    return SchemaState(
        pending=[v for v in sorted(by_version) if v not in applied],
        unchecked=[r["version"] for r in rows if r["checksum"] is None],
    )


async def require_current_schema(pool: asyncpg.Pool[Any]) -> None:
    """Refuse to run on a database that lacks a migration or has drifted from the files.

    A database that cannot be reached is let through with a warning: the pool connects on
    demand, requests answer 503 until PostgreSQL is back, and ``migrate`` guards the schema.
    """
    try:
        async with pool.acquire() as conn:
            state = await schema_state(conn)
    except SchemaError:
        raise
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Down, unknown database, no permission: /readyz names it; nothing was decided here.
        log.warning("could not check the database schema", extra={"error": repr(exc)})
        return
    if state.pending:
        raise SchemaError(
            "the database schema is behind this release (missing migrations "
            + ", ".join(map(str, state.pending))
            + "): run `waitroom migrate`"
        )


async def migrate(
    dsn: str, *, timeout: float = 10.0, shipped: list[Migration] | None = None
) -> list[int]:
    """Apply the migrations the database at ``dsn`` lacks; return the versions applied.

    Checks every recorded checksum first (:func:`schema_state`), so a drifted database is
    refused before anything is written.
    """
    shipped = migrations() if shipped is None else shipped
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, timeout=timeout)
    applied: list[int] = []
    try:
        await _take_migration_lock(conn)
        try:
            await conn.execute(_CREATE_TABLE)
            await conn.execute(_ADD_CHECKSUM)
            state = await schema_state(conn, shipped)
            by_version = {m.version: m for m in shipped}
            for version in state.unchecked:
                await conn.execute(
                    "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                    version,
                    by_version[version].checksum,
                )
                log.info("recorded the checksum of a migration", extra={"version": version})
            for version in state.pending:
                await _apply(conn, by_version[version])
                log.info("applied migration", extra={"version": version})
                applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()
    return applied


async def _take_migration_lock(conn: asyncpg.Connection[Any]) -> None:
    """Take the migration lock, polling rather than blocking in ``pg_advisory_lock``.

    A session blocked in ``SELECT pg_advisory_lock(...)`` is inside a statement, with a
    snapshot, for as long as it waits, and ``CREATE INDEX CONCURRENTLY`` in the process that
    holds the lock waits for every such snapshot to go: the two would wait for each other
    forever. Short ``pg_try_advisory_lock`` statements hold no snapshot between tries.
    """
    while True:
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_ID):
            return
        await asyncio.sleep(MIGRATION_LOCK_POLL_S)


async def _apply(conn: asyncpg.Connection[Any], migration: Migration) -> None:
    record = (
        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
        migration.version,
        migration.name,
        migration.checksum,
    )
    if migration.transactional:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(*record)
        return
    # One statement per round trip: several in one simple query would form an implicit
    # transaction, which CREATE INDEX CONCURRENTLY refuses.
    for statement in migration.statements():
        await conn.execute(statement)
    await conn.execute(*record)


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def database_name(dsn: str) -> str:
    """The database named by ``dsn``."""
    return urlsplit(dsn).path.lstrip("/") or "postgres"


async def ensure_database(dsn: str, *, timeout: float = 10.0) -> bool:
    """Create the database named by ``dsn`` when it does not exist; True if it was created."""
    name = database_name(dsn)
    admin: asyncpg.Connection[Any] = await asyncpg.connect(
        _with_database(dsn, "postgres"), timeout=timeout
    )
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await admin.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.DuplicateDatabaseError:
            return False  # another process created it first
        return True
    finally:
        await admin.close()


async def drop_database(dsn: str, *, timeout: float = 10.0) -> None:
    """Drop the database named by ``dsn`` (tests), ending its other sessions."""
    name = database_name(dsn)
    admin: asyncpg.Connection[Any] = await asyncpg.connect(
        _with_database(dsn, "postgres"), timeout=timeout
    )
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await admin.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await admin.close()


#: The transaction-local setting by which a writer says it sends its wake-ups itself, after
#: its commit, with :func:`hint` (schema 25): the notifying triggers then stay silent.
HINT_AFTER_COMMIT = "SET LOCAL waitroom.hint_after_commit = on"


async def hint(conn: Any, channel: str, payload: str) -> None:
    """NOTIFY ``channel`` with ``payload`` now, as a wake-up sent after a commit.

    A notifying transaction holds PostgreSQL's one notification lock from its commit's start
    to its end, WAL flush included, so notifying transactions commit one at a time: sent
    from the durable transaction itself, every confirm and settled payment of a sale queued
    behind the others' flushes (schema 25). This one runs in a transaction of its own whose
    commit is asynchronous (``waitroom_hint()``): it holds the lock for microseconds. Inside
    a transaction of the caller's, it is that transaction's ordinary NOTIFY (sent at its
    commit). A hint may be lost in a crash: its listeners also poll, or wait with a deadline.
    So one that fails after the commit is logged, never raised: the change it announces is
    done, and the request that made it must not fail for its wake-up.
    """
    if conn.is_in_transaction():
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
        return
    try:
        await conn.execute("SELECT waitroom_hint($1, $2)", channel, payload)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("could not send a wake-up", extra={"channel": channel, "error": repr(exc)})


class PoolTimeout(TimeoutError):
    """No pooled PostgreSQL connection came free within the acquire bound (503 upstream).

    A ``TimeoutError``, so code that already treats a timed-out dependency as unavailable
    (the actor's commit, ``/readyz``) treats an exhausted pool the same way.
    """


class DatabaseUnreachable(ConnectionError):
    """Opening a pooled connection failed at the socket: refused, reset, no route (503 upstream).

    A ``ConnectionError`` (an ``OSError``), as what it replaces was, that names PostgreSQL,
    so the 503 says which dependency is down.
    """


#: Seconds between two checks that a pool's floor of connections is open.
FLOOR_CHECK_S = 5.0

#: The shortest bound on one statement: a very short ``WAITROOM_DEPENDENCY_TIMEOUT_S`` (tests
#: use half a second to wait less for a dead server) must not turn a statement that waits a
#: moment behind a lock into a failure.
MIN_STATEMENT_TIMEOUT_S = 2.0


class BoundedPool(asyncpg.Pool):
    """An asyncpg pool whose every acquire is bounded, by default by ``acquire_timeout``.

    asyncpg waits for a free connection forever unless each caller passes a timeout, and
    ``pool.fetch()`` and friends pass none: a few slow readers holding every connection
    would leave all other requests hanging. Here a wait longer than the bound raises
    :class:`PoolTimeout`, which the HTTP layer answers 503 with Retry-After
    (:func:`waitroom.core.http.dependency_error`). The bound covers opening a connection
    too (asyncpg applies it to the whole acquire); a connection refused or reset while
    opening raises :class:`DatabaseUnreachable`.

    Releasing a connection whose statement timed out (or whose caller was cancelled) does
    not hold up the caller: asyncpg waits there, up to the acquire bound, for PostgreSQL to
    acknowledge the cancellation of the statement, which a server that let the statement
    time out is unlikely to do promptly. That wait (and the reset, or closing the
    connection when it does not come) goes on in the background; the caller's error (a 503
    upstream) goes out at once.
    """

    def __init__(self, *args: Any, acquire_timeout: float, floor: int = 0, **kwargs: Any) -> None:
        self.acquire_timeout = acquire_timeout
        #: Connections kept open while idle (``WAITROOM_DB_POOL_MIN``): see :meth:`keep_floor`.
        self.floor = floor
        self._floor_task: asyncio.Task[None] | None = None
        self._floor_stop = asyncio.Event()
        self._releasing: set[asyncio.Task[None]] = set()
        super().__init__(*args, **kwargs)

    def get_min_size(self) -> int:
        # asyncpg closes a connection idle for max_inactive_connection_lifetime only while
        # the pool holds more than this: the floor's connections stay open.
        return max(super().get_min_size(), self.floor)

    def keep_floor(self) -> None:
        """Open :attr:`floor` connections in the background, and again whenever fewer are
        open (PostgreSQL restarted), every :data:`FLOOR_CHECK_S`.

        asyncpg keeps a minimum only of connections it opened before the pool was ready,
        which would make starting wait for PostgreSQL; this never does, and a database
        that is down is tried again at the next check.
        """
        if self.floor > 0 and self._floor_task is None:
            self._floor_task = asyncio.create_task(self._keep_floor(), name="db-pool-floor")

    async def _keep_floor(self) -> None:
        while not self._floor_stop.is_set():
            if self.get_size() < self.floor:
                try:
                    await self._open_floor()
                except Exception as exc:  # PostgreSQL down or busy: the next check tries again
                    log.debug("could not open the pool's floor", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._floor_stop.wait(), FLOOR_CHECK_S)

    async def _open_floor(self) -> None:
        # Held at once, the floor's connections must all be open; given back, they stay
        # (get_min_size). One after the other in this task, each handed to the stack as it
        # is acquired, so that a cancellation can never strand one checked out, which would
        # hold close() up for ever (asyncio.gather's results are lost when the gather itself
        # is cancelled).
        async with contextlib.AsyncExitStack() as held:
            for _ in range(self.floor):
                if self._floor_stop.is_set():
                    return
                await held.enter_async_context(self.acquire())

    async def close(self) -> None:
        task = self._floor_task
        if task is not None:
            # Asked to stop, it ends after the connection it is opening (cancelled mid-way,
            # asyncpg reports the connection lost as an error); cancelled if that is slow.
            self._floor_stop.set()
            await asyncio.wait({task}, timeout=self.acquire_timeout + 1.0)
            await cancel_and_wait(task)
        await super().close()

    def terminate(self) -> None:
        if self._floor_task is not None:
            self._floor_task.cancel()
        super().terminate()

    # asyncpg's acquire(), its ``async with`` form and fetch()/execute()... all come here.
    async def _acquire(self, timeout: float | None) -> Any:
        bound = self.acquire_timeout if timeout is None else timeout
        try:
            return await super()._acquire(bound)  # type: ignore[misc]
        except TimeoutError:
            raise PoolTimeout(f"no PostgreSQL connection came free within {bound:g} s") from None
        except OSError as exc:
            raise DatabaseUnreachable(f"could not connect to PostgreSQL: {exc}") from exc

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        if _cancelling(connection):
            task = asyncio.create_task(super().release(connection, timeout=timeout))
            self._releasing.add(task)
            task.add_done_callback(_released)
            task.add_done_callback(self._releasing.discard)
            return
        await super().release(connection, timeout=timeout)


def _cancelling(connection: Any) -> bool:
    """Whether asyncpg is cancelling the statement of ``connection`` (a pool's proxy)."""
    protocol = getattr(getattr(connection, "_con", None), "_protocol", None)
    is_cancelling = getattr(protocol, "_is_cancelling", None)
    return bool(is_cancelling()) if callable(is_cancelling) else False


def _released(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("releasing a connection failed", extra={"error": repr(task.exception())})


class PooledConnection(asyncpg.Connection):
    """A pooled connection given back without asyncpg's reset statement.

    asyncpg sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`` on
    every release: a round trip per checkout, 7% of a server process's CPU in the cluster
    sale (a crowd polling its payments) and as much again in PostgreSQL. waitroom leaves no
    session state on a pooled connection: no ``SET`` outside a transaction, no advisory lock
    (the migration lock is taken on a connection of its own), no cursor outside a
    transaction, and the one ``LISTEN`` (the payment workers') is undone by
    ``remove_listener`` before its connection goes back. A transaction left open is still
    rolled back: asyncpg does that before it asks for this statement.
    """

    def get_reset_query(self) -> str:
        return ""


async def create_pool(settings: Settings) -> asyncpg.Pool[Any]:
    """A pool that does not need PostgreSQL to be up yet: connections open on demand, and
    ``db_pool_min`` of them (the floor) are opened in the background and kept open.

    Every connection attempt, every wait for a pooled connection (:class:`BoundedPool`) and
    every statement is bounded, so a database that is down, hanging or fully busy turns into
    an error (503 upstream) rather than a stuck request: connecting and waiting by the
    dependency timeout, a statement by the dependency timeout too (at least
    :data:`MIN_STATEMENT_TIMEOUT_S`; a caller with a longer job passes ``timeout=``).
    """
    pool: asyncpg.Pool[Any] = await BoundedPool(
        settings.database_url,
        acquire_timeout=settings.dependency_timeout_s,
        min_size=0,  # the floor is kept by keep_floor(), without waiting for PostgreSQL
        floor=settings.db_pool_min,
        max_size=settings.db_pool_max,
        max_queries=50_000,
        max_inactive_connection_lifetime=60.0,
        connect=None,
        setup=None,
        init=None,
        reset=None,
        loop=None,
        connection_class=PooledConnection,
        record_class=asyncpg.Record,
        timeout=settings.dependency_timeout_s,
        command_timeout=max(settings.dependency_timeout_s, MIN_STATEMENT_TIMEOUT_S),
    )
    assert isinstance(pool, BoundedPool)
    pool.keep_floor()
    return pool
