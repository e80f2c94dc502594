"""Forwarding to an owner on the same machine over a local socket instead of through Redis.

``waitroom serve --workers N`` runs N processes on one machine, and the kernel hands each
keep-alive connection to one of them: the reservations that land on a process other than
the event's owner are forwarded to it. Through Redis (:mod:`inventory.forwarding`) each of
them took an ``XADD`` on the asking side, an ``XREAD`` and an ``RPUSH`` on the owner's, and
a blocking pop back on the asker's: two processes' round trips to Redis, each answered in a
turn of a busy event loop, which made a forwarded reservation take about one and a half
times as long as one served by the owner (``python -m stress checkout``).

So every process that hosts actors also listens on a local socket (Linux's abstract
namespace: nothing on disk to clean up after a crash), named after its node id, and a
process whose event is owned by a process of the same machine (its node id names the same
host) sends the commands there: one write of every command asked in one turn of the event
loop, and one write back of every reply settled in one turn, straight from the owner's
actor to the asker's waiting request. No task, no Redis.

What does not change: the lease in Redis says who owns an event, and the fencing epoch in
PostgreSQL keeps a former owner from writing (a process that is no longer the owner answers
:class:`~inventory.actor.ActorStopped`, as through the inbox). Nothing here decides
anything; it is a shorter wire. A sibling that cannot be reached is left to the Redis inbox
for :data:`RETRY_CONNECT_S`; a connection lost with asks in flight fails them at once as
:class:`~inventory.forwarding.OwnerGone` (their commands may have been applied: only those
safe to repeat are asked again, as when the owner's lease lapses).

Only a process of the same user may connect (``SO_PEERCRED``), and an asker checks that the
socket it reached belongs to the very process the owner's node id names (its pid): a
process of another user cannot inject commands, nor pose as an owner.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

import msgspec
from prometheus_client import Counter

from inventory.actor import InventoryActor
from inventory.ledger import Result
from inventory.mail import Forwarded, Reply, error_reply, reply_of, submit
from waitroom.core.errors import WaitroomError

log = logging.getLogger("waitroom.inventory")

FORWARDED_LOCALLY = Counter(
    "waitroom_inventory_forwarded_locally_total",
    "Commands forwarded to an owner on this machine over its local socket, not through Redis.",
)

#: How long a sibling that could not be reached is left to the Redis inbox.
RETRY_CONNECT_S = 5.0
#: How long connecting to a sibling may take before the Redis inbox is used instead.
CONNECT_TIMEOUT_S = 0.5
#: The largest frame either side accepts: a garbled length must not make a process buffer
#: gigabytes (a frame holds one turn's commands or replies: kilobytes).
MAX_FRAME = 16 * 1024 * 1024

_HEADER = struct.Struct("!I")
_PEERCRED = struct.Struct("3i")
#: A node id of hosting's making: an optional node name, the host, the pid, 8 hex digits.
_NODE_ID = re.compile(r"(?:[^/]*/)?(?P<host>[^/]+):(?P<pid>[0-9]+):[0-9a-f]{8}")


class _Asks(msgspec.Struct, array_like=True, frozen=True):
    """One frame from an asker: commands for one event's actor."""

    event_id: str
    asks: list[Forwarded]


_asks_encoder = msgspec.msgpack.Encoder()
_asks_decoder = msgspec.msgpack.Decoder(_Asks)
_replies_encoder = msgspec.msgpack.Encoder()
_replies_decoder = msgspec.msgpack.Decoder(list[Reply])


def address(node_id: str) -> str:
    """The abstract socket address of the process ``node_id``."""
    return "\0waitroom-inventory-" + hashlib.sha256(node_id.encode()).hexdigest()[:40]


def sibling_pid(node_id: str, host: str) -> int | None:
    """The pid of the process ``node_id`` when it runs on machine ``host``, else None."""
    match = _NODE_ID.fullmatch(node_id)
    if match is None or match["host"] != host:
        return None
    return int(match["pid"])


def _peer(transport: asyncio.BaseTransport) -> tuple[int, int] | None:
    """The pid and uid of the process at the other end of a Unix socket."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, _ = _PEERCRED.unpack(raw)
    return pid, uid


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class _Frames:
    """Length-prefixed frames out of a byte stream."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by ``data``; ValueError for a frame over :data:`MAX_FRAME`."""
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if size > MAX_FRAME:
                raise ValueError(f"a frame of {size} bytes")
            end = _HEADER.size + size
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[_HEADER.size : end]))
            del buffer[:end]
        return frames


