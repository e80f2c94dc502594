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
from typing import Any, cast

import hiredis
from redis import exceptions as rx
from redis._parsers.base import BaseParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from waitroom.core.runtime import cancel_and_wait
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
    # redis-py's cluster client: redirections past its limit (a slot moving, or its ASK
    # handling losing the race on a warm pool, ADR 0010), and a slot no node serves.
    rx.ClusterError,
    rx.SlotNotCoveredError,
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
        # A reader cancelled before its first step (a loop shutting down right after the
        # connect) never runs its own cleanup: the socket is closed here all the same.
        self._read_task.add_done_callback(self._reader_done)
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

    def _reader_done(self, _: asyncio.Task[None]) -> None:
        self.fail(rx.ConnectionError("the connection was closed"))

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


class _Node:
    """One Redis server's pipelined connection: opened lazily, opened again after a failure."""

    def __init__(self, params: dict[str, Any], timeout: float) -> None:
        self._params = params
        self._timeout = timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self.closed = False

    async def send(self, packed: bytes) -> Any:
        """Send one packed command; its reply."""
        conn = self._conn
        if conn is None or conn.failure is not None:
            conn = await self._connection()
        return await conn.send(packed)

    async def send_asking(self, packed: bytes) -> Any:
        """``ASKING`` and then the command, adjacent on the connection (no await between:
        nobody else's command can come between them)."""
        conn = self._conn
        if conn is None or conn.failure is not None:
            conn = await self._connection()
        asking = conn.send(_pack(("ASKING",)))
        asking.add_done_callback(_retrieve)
        return await conn.send(packed)

    async def _connection(self) -> _Connection:
        if self.closed:
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
        self.closed = True
        if self._connecting is not None and not self._connecting.done():
            await cancel_and_wait(self._connecting)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


#: The URL schemes of a Redis Cluster: ``redis+cluster://host:port,host:port`` (any of the
#: nodes; the rest are found from them), ``rediss+cluster://`` for TLS.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Redirections followed for one command before giving up (503): a slot moving twice.
MAX_REDIRECTS = 3


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (see :data:`CLUSTER_SCHEMES`)."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_seeds(url: str) -> tuple[list[tuple[str, int]], str]:
    """The ``(host, port)`` nodes of a cluster URL, and a plain URL with its credentials
    and TLS scheme (without a database: a cluster has only database 0)."""
    scheme, rest = url.split("://", 1)
    userinfo, _, hosts = rest.rpartition("@")
    hosts = hosts.split("/", 1)[0].split("?", 1)[0]
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, "6379"
        seeds.append((host.strip("[]"), int(port)))
    plain = "rediss" if scheme.lower().startswith("rediss") else "redis"
    auth = f"{userinfo}@" if userinfo else ""
    return seeds, f"{plain}://{auth}{seeds[0][0]}:{seeds[0][1]}/0"


def _key_of(args: tuple[Arg, ...]) -> Arg | None:
    """The key a command routes by: the first key of an ``EVALSHA``/``EVAL``, else the first
    argument (every other command the hot path sends names its key first)."""
    name = str(args[0]).upper() if not isinstance(args[0], bytes) else args[0].decode().upper()
    if name in ("EVALSHA", "EVAL"):
        return args[3] if int(args[2]) > 0 else None
    return args[1] if len(args) > 1 else None


