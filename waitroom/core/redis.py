"""Redis clients: redis-py with a blocking pool, and one auto-pipelined connection for the hot path.

Measured here, redis-py's asyncio client spends 130-400 us of CPU per command (pool
checkout, per-argument encoding in Python, a timeout context per read), several times the
whole cost of a trivial HTTP request. A join is one ``EVALSHA``, so that client set the
ceiling of join throughput. :class:`Multiplexer` instead sends every command of every
concurrent caller over ONE connection: commands issued in the same event-loop iteration
are packed by hiredis (C) and written together, and one reader task parses the replies
(hiredis again) and hands them back in order. Measured here: about 10 us of CPU per command.

Scope: the Lua scripts of :mod:`waitroom.line.scripts` (``evalsha`` and ``script_load``) and
plain commands through :meth:`Multiplexer.execute`; no pub/sub, no blocking commands, no
transactions (they would stall or interleave with everyone else's commands).

Failure handling, each case tested:

- every command must be answered within ``timeout`` seconds; a watchdog that finds the
  oldest unanswered command older than that declares the connection dead;
- a dead connection (timeout, reset, EOF) fails every command waiting on it with
  :class:`redis.exceptions.TimeoutError` or :class:`~redis.exceptions.ConnectionError`
  (the HTTP layer turns both into 503 with Retry-After); it is never retried here, since a
  command may or may not have run; the next command opens a new connection;
- a caller cancelled while waiting leaves its slot in the queue, so replies stay aligned;
- error replies raise :class:`~redis.exceptions.ResponseError`, ``NOSCRIPT`` replies
  :class:`~redis.exceptions.NoScriptError` (the script wrapper then loads the script).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from typing import Any

import hiredis
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from waitroom.core.settings import Settings

log = logging.getLogger("waitroom.core.redis")

Arg = str | bytes | int | float
_READ_SIZE = 1 << 16


def _pack(args: tuple[Arg, ...]) -> bytes:
    # hiredis's stubs type the argument as a 1-tuple; any tuple of these types packs.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


def _error(reply: Exception) -> rx.ResponseError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return rx.NoScriptError(message)
    return rx.ResponseError(message)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Mark the outcome as seen: a failed attempt nobody awaits any more is not an error.
    if not future.cancelled():
        future.exception()


class _Connection:
    """One live connection: a FIFO of waiting futures, a write batch, a reader task."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._batch: list[bytes] = []
        self._flush_scheduled = False
        self._parser = hiredis.Reader()
        self.failure: Exception | None = None
        self._read_task = asyncio.create_task(self._read(), name="redis-mux-reader")
        self._watchdog = self._loop.call_later(self._check_every, self._check)

    @property
    def _check_every(self) -> float:
        return min(0.5, self._timeout / 4)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue ``packed`` (one command) for the next write; its reply's future."""
        if self.failure is not None:
            raise rx.ConnectionError(f"Redis connection lost: {self.failure}")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((future, self._loop.time()))
        self._batch.append(packed)
        if not self._flush_scheduled:
            # Everything queued during this loop iteration goes out in one write.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.failure is None and self._batch:
            self._writer.write(b"".join(self._batch))
        self._batch.clear()

    async def _read(self) -> None:
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    raise rx.ConnectionError("Redis closed the connection")
                self._parser.feed(data)
                while (reply := self._parser.gets()) is not False:
                    future, _ = self._pending.popleft()
                    if future.done():
                        continue  # its caller was cancelled; the slot kept replies aligned
                    if isinstance(reply, hiredis.ReplyError):
                        future.set_exception(_error(reply))
                    else:
                        future.set_result(reply)
        except asyncio.CancelledError:
            self.fail(rx.ConnectionError("the connection was closed"))
            raise
        except Exception as exc:  # reset, EOF, protocol error: the connection is gone
            self.fail(exc if isinstance(exc, rx.ConnectionError) else rx.ConnectionError(repr(exc)))

    def _check(self) -> None:
        if self.failure is not None:
            return
        if self._pending and self._loop.time() - self._pending[0][1] > self._timeout:
            self.fail(rx.TimeoutError(f"Redis did not answer within {self._timeout:g}s"))
            return
        self._watchdog = self._loop.call_later(self._check_every, self._check)

    def fail(self, error: Exception) -> None:
        """Declare the connection dead: fail every waiting command with ``error``."""
        if self.failure is not None:
            return
        self.failure = error
        self._watchdog.cancel()
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
        self._writer.close()
        if asyncio.current_task() is not self._read_task:
            self._read_task.cancel()

    async def close(self) -> None:
        self.fail(rx.ConnectionError("the connection was closed"))
        await asyncio.wait([self._read_task])
        with contextlib.suppress(OSError):  # closing a connection that already broke
            await self._writer.wait_closed()