class _Connection(asyncio.Protocol, abc.ABC):
    """What both ends share: framing, and replies or asks written once per loop turn."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._frames = _Frames()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances; they write all the same.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for frame in self._frames.feed(data):
                self.frame_received(frame)
        except (ValueError, msgspec.DecodeError) as exc:
            log.warning("bad frame on a local inventory socket", extra={"error": repr(exc)})
            self.close()

    @abc.abstractmethod
    def frame_received(self, frame: bytes) -> None:
        """One whole frame came (raises ValueError or DecodeError for a bad one)."""

    def write(self, payload: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(_frame(payload))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


class _OwnerSide(_Connection):
    """An asker's connection as the owner serves it: commands to the local actors, replies
    back as each batch commits."""

    def __init__(
        self,
        actor_of: Callable[[str], InventoryActor | None],
        starting: Callable[[str], Awaitable[object] | None],
    ) -> None:
        super().__init__()
        self._actor_of = actor_of
        self._starting = starting
        self._replies: list[Reply] = []
        self._waiting: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = _peer(transport)
        if peer is None or peer[1] != os.getuid():
            log.warning(
                "refused a local inventory connection of another user", extra={"peer": peer}
            )
            self.close()

    def frame_received(self, frame: bytes) -> None:
        asks = _asks_decoder.decode(frame)
        local = self._actor_of(asks.event_id)
        if local is None:
            starting = self._starting(asks.event_id)
            if starting is not None:
                # The lease is ours but the actor is still starting (an epoch, the ledger):
                # an asker that read the lease may be here first. Through the inbox its
                # command would have waited in the stream; here it waits for the actor.
                task = asyncio.create_task(self._after(starting, asks))
                self._waiting.add(task)
                task.add_done_callback(self._waiting.discard)
                return
        self._take(asks, local)

    async def _after(self, starting: Awaitable[object], asks: _Asks) -> None:
        with contextlib.suppress(Exception):
            await starting
        self._take(asks, self._actor_of(asks.event_id))

    def _take(self, asks: _Asks, local: InventoryActor | None) -> None:
        now_ms = time.time() * 1000
        for forwarded in asks.asks:
            if forwarded.deadline_ms < now_ms:
                continue  # its asker has given up
            try:
                outcome = submit(forwarded, local)
            except msgspec.DecodeError:
                log.warning("undecodable forwarded command", extra={"event": asks.event_id})
                continue
            if isinstance(outcome, WaitroomError):
                self._reply(error_reply(forwarded.request_id, outcome))
                continue
            # A future already, or (a full mailbox) the wait for room: a task then.
            pending: asyncio.Future[Result] = asyncio.ensure_future(outcome)
            pending.add_done_callback(functools.partial(self._answered, forwarded.request_id))

    def close(self) -> None:
        super().close()
        for task in self._waiting:
            task.cancel()

    def _answered(self, request_id: str, outcome: asyncio.Future[Result]) -> None:
        self._reply(reply_of(request_id, outcome))

    def _reply(self, reply: Reply) -> None:
        # A batch's replies are settled together: they go out in one write at the end of
        # the turn.
        self._replies.append(reply)
        if len(self._replies) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        replies, self._replies = self._replies, []
        if replies:
            self.write(_replies_encoder.encode(replies))


class _AskerSide(_Connection):
    """The connection to one owner: the asks of a loop turn in one write per event, and the
    replies handed to the forwarder as they come."""

    def __init__(
        self, on_reply: Callable[[Reply], None], on_lost: Callable[[Iterable[str]], None]
    ) -> None:
        super().__init__()
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._outgoing: dict[str, list[Forwarded]] = {}
        #: Request ids sent and not answered yet.
        self._in_flight: set[str] = set()
        self._loop = asyncio.get_running_loop()

    def send(self, event_id: str, forwarded: Forwarded) -> bool:
        """Send ``forwarded`` to the owner at the end of this turn of the event loop; False
        when the connection is closed already (nothing was sent)."""
        if self.closed:
            return False
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.setdefault(event_id, []).append(forwarded)
        self._in_flight.add(forwarded.request_id)
        return True

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, {}
        for event_id, asks in outgoing.items():
            self.write(_asks_encoder.encode(_Asks(event_id, asks)))
            FORWARDED_LOCALLY.inc(len(asks))

    def frame_received(self, frame: bytes) -> None:
        for reply in _replies_decoder.decode(frame):
            self._in_flight.discard(reply.id)
            self._on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        lost = [*self._in_flight, *(f.request_id for fs in self._outgoing.values() for f in fs)]
        self._in_flight.clear()
        self._outgoing.clear()
        self._on_lost(lost)


class Siblings:
    """This process's local socket: serving forwarded commands to the actors it hosts, and
    the connections to the owners on this machine that it forwards to."""

    def __init__(
        self,
        node_id: str,
        actor_of: Callable[[str], InventoryActor | None],
        on_reply: Callable[[Reply], None],
        on_lost: Callable[[Iterable[str]], None],
        starting: Callable[[str], Awaitable[object] | None] = lambda _event: None,
    ) -> None:
        self._node_id = node_id
        self._actor_of = actor_of
        self._starting = starting
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._host = socket.gethostname()
        self._server: asyncio.AbstractServer | None = None
        self._served: set[_OwnerSide] = set()
        self._channels: dict[str, _AskerSide] = {}
        self._connecting: dict[str, asyncio.Task[_AskerSide | None]] = {}
        self._unreachable: dict[str, float] = {}
        self._closed = False

    async def listen(self) -> bool:
        """Listen on this process's local socket; False where that cannot be done (then
        every forwarded command goes through Redis, as before)."""
        loop = asyncio.get_running_loop()
        try:
            # The socket made here, not by the loop: uvloop takes an address as a C string,
            # which an abstract one (a leading NUL) is not.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(address(self._node_id))
                sock.listen(128)
                sock.setblocking(False)
                self._server = await loop.create_unix_server(self._serve, sock=sock)
            except BaseException:
                sock.close()
                raise
        except (OSError, NotImplementedError) as exc:
            log.warning(
                "no local inventory socket: forwarding goes through Redis",
                extra={"error": repr(exc)},
            )
            return False
        return True

    def _serve(self) -> _OwnerSide:
        side = _OwnerSide(self._actor_of, self._starting)
        self._served.add(side)
        return side

    async def channel(self, owner: str) -> _AskerSide | None:
        """The connection to ``owner`` when it runs on this machine and answers; None
        otherwise (forward through Redis)."""
        channel = self._channels.get(owner)
        if channel is not None and not channel.closed:
            return channel
        if self._closed or self._server is None:
            return None
        pid = sibling_pid(owner, self._host)
        if pid is None or time.monotonic() < self._unreachable.get(owner, 0.0):
            return None
        connecting = self._connecting.get(owner)
        if connecting is None:
            connecting = asyncio.create_task(self._connect(owner, pid))
            self._connecting[owner] = connecting
        return await asyncio.shield(connecting)

    async def _connect(self, owner: str, pid: int) -> _AskerSide | None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # Connected here, not by the loop (see listen()): at once, or refused.
            await asyncio.wait_for(loop.sock_connect(sock, address(owner)), CONNECT_TIMEOUT_S)
            transport, side = await loop.create_unix_connection(
                lambda: _AskerSide(self._on_reply, self._on_lost), sock=sock
            )
            peer = _peer(transport)
            if peer != (pid, os.getuid()):
                transport.close()
                raise OSError(f"the socket of {owner!r} belongs to {peer}")
        except (OSError, TimeoutError) as exc:
            sock.close()
            log.info(
                "owner on this machine not reachable locally: forwarding through Redis",
                extra={"owner": owner, "error": repr(exc)},
            )
            now = time.monotonic()
            # Forgotten once past: owners come and go over a long run.
            self._unreachable = {o: t for o, t in self._unreachable.items() if t > now}
            self._unreachable[owner] = now + RETRY_CONNECT_S
            return None
        finally:
            self._connecting.pop(owner, None)
        if self._closed:
            side.close()
            return None
        # Connections to former owners closed when those processes went: forgotten here.
        self._channels = {o: c for o, c in self._channels.items() if not c.closed}
        self._channels[owner] = side
        return side

    async def close(self) -> None:
        """Stop listening and close every connection (asks in flight fail as lost)."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._connecting.values()):
            task.cancel()
        for side in [*self._channels.values(), *self._served]:
            side.close()
        self._channels.clear()
        self._served.clear()
        await asyncio.sleep(0)  # connection_lost of each runs in the next turn