class Multiplexer:
    """A Redis client for many concurrent callers over one pipelined connection per server.

    Quacks like the parts of ``redis.asyncio.Redis`` that :mod:`waitroom.line.scripts` uses
    (``evalsha``, ``script_load``). Connects lazily: a Redis that is down at start-up only
    fails the commands sent while it is down.

    Given a cluster URL (:data:`CLUSTER_SCHEMES`), it keeps one such connection per primary
    and sends each command to the primary of its key's hash slot (waitroom's keys carry the
    event in a hash tag, so one script's keys share a slot): the slot table comes from
    ``CLUSTER SLOTS``, a ``MOVED`` reply updates the slot and sends the command again where
    it now lives (it did not run), an ``ASK`` sends it once to the importing node after
    ``ASKING``, and a connection that fails makes the next command read the table again
    (a replica may have been promoted). Scripts are loaded on every primary. ADR 0010 says
    why this rather than a cluster client library.
    """

    def __init__(self, url: str, *, timeout: float) -> None:
        self._timeout = timeout
        self._closed = False
        self._cluster = is_cluster_url(url)
        self._slots: list[tuple[str, int] | None] = []
        self._refreshing: asyncio.Future[None] | None = None
        self._stale = True
        if self._cluster:
            self._seeds, plain = cluster_seeds(url)
            self._params: dict[str, Any] = dict(parse_url(plain))
            self._nodes: dict[tuple[str, int], _Node] = {}
            self._single: _Node | None = None
        else:
            self._seeds, self._params, self._nodes = [], dict(parse_url(url)), {}
            self._single = _Node(self._params, timeout)

    async def execute(self, *args: Arg) -> Any:
        """Send one command; its reply (bytes, int, None, or nested lists of them)."""
        packed = _pack(args)
        if self._single is not None:
            return await self._single.send(packed)
        key = _key_of(args)
        if key is None:
            raise rx.RedisClusterException(f"{args[0]!r} names no key to route it by")
        slot = key_slot(key if isinstance(key, bytes) else str(key).encode())
        for _ in range(MAX_REDIRECTS):
            node = await self._node_of(slot)
            try:
                return await node.send(packed)
            except rx.MovedError as moved:
                # Not run: the slot lives elsewhere now. Note it, read the whole table
                # again soon, and send it there.
                self._slots[moved.slot_id] = (moved.host, int(moved.port))
                self._stale = True
            except rx.AskError as ask:
                # The slot is migrating and this key has moved already: this once, there.
                return await self._node((ask.host, int(ask.port))).send_asking(packed)
            except (rx.ConnectionError, rx.TimeoutError):
                self._stale = True  # a failover may have promoted a replica
                raise
        raise rx.TryAgainError(f"slot {slot} kept moving")

    async def evalsha(self, sha: str, numkeys: int, *args: Arg) -> Any:
        """``EVALSHA``: run a loaded script."""
        return await self.execute("EVALSHA", sha, numkeys, *args)

    async def script_load(self, source: str) -> str:
        """``SCRIPT LOAD``: the script's SHA1 (on every primary of a cluster)."""
        packed = _pack(("SCRIPT", "LOAD", source))
        if self._single is not None:
            sha: bytes = await self._single.send(packed)
            return sha.decode()
        await self._refresh()
        primaries = {node for node in self._slots if node is not None}
        shas = await asyncio.gather(*(self._node(n).send(packed) for n in primaries))
        return bytes(shas[0]).decode()

    def _node(self, address: tuple[str, int]) -> _Node:
        node = self._nodes.get(address)
        if node is None:
            if self._closed:
                raise rx.ConnectionError("the Redis client is closed")
            params = {**self._params, "host": address[0], "port": address[1]}
            node = self._nodes[address] = _Node(params, self._timeout)
        return node

    async def _node_of(self, slot: int) -> _Node:
        if self._stale or not self._slots:
            await self._refresh()
        address = self._slots[slot]
        if address is None:
            raise rx.ClusterDownError(f"no node serves slot {slot}")
        return self._node(address)

    async def _refresh(self) -> None:
        """Read the slot table (one reader at a time; the others wait for it)."""
        refreshing = self._refreshing
        if refreshing is None or refreshing.done():
            refreshing = self._refreshing = asyncio.ensure_future(self._read_slots())
            refreshing.add_done_callback(_retrieve)
        await asyncio.shield(refreshing)

    async def _read_slots(self) -> None:
        known = list(dict.fromkeys([*self._seeds, *(n for n in self._slots if n)]))
        failure: Exception | None = None
        for address in known:
            try:
                reply = await self._node(address).send(_pack(("CLUSTER", "SLOTS")))
            except rx.RedisError as exc:
                failure = exc
                continue
            slots: list[tuple[str, int] | None] = [None] * 16384
            for start, end, primary, *_ in reply:
                host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                slots[int(start) : int(end) + 1] = [(host or address[0], int(primary[1]))] * (
                    int(end) - int(start) + 1
                )
            self._slots, self._stale = slots, False
            return
        raise rx.ConnectionError(f"no node of the Redis Cluster answered: {failure}")

    async def aclose(self) -> None:
        """Close the connections, failing any command still waiting."""
        self._closed = True
        nodes = [*self._nodes.values(), *([self._single] if self._single else [])]
        await asyncio.gather(*(node.aclose() for node in nodes))


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
    if is_cluster_url(settings.redis_url):
        return _make_cluster(settings)
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


#: redis-py's cluster client per node: this many times ``WAITROOM_REDIS_MAX_CONNECTIONS``.
CLUSTER_CONNECTIONS_FACTOR = 4


def redis_from_url(url: str) -> Redis:
    """A plain redis-py client for ``url`` (tools and benchmarks; the server uses
    :func:`make_redis`), redis-py's cluster client when ``url`` names a cluster."""
    if not is_cluster_url(url):
        return Redis.from_url(url)
    return _cluster_client(url)


def _cluster_client(url: str, **options: Any) -> Redis:
    """redis-py's cluster client for the cluster URL ``url`` (its nodes, credentials and
    TLS), with ``options``. Typed as :class:`~redis.asyncio.Redis` for the code that uses
    it: it speaks the same commands."""
    seeds, plain = cluster_seeds(url)
    params: Any = parse_url(plain)
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        username=params.get("username"),
        password=params.get("password"),
        ssl=params.get("connection_class") is SSLConnection,
        **options,
    )
    return cast(Redis, client)


def _make_cluster(settings: Settings) -> Redis:
    """redis-py's cluster client for a cluster URL, bounded like the single-node client.

    It follows ``MOVED``/``ASK``, reads the slot table again after a connection error (a
    replica promoted), sends ``SCRIPT LOAD`` to every primary and splits a pipeline by node
    (a transaction must stay in one slot: waitroom's are in one event's).
    """
    return _cluster_client(
        settings.redis_url,
        # Per node, and a node with all of them busy refuses the next command
        # (MaxConnectionsError, a 503) where the single-node pool would wait: so more of
        # them than the single-node pool has (a burst of forwarded asks, ADR 0010).
        max_connections=settings.redis_max_connections * CLUSTER_CONNECTIONS_FACTOR,
        socket_connect_timeout=settings.dependency_timeout_s,
        socket_timeout=max(settings.dependency_timeout_s, LONGEST_BLOCK_S + 1.0),
        health_check_interval=30,
        # Redirections are followed (they did not run); a failed connection is not retried
        # (the command may have run): the caller's 503, and the next command reconnects.
        retry=Retry(NoBackoff(), 0),
        require_full_coverage=False,
    )
