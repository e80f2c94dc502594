"""Live seat availability: changes published after commits, coalesced, pushed to viewers.

The inventory actor calls :func:`publish_seat_changes` with the seats its commits changed
(held, sold, released), merged, at most every 50 ms and off the commit path. Each change is a seat id and its new state, one letter as in the
snapshot's ``states`` string (``GET /v1/events/{event_id}/seats``, ``docs/seatmap.md``):
``f`` free, ``h`` held, ``s`` sold, ``x`` not for sale. A publication is numbered by a
per-event counter in Redis and sent on the event's pub/sub channel (``EventKeys.seat_news``).

Each server process subscribes to an event's channel while at least one fan views its map
(:class:`SeatNews`, one Redis connection per viewed event) and forwards what arrives to its
viewers through a :class:`Coalescer`: changes are merged per seat (the last state wins) and
sent at most once every :data:`FLUSH_INTERVAL_S`, so a burst of a thousand commits costs a
viewer a handful of small messages, not a thousand. Only the final state of each seat
matters to a map, which is why merging is lossless (a hypothesis test checks exactly that).

Ordering: a page opens the socket first and waits for ``{"type": "ready", "version": V}``,
sent once this process's subscription is live, V being the counter then. Every publication
numbered above V reaches the socket. The snapshot carries the counter read *before* its
PostgreSQL read, S; a publication's number is taken after its commit, so when S >= V every
publication up to V was committed before the snapshot was read, and the snapshot plus the
socket's changes hold every change published (not one an actor noted and never published:
its process died first; nor a seat map import, which publishes nothing: ``docs/seatmap.md``). A snapshot with S < V (from a cache) is read again
(with ``?v=V``, a distinct URL for caches). Applying a change already in the snapshot is
harmless (it sets the same state). A viewer that falls too far behind, or whose Redis
subscription breaks, is closed with 1013: the page reconnects and reads the snapshot again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from redis.asyncio import Redis

from waitroom.core.keys import Keys
from waitroom.core.runtime import cancel_and_wait

log = logging.getLogger("waitroom.seatnews")

#: At most this often (seconds) a process sends an event's viewers a message: 4 a second.
FLUSH_INTERVAL_S = 0.25
#: Messages a viewer may have waiting before it is dropped as too slow (it then reloads).
MAX_BACKLOG = 64
#: How long subscribing to an event's channel may take before the viewer is refused.
SUBSCRIBE_TIMEOUT_S = 5.0

#: A seat's state as one letter (the snapshot's ``states`` string uses the same letters).
FREE, HELD, SOLD, NOT_FOR_SALE = "f", "h", "s", "x"
STATE_CODES = frozenset((FREE, HELD, SOLD, NOT_FOR_SALE))
#: Names the publisher may use instead of the letters (the seat ledger's among them).
STATE_NAMES = {
    "free": FREE,
    "held": HELD,
    "sold": SOLD,
    "unavailable": NOT_FOR_SALE,
    "killed": NOT_FOR_SALE,
    "held_back": NOT_FOR_SALE,
}

#: Close code and reason of a viewer that must reload the snapshot.
RELOAD = (1013, "seat updates interrupted: reload the seat map")


class SeatDiff(msgspec.Struct, frozen=True):
    """Seats whose state changed (seat id -> state letter), up to publication ``version``."""

    version: int
    changes: dict[str, str]


class SeatsMessage(msgspec.Struct, frozen=True, tag="seats", tag_field="type"):
    """What a viewer receives: ``{"type": "seats", "version": n, "changes": {...}}``."""

    version: int
    changes: dict[str, str]


class ReadyMessage(msgspec.Struct, frozen=True, tag="ready", tag_field="type"):
    """The first message: the subscription is live, read the snapshot now; one whose
    ``version`` is below this one may predate changes the socket will not repeat."""

    version: int


LiveMessage = SeatsMessage | ReadyMessage

_encoder = msgspec.json.Encoder()
_diff_decoder = msgspec.json.Decoder(SeatDiff)


def ready_text(version: int) -> str:
    """The ``ready`` message for a subscription made when the counter was at ``version``."""
    return _encoder.encode(ReadyMessage(version)).decode()


def normalize(changes: Mapping[str, str]) -> dict[str, str]:
    """``changes`` with every state as its letter; ``ValueError`` for an unknown state."""
    out: dict[str, str] = {}
    for seat, state in changes.items():
        code = STATE_NAMES.get(state, state)
        if code not in STATE_CODES:
            raise ValueError(f"seat {seat!r}: unknown state {state!r}")
        out[seat] = code
    return out


def apply(states: dict[str, str], changes: Mapping[str, str]) -> dict[str, str]:
    """``states`` (seat id -> letter) after ``changes``, in place and returned."""
    states.update(changes)
    return states


class Coalescer:
    """Merges an event's diffs and lets them out at most once every ``interval_s``.

    Pure: the caller passes ``now``. The merged diff carries the last state of each seat
    and the highest version added, so applying it equals applying every diff in order.
    """

    __slots__ = ("_last_flush", "_pending", "_version", "interval_s")

    def __init__(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._pending: dict[str, str] = {}
        self._version = 0
        self._last_flush = -math.inf

    def add(self, diff: SeatDiff) -> None:
        """Merge ``diff`` into what is waiting to be sent."""
        self._pending.update(diff.changes)
        self._version = max(self._version, diff.version)

    def due_in(self, now: float) -> float | None:
        """Seconds until :meth:`take` may send (0: now); None when nothing waits."""
        if not self._pending:
            return None
        return max(0.0, self._last_flush + self.interval_s - now)

    def take(self, now: float) -> SeatDiff | None:
        """The merged diff if one is due at ``now`` (and forget it), else None."""
        wait = self.due_in(now)
        if wait is None or wait > 0:
            return None
        diff = SeatDiff(self._version, self._pending)
        self._pending = {}
        self._last_flush = now
        return diff


async def publish_seat_changes(
    redis: Redis, keys: Keys, event_id: str, changes: Mapping[str, str]
) -> int | None:
    """Tell every viewer of ``event_id``'s map that these seats changed state.

    Call after the commit (viewers then read the truth); ``changes`` maps seat ids to
    ``free``/``held``/``sold``/``unavailable`` (or ``killed``, ``held_back``) or their letters. Returns the publication's
    version (None when there was nothing to publish). The version counter lives in Redis
    and restarts if Redis loses it: a viewer that sees a version lower than the last one
    reloads the snapshot.
    """
    codes = normalize(changes)
    if not codes:
        return None
    ek = keys.event(event_id)
    version = int(await redis.incr(ek.seat_version))
    await redis.publish(ek.seat_news, _encoder.encode(SeatDiff(version, codes)))
    return version


async def current_version(redis: Redis, keys: Keys, event_id: str) -> int:
    """The number of the event's last publication of seat changes (0 before any)."""
    value = await redis.get(keys.event(event_id).seat_version)
    return int(value) if value is not None else 0


