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
- error replies raise the exception redis-py's own parser raises for them (its table of
  error prefixes, :func:`reply_error`): ``NOSCRIPT`` is
  :class:`~redis.exceptions.NoScriptError` (the script wrapper then loads the script),
  ``LOADING`` :class:`~redis.exceptions.BusyLoadingError`, ``READONLY``
  :class:`~redis.exceptions.ReadOnlyError`..., anything else
  :class:`~redis.exceptions.ResponseError`; so both clients fail alike, and
  :func:`unavailable` tells which of them mean "Redis cannot serve right now" (503 upstream);
- a ``READONLY`` reply means the connection reaches a replica (after a failover, the
  address may name the new primary by now): the connection is given up, failing the
  commands still waiting on it, and the next command connects again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import ssl
from typing import Any

import hiredis
from redis import exceptions as rx
from redis._parsers.base import BaseParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from waitroom.core.settings import Settings

log = logging.getLogger("waitroom.core.redis")

Arg = str | bytes | int | float
_READ_SIZE = 1 << 16


def _pack(args: tuple[Arg, ...]) -> bytes:
    # hiredis's stubs type the argument as a 1-tuple; any tuple of these types packs.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


def reply_error(message: str) -> rx.RedisError:
    """The exception redis-py raises for the error reply ``message`` (``"LOADING ..."``).

    redis-py's parser table (``BaseParser.EXCEPTION_CLASSES``) is reused rather than copied,
    so the Multiplexer raises exactly what redis-py's own client raises for the same reply:
    :class:`~redis.exceptions.NoScriptError`, :class:`~redis.exceptions.BusyLoadingError`
    (a ``ConnectionError``), :class:`~redis.exceptions.ReadOnlyError`... and
    :class:`~redis.exceptions.ResponseError` with the whole message for any other prefix.
    Like redis-py, a known prefix is taken off the message.
    """
    try:
        error: rx.RedisError = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    except Exception:  # e.g. a MOVED reply that is not "slot host:port": never lose a reply
        return rx.ResponseError(message)
    return error


#: Error replies that say the server cannot serve commands right now, whatever the command:
#: a state of the dependency (answered 503 with Retry-After, as a connection failure is),
#: never a fault of the request or of our code (which stay 500):
#:
#: - ``LOADING``: a restarted server is still reading its data set (seconds to minutes);
#: - ``READONLY``: we reach a replica, typically the old primary after a failover, until the
#:   address we use names the new primary;
#: - ``MASTERDOWN``: a replica with ``replica-serve-stale-data no`` lost its primary;
#: - ``CLUSTERDOWN``, ``TRYAGAIN`` (a slot being resharded), ``MOVED``/``ASK`` (the key's slot
#:   lives on another node: a cluster we reach without a cluster client, or mid-resharding):
#:   the topology is changing under us;
#: - ``BUSY``: a script (or module command) runs past ``busy-reply-threshold``; Redis
#:   answers nothing else until it ends or is killed;
#: - ``OOM``: ``maxmemory`` reached with nothing to evict: writes are refused until memory is
#:   freed, which is an operator's (or the eviction policy's) business, not the client's;
#: - ``MISCONF``: the last RDB save failed and ``stop-writes-on-bgsave-error`` refuses writes;
#: - ``NOREPLICAS``: fewer replicas than ``min-replicas-to-write`` are in sync.
#:
#: ``NOSCRIPT`` is not here: the script wrapper loads the script and tries again.
UNAVAILABLE_REPLIES = frozenset(
    {
        "LOADING",
        "READONLY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "MOVED",
        "ASK",
        "BUSY",
        "OOM",
        "MISCONF",
        "NOREPLICAS",
    }
)

#: The classes redis-py's parser raises for those of UNAVAILABLE_REPLIES it knows (taking the
#: prefix off the message); the others arrive as a ResponseError whose message starts with
#: the prefix. MasterDownError is a ClusterDownError, MovedError an AskError.
_UNAVAILABLE_CLASSES = (
    rx.BusyLoadingError,
    rx.ReadOnlyError,
    rx.ClusterDownError,
    rx.TryAgainError,
    rx.AskError,
    rx.OutOfMemoryError,
)


_PIPELINE_ERROR = re.compile(r"Command # \d+ \(.*\) of pipeline caused error: \W*", re.DOTALL)


def unavailable(exc: BaseException) -> bool:
    """True when ``exc`` is Redis refusing to serve for now (:data:`UNAVAILABLE_REPLIES`),
    from redis-py's client or the Multiplexer. Connection failures and timeouts are not
    covered here: callers test for ``ConnectionError``/``TimeoutError`` themselves."""
    if isinstance(exc, _UNAVAILABLE_CLASSES):
        return True
    if type(exc) is rx.ResponseError:
        message = str(exc)
        # redis-py's pipelines rewrite the message of the command that failed:
        # "Command # 1 (EXISTS k) of pipeline caused error: ('BUSY Redis is busy...',)".
        annotated = _PIPELINE_ERROR.match(message)
        if annotated is not None:
            message = message[annotated.end() :]
        return message.split(" ", 1)[0] in UNAVAILABLE_REPLIES
    return False


def _error(reply: Exception) -> rx.RedisError:
    return reply_error(str(reply))


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
                        error = _error(reply)
                        future.set_exception(error)
                        if isinstance(error, rx.ReadOnlyError):
                            # A replica: after a failover the address may lead to the new
                            # primary by now, but this connection never will.
                            self.fail(rx.ConnectionError(f"Redis is a read-only replica: {error}"))
                            return
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


#: The longest a blocking command of ours waits for data (``BLPOP``/``XREAD BLOCK`` of
#: inventory.forwarding, 1 s): redis-py's socket timeout must outlast it.
LONGEST_BLOCK_S = 1.0


def make_redis(settings: Settings) -> Redis:
    """A Redis client whose pool waits for a free connection instead of failing a burst.

    Every wait is bounded: for a pooled connection and for connecting by the dependency
    timeout, for a reply by the dependency timeout too, or by a second more than the
    longest blocking command when that is longer. redis-py retries nothing here, so one
    command waits at most that long.

    A connection that fails, times out, finds Redis loading (``BusyLoadingError`` is a
    ``ConnectionError``) or answers ``READONLY`` is closed, and the next command on it
    connects again: after a failover, the address may lead to the new primary by then (the
    Multiplexer does the same).
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.dependency_timeout_s,
        socket_connect_timeout=settings.dependency_timeout_s,
        socket_timeout=max(settings.dependency_timeout_s, LONGEST_BLOCK_S + 1.0),
        health_check_interval=30,
        # No retries (a command may have run); "supported" errors only close the connection.
        retry=Retry(NoBackoff(), 0, (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError)),
    )
    # from_pool hands the pool to the client, so aclose() also closes its connections.
    return Redis.from_pool(pool)