class Multiplexer:
    """A Redis client for many concurrent callers over one pipelined connection.

    Quacks like the parts of ``redis.asyncio.Redis`` that :mod:`waitroom.line.scripts` uses
    (``evalsha``, ``script_load``). Connects lazily: a Redis that is down at start-up only
    fails the commands sent while it is down.
    """

    def __init__(self, url: str, *, timeout: float) -> None:
        self._params = parse_url(url)
        self._timeout = timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    async def execute(self, *args: Arg) -> Any:
        """Send one command; its reply (bytes, int, None, or nested lists of them)."""
        packed = _pack(args)
        conn = self._conn
        if conn is None or conn.failure is not None:
            conn = await self._connection()
        return await conn.send(packed)

    async def evalsha(self, sha: str, numkeys: int, *args: Arg) -> Any:
        """``EVALSHA``: run a loaded script."""
        return await self.execute("EVALSHA", sha, numkeys, *args)

    async def script_load(self, source: str) -> str:
        """``SCRIPT LOAD``: the script's SHA1."""
        sha: bytes = await self.execute("SCRIPT", "LOAD", source)
        return sha.decode()

    async def _connection(self) -> _Connection:
        if self._closed:
            raise rx.ConnectionError("the Redis client is closed")
        connecting = self._connecting
        if connecting is None or connecting.done():
            # Concurrent callers share one connection attempt; a finished attempt (good or
            # failed) is never reused: the caller is here because it has no live connection.
            connecting = self._connecting = asyncio.ensure_future(self._connect())
            connecting.add_done_callback(_retrieve)
        return await asyncio.shield(connecting)

    async def _connect(self) -> _Connection:
        params: Any = self._params
        cls = params.get("connection_class")
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout):
                if cls is UnixDomainSocketConnection:
                    reader, writer = await asyncio.open_unix_connection(params["path"])
                else:
                    context = ssl.create_default_context() if cls is SSLConnection else None
                    reader, writer = await asyncio.open_connection(
                        params.get("host", "localhost"), params.get("port", 6379), ssl=context
                    )
                conn = _Connection(reader, writer, self._timeout)
                password, username = params.get("password"), params.get("username")
                if password is not None:
                    auth = (username, password) if username else (password,)
                    await conn.send(_pack(("AUTH", *auth)))
                if params.get("db"):
                    await conn.send(_pack(("SELECT", params["db"])))
        except BaseException as exc:
            if conn is not None:
                await conn.close()
            if isinstance(exc, TimeoutError):  # the builtin one, from asyncio.timeout
                raise rx.TimeoutError(
                    f"could not connect to Redis within {self._timeout:g}s"
                ) from None
            if isinstance(exc, OSError):
                raise rx.ConnectionError(f"could not connect to Redis: {exc}") from None
            raise
        old, self._conn = self._conn, conn
        if old is not None:
            await old.close()
        return conn

    async def aclose(self) -> None:
        """Close the connection, failing any command still waiting."""
        self._closed = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            await asyncio.wait([self._connecting])
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def make_redis(settings: Settings) -> Redis:
    """A Redis client whose pool waits for a free connection instead of failing a burst."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.dependency_timeout_s,
        socket_connect_timeout=settings.dependency_timeout_s,
        socket_timeout=max(settings.dependency_timeout_s, 5.0),
        health_check_interval=30,
    )
    # from_pool hands the pool to the client, so aclose() also closes its connections.
    return Redis.from_pool(pool)