class Viewer:
    """One WebSocket's queue of messages to send; closed when it falls behind."""

    __slots__ = ("_messages", "_wake", "closed", "event_id")

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id
        self._messages: deque[str] = deque()
        self._wake = asyncio.Event()
        self.closed = False

    def offer(self, text: str) -> None:
        """Queue ``text``; a viewer already ``MAX_BACKLOG`` behind is closed instead."""
        if self.closed:
            return
        if len(self._messages) >= MAX_BACKLOG:
            self.close()
            return
        self._messages.append(text)
        self._wake.set()

    def close(self) -> None:
        """Stop now: what was queued is dropped and :meth:`next` returns None."""
        self.closed = True
        self._messages.clear()
        self._wake.set()

    async def next(self) -> str | None:
        """The next message to send, or None once the viewer is closed."""
        while not self._messages:
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._messages.popleft()


class _Channel:
    """One event's subscription in this process: its viewers, coalescer and reader."""

    def __init__(self, event_id: str, interval_s: float) -> None:
        self.event_id = event_id
        self.viewers: set[Viewer] = set()
        self.coalescer = Coalescer(interval_s)
        self.ready = asyncio.Event()
        self.failed = False
        self.reader: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None


class SeatNews:
    """This process's viewers of seat maps, by event; see the module docstring."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        interval_s: float = FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.interval_s = interval_s
        self._clock = clock
        self._channels: dict[str, _Channel] = {}
        self._closed = False

    def viewers(self, event_id: str) -> int:
        """Viewers of ``event_id`` connected to this process."""
        channel = self._channels.get(event_id)
        return 0 if channel is None else len(channel.viewers)

    async def subscribe(self, event_id: str) -> Viewer:
        """A new viewer of ``event_id``, returned once this process's subscription is live.

        Raises ``RuntimeError`` after :meth:`close`, ``TimeoutError`` or a Redis error when
        the subscription cannot be made.
        """
        if self._closed:
            raise RuntimeError("seat news are closed")
        channel = self._channels.get(event_id)
        if channel is None or channel.failed:
            channel = _Channel(event_id, self.interval_s)
            self._channels[event_id] = channel
            channel.reader = asyncio.create_task(self._read(channel), name=f"seats:{event_id}")
        viewer = Viewer(event_id)
        channel.viewers.add(viewer)
        try:
            await asyncio.wait_for(channel.ready.wait(), SUBSCRIBE_TIMEOUT_S)
            if channel.failed:
                raise ConnectionError("the subscription to seat changes failed")
        except BaseException:
            await self.leave(viewer)
            raise
        return viewer

    async def leave(self, viewer: Viewer) -> None:
        """Forget ``viewer``; the last one of an event ends the event's subscription."""
        viewer.close()
        channel = self._channels.get(viewer.event_id)
        if channel is None:
            return
        channel.viewers.discard(viewer)
        if not channel.viewers:
            await self._drop(channel)

    async def _drop(self, channel: _Channel) -> None:
        if self._channels.get(channel.event_id) is channel:
            del self._channels[channel.event_id]
        if channel.timer is not None:
            channel.timer.cancel()
        reader = channel.reader
        if reader is not None and reader is not asyncio.current_task():
            await cancel_and_wait(reader)

    async def _read(self, channel: _Channel) -> None:
        pubsub: Any = None
        name = self.keys.event(channel.event_id).seat_news
        try:
            # redis-py's cluster client routes SUBSCRIBE by the channel's slot, from a slot
            # table it reads at its first command: a client that has sent none has to read it
            # first (a no-op for a single Redis, and for a client already in use).
            await self.redis.initialize()
            pubsub = self.redis.pubsub()
            await pubsub.subscribe(name)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                kind = message.get("type")
                if kind == "subscribe":
                    channel.ready.set()
                elif kind == "message":
                    self._received(channel, message.get("data"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis went away: every viewer must reload
            log.warning(
                "seat news subscription failed",
                extra={"event_id": channel.event_id, "error": repr(exc)},
            )
        finally:
            channel.failed = True
            channel.ready.set()
            for viewer in list(channel.viewers):
                viewer.close()
            if self._channels.get(channel.event_id) is channel:
                del self._channels[channel.event_id]
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())

    def _received(self, channel: _Channel, data: Any) -> None:
        try:
            diff = _diff_decoder.decode(data)
            diff = SeatDiff(diff.version, normalize(diff.changes))
        except (msgspec.DecodeError, ValueError, TypeError):
            log.warning("malformed seat news ignored", extra={"event_id": channel.event_id})
            return
        channel.coalescer.add(diff)
        self._schedule(channel)

    def _schedule(self, channel: _Channel) -> None:
        if channel.timer is not None:
            return
        wait = channel.coalescer.due_in(self._clock())
        if wait is None:
            return
        channel.timer = asyncio.get_running_loop().call_later(wait, self._flush, channel)

    def _flush(self, channel: _Channel) -> None:
        channel.timer = None
        diff = channel.coalescer.take(self._clock())
        if diff is not None:
            text = _encoder.encode(SeatsMessage(diff.version, diff.changes)).decode()
            for viewer in list(channel.viewers):
                viewer.offer(text)
        self._schedule(channel)

    async def close(self) -> None:
        """End every subscription and close every viewer (the process is stopping)."""
        self._closed = True
        for channel in list(self._channels.values()):
            for viewer in list(channel.viewers):
                viewer.close()
            await self._drop(channel)
