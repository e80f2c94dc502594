"""Live positions: one broadcaster per event with local WebSocket subscribers, per process.

Every tick (:data:`TICK_S`) a broadcaster asks Redis about ALL of its event's locally
connected fans in one ``positions.lua`` call (which also refreshes their ``seen``), turns
each fan's state into a message (:func:`waitroom.line.messages.message_for`), and hands it to the
fan's connection only when it differs from the last one handed over, or when a keep-alive is
due (:data:`KEEPALIVE_S`).

Handing over never blocks and never creates a task: each connection has a
:class:`Subscriber` with a one-message slot and a wake-up future. The broadcaster
overwrites the slot and wakes the connection's own coroutine (:func:`pump`), which sends
whatever the slot holds then. A client that reads slowly, or not at all, only ever blocks
its own coroutine, skips the updates it could not take, and gets the latest one when it
can: it never delays the broadcaster or any other fan. The hand-over yields to the event
loop every :data:`HANDOVER_CHUNK` wake-ups, so the sends of a tick are spread over many
short loop turns instead of one long one.

Between two ticks, the fans at the front of the line (those the admissions at the current
rate reach before the next tick, see :data:`FRONT_TICK_S`) are looked at again every
:data:`FRONT_TICK_S`, for their admission only: a fan learns of their pass within a fifth of
a second of it rather than at the next tick, and a second's admissions no longer start their
checkout in the same instant. (On the 2-core benchmark machine neither the fans' reserve
tail nor the pass's delivery moved out of the noise: there the way to the fan is the
machine's CPU, not the tick; BENCHMARKS.md, session 17.)

Broadcasters also sweep their rooms for abandoned fans every :data:`SWEEP_EVERY_TICKS`
ticks, and stop themselves at the first tick that finds no subscriber left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Gauge, Histogram

from waitroom.core.errors import NotFound
from waitroom.core.metrics import forget
from waitroom.core.runtime import cancel_and_wait
from waitroom.line import messages
from waitroom.line.room import Rooms
from waitroom.line.scripts import ADMITTED, ADMITTING, GONE

log = logging.getLogger("waitroom.line.broadcast")

#: Seconds between two position updates.
TICK_S = 1.0
#: Seconds after which an unchanged message is sent again, so idle clients see life.
KEEPALIVE_S = 15.0
#: Every fan whose figure changed gets it at the next tick, however far back: the promise is
#: a fresh position at least every 2 s to every waiting fan (DESIGN.md; the ``websocket``
#: benchmark's ``max_update_gap_s``). Sending the far end of a long line a figure only every
#: 5 s (a781062) broke it: 20,000 fans saw gaps of 6 s (BENCHMARKS.md, session 23).
#: Seconds between two looks at the front of the line for admissions (0: only at ticks).
FRONT_TICK_S = 0.2
#: The front: fans whose place is under this many ticks' worth of admissions at the current
#: rate, plus :data:`FRONT_MIN_PLACES` (a margin for a rate that rises; and all that is
#: watched while the rate is unknown). A few hundred fans a node at most in a fast sale.
FRONT_TICKS = 1.5
FRONT_MIN_PLACES = 32
#: Sweep abandoned fans every this many ticks.
SWEEP_EVERY_TICKS = 5
#: Connections woken per event-loop turn during a tick's hand-over (see Broadcaster.tick).
HANDOVER_CHUNK = 256
#: Close code and reason for a fan no longer in line (left elsewhere, or dropped).
GONE_CLOSE = (4404, "not in line")
#: Close code and reason once a sold-out room has told a waiting fan so: a normal closure,
#: the page shows the message it got and does not reconnect.
SOLD_OUT_CLOSE = (1000, "sold out")
#: The key of the shared sold-out message in a tick's cache (no fan's code is this low).
SOLD_OUT_KIND = -1_000
UNKNOWN_CLOSE = (4404, "unknown event")
#: Close code and reason of a fan's oldest socket when the fan opens one more than allowed.
REPLACED_CLOSE = (4409, "replaced by a newer connection of the same fan")
#: Sockets one fan may hold per event in one process (``WAITROOM_WS_MAX_PER_FAN``): a few
#: tabs or devices; without a cap one identity could hold thousands.
MAX_PER_FAN = 3
_ERROR_LOG_EVERY_S = 10.0

FANS_WAITING = Gauge(
    "waitroom_fans_waiting",
    "Fans in line, as of the last look of a process that watches it: the admission leader"
    " (every tick) or a broadcaster of WebSocket fans (placed or in the lottery pre-queue).",
    ["event"],
    multiprocess_mode="livemax",
)
#: One send in this many is timed: a tick hands over a message to every fan that needs one,
#: tens of thousands a second, and timing each would cost more than it tells.
SEND_LAG_SAMPLE = 16
SEND_LAG = Histogram(
    "waitroom_websocket_send_lag_seconds",
    f"Time from the start of the broadcaster tick that made a message to its write to the"
    f" fan's socket (one send in {SEND_LAG_SAMPLE}): how stale a position is when it leaves.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
_sends = 0
TICK_SECONDS = Histogram(
    "waitroom_broadcast_tick_seconds",
    "Time of one broadcaster tick: the Redis call for all local fans plus the hand-over.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class Subscriber:
    """One WebSocket connection's mailbox: the latest message only, and a wake-up call.

    The wake-up is a bare future, made only while the connection's pump waits: an
    :class:`asyncio.Event` would carry a deque of waiters, about 0.8 KB on every one of
    tens of thousands of idle connections.
    """

    __slots__ = (
        "close_with",
        "closed",
        "event_id",
        "fan_id",
        "latest",
        "offered_at",
        "pending",
        "send_now",
        "waiter",
    )

    def __init__(self, event_id: str, fan_id: str) -> None:
        self.event_id = event_id
        self.fan_id = fan_id
        #: The last message handed over (sent or about to be), to detect changes.
        self.latest: str | None = None
        self.offered_at = 0.0
        #: The message waiting to be sent; overwritten by newer ones, never queued.
        self.pending: str | None = None
        self.closed = False
        #: How to close once closed: (code, reason), or None when the client went away.
        self.close_with: tuple[int, str] | None = None
        #: The future the pump is waiting on, if it is waiting.
        self.waiter: asyncio.Future[None] | None = None
        #: The connection's writer of a whole message at once, where the server has one
        #: (see :func:`pump`): set by the connection once it is open.
        self.send_now: Callable[[str], bool] | None = None

    def offer(self, text: str, now: float) -> None:
        """Make ``text`` the message to send next, replacing any not yet sent.

        While the connection's pump is idle (waiting, nothing pending) and the connection
        takes the message at once (``send_now``), it is written here: a position a second to
        every waiting fan then costs no wake-up of the pump's task (a future, a task step
        and its coroutines resumed, more than the write's own Python).
        """
        self.latest = text
        self.offered_at = now
        waiter = self.waiter
        send_now = self.send_now
        if (
            send_now is not None
            and waiter is not None
            and not waiter.done()
            and not self.closed
            and send_now(text)
        ):
            _count_send(now)
            return
        self.pending = text
        self._wake()

    def close(self, code_reason: tuple[int, str] | None) -> None:
        """End the connection: send what is pending, then close with ``code_reason``.

        ``None`` means the client is gone already: nothing more is sent. The first call wins.
        """
        if not self.closed:
            self.closed = True
            self.close_with = code_reason
            if code_reason is None:
                self.pending = None
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Return once there is a message to send or the subscriber is closed."""
        if self.pending is not None or self.closed:
            return
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self.waiter = None


def _count_send(offered_at: float) -> None:
    """Note one message written; time one in :data:`SEND_LAG_SAMPLE` of them."""
    global _sends
    _sends += 1
    if _sends % SEND_LAG_SAMPLE == 0:
        SEND_LAG.observe(max(0.0, time.time() - offered_at))


async def pump(sub: Subscriber, send: Callable[[str], Awaitable[None]]) -> tuple[int, str] | None:
    """Send ``sub``'s latest message each time there is one, until it is closed.

    Returns the close code and reason to end the connection with, or ``None`` when the
    client left. While ``send`` is blocked on a slow client, newer messages replace the
    pending one: the client gets the latest state, never a backlog. The subscriber's
    ``send_now``, where the server offers one
    (:meth:`waitroom.core.httpserver.WebSocketProtocol.send_text_now`), writes a message at
    once when the connection takes it without a wait, and says whether it did; otherwise
    ``send`` does.
    """
    while True:
        await sub.wait()
        text, sub.pending = sub.pending, None
        if text is not None:
            offered_at = sub.offered_at
            send_now = sub.send_now
            if send_now is None or not send_now(text):
                await send(text)
            _count_send(offered_at)
        if sub.closed:
            return sub.close_with


class Broadcaster:
    """The ticking loop of one event in this process."""

    def __init__(self, hub: Hub, event_id: str) -> None:
        self.hub = hub
        self.event_id = event_id
        self.subscribers: dict[str, list[Subscriber]] = {}
        self.task: asyncio.Task[None] | None = None
        self._ticks = 0
        self._error_logged_at = 0.0
        self._expiry: dict[str, int | None] = {}
        #: Fans at the front of the line as of the last tick (see :meth:`front_tick`).
        self.front: set[str] = set()

    def add(self, sub: Subscriber) -> None:
        subs = self.subscribers.setdefault(sub.fan_id, [])
        subs.append(sub)
        # The newest socket wins: it is the tab the fan is looking at, and a fan who lost
        # track of old ones (a crashed browser, a laptop asleep) is never locked out.
        while len(subs) > self.hub.max_per_fan:
            subs.pop(0).close(REPLACED_CLOSE)

    def remove(self, sub: Subscriber) -> None:
        subs = self.subscribers.get(sub.fan_id)
        if subs is None:
            return
        if sub in subs:
            subs.remove(sub)
        if not subs:
            del self.subscribers[sub.fan_id]

    async def run(self) -> None:
        """Tick until no subscriber is left (or the hub is closed)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.hub.tick_s
            delay = next_at - loop.time()
            if delay < 0:
                # A tick overran: start afresh rather than fire the missed ticks back to back.
                next_at, delay = loop.time(), 0.0
            await self._until(next_at)
            if not self.subscribers:
                # Decided and done without awaiting, so a subscriber arriving now finds
                # either this broadcaster still registered, or none and starts a new one.
                self.hub.forget(self)
                forget(FANS_WAITING, self.event_id)
                return
            try:
                await self.tick(time.time())
            except asyncio.CancelledError:
                raise
            except NotFound:
                # The event is gone from PostgreSQL and Redis: nobody is in its line.
                for subs in self.subscribers.values():
                    for sub in subs:
                        sub.close(UNKNOWN_CLOSE)
            except Exception as exc:  # Redis down, a bad reply: skip this tick, keep going
                self._failed("broadcaster tick failed", exc)

    async def _until(self, deadline: float) -> None:
        """Wait for the loop clock to reach ``deadline``, looking at the front meanwhile."""
        loop = asyncio.get_running_loop()
        every = self.hub.front_tick_s
        while True:
            remaining = deadline - loop.time()
            if not every or not self.front or remaining <= every:
                await asyncio.sleep(max(0.0, remaining))
                return
            await asyncio.sleep(every)
            try:
                await self.front_tick(time.time())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next tick tells everyone anyway
                self._failed("broadcaster front tick failed", exc)

    def _failed(self, message: str, exc: Exception) -> None:
        """Log a failed tick, at most every :data:`_ERROR_LOG_EVERY_S`."""
        if time.monotonic() - self._error_logged_at > _ERROR_LOG_EVERY_S:
            self._error_logged_at = time.monotonic()
            log.warning(message, extra={"event_id": self.event_id, "error": repr(exc)})

    async def front_tick(self, now: float) -> None:
        """Hand their pass to the fans of the front admitted since the last look.

        Only admissions: positions, pauses and the sale's end wait for the next tick, which
        also finds a new front.
        """
        fans = [fan_id for fan_id in self.front if fan_id in self.subscribers]
        if not fans:
            self.front.clear()
            return
        result = await self.hub.rooms.positions(self.event_id, fans, now=now)
        passes = iter(result.passes)
        for fan_id, code in zip(fans, result.codes, strict=True):
            if code != ADMITTED:
                continue
            queue_pass = next(passes)
            self.front.discard(fan_id)
            text = self._admitted(queue_pass)
            for sub in self.subscribers.get(fan_id, ()):
                if text != sub.latest:
                    sub.offer(text, now)

    async def tick(self, now: float) -> None:
        """One round: one Redis call for every local fan, then the hand-over."""
        started = time.perf_counter()
        fans = list(self.subscribers)
        rooms = self.hub.rooms
        result = await rooms.positions(self.event_id, fans, now=now)
        room = result.room
        FANS_WAITING.labels(self.event_id).set(room.waiting)
        rate = rooms.estimator(self.event_id).rate
        # Messages that every fan in the same state shares are encoded once per tick.
        shared: dict[int, str | None] = {}
        individual = not (room.sold_out or room.paused)
        passes = iter(result.passes)
        keepalive_before = now - KEEPALIVE_S
        front_places = FRONT_MIN_PLACES + int((rate or 0.0) * self.hub.tick_s * FRONT_TICKS)
        front: set[str] = set()
        woken = 0
        for fan_id, code in zip(fans, result.codes, strict=True):
            if woken >= HANDOVER_CHUNK:
                woken = 0
                # Let the connections woken so far send before waking more. Each wake-up
                # costs a send; waking 10,000 at once would hold this event loop for all
                # of their sends, and HTTP requests, Redis replies and the admission
                # leader's lease renewals would wait behind them (a lease that waits too
                # long is lost, and with it the admissions that move everyone's position).
                await asyncio.sleep(0)
            queue_pass = next(passes) if code == ADMITTED else None
            subs = self.subscribers.get(fan_id)
            if not subs:
                continue  # unsubscribed while Redis was answering
            if room.sold_out and queue_pass is None:
                # The sale is over for everyone still waiting: tell them, then let the
                # socket go (the admission leader is closing the line meanwhile).
                if SOLD_OUT_KIND not in shared:
                    shared[SOLD_OUT_KIND] = messages.encode(messages.SOLD_OUT)
                for sub in subs:
                    sub.offer(shared[SOLD_OUT_KIND] or "", now)
                    sub.close(SOLD_OUT_CLOSE)
                # A close wakes the connection like a message does (it sends, then closes):
                # counted, or the sold-out tick woke every socket of the process at once
                # (a stall of 130 ms with 3,300 sockets a node, measured).
                woken += len(subs)
                continue
            if code == GONE:
                for sub in subs:
                    sub.close(GONE_CLOSE)
                woken += len(subs)
                continue
            if code == ADMITTING or 0 <= code < front_places:
                front.add(fan_id)
            if queue_pass is not None:
                text: str | None = self._admitted(queue_pass)
            elif code >= 0 and individual:
                message = messages.message_for(code, room, rate)
                text = messages.encode(message) if message is not None else None
            else:
                kind = min(code, 0)  # every placed fan gets the same paused/sold-out message
                if kind not in shared:
                    message = messages.message_for(kind, room, rate)
                    shared[kind] = messages.encode(message) if message is not None else None
                text = shared[kind]
            if text is None:
                continue
            for sub in subs:
                if text != sub.latest or sub.offered_at < keepalive_before:
                    sub.offer(text, now)
                    woken += 1
        # Not while paused or sold out: nobody is admitted then.
        self.front = front if individual else set()
        self._ticks += 1
        if self._ticks % SWEEP_EVERY_TICKS == 0:
            await rooms.sweep(self.event_id, now=now)
        TICK_SECONDS.observe(time.perf_counter() - started)

    def _admitted(self, queue_pass: str) -> str:
        # Decoding a pass for its expiry is the costly part; a fan keeps one pass.
        if queue_pass not in self._expiry:
            if len(self._expiry) > 4 * len(self.subscribers) + 64:
                self._expiry.clear()
            self._expiry[queue_pass] = messages.pass_expiry(queue_pass)
        return messages.encode(messages.Admitted(queue_pass, self._expiry[queue_pass]))


class Hub:
    """This process's broadcasters, by event; created and closed by the app's lifespan."""

    def __init__(
        self,
        rooms: Rooms,
        *,
        tick_s: float = TICK_S,
        front_tick_s: float = FRONT_TICK_S,
        max_per_fan: int = MAX_PER_FAN,
    ) -> None:
        self.rooms = rooms
        self.tick_s = tick_s
        self.front_tick_s = front_tick_s
        self.max_per_fan = max_per_fan
        self._broadcasters: dict[str, Broadcaster] = {}
        self._closed = False

    def subscribe(self, event_id: str, fan_id: str) -> Subscriber:
        """A new subscriber for ``fan_id``, starting the event's broadcaster if needed.

        When the fan already holds ``max_per_fan`` sockets for the event here, the oldest is
        closed with :data:`REPLACED_CLOSE`.
        """
        if self._closed:
            raise RuntimeError("the hub is closed")
        sub = Subscriber(event_id, fan_id)
        broadcaster = self._broadcasters.get(event_id)
        if broadcaster is None:
            broadcaster = self._broadcasters[event_id] = Broadcaster(self, event_id)
            broadcaster.add(sub)
            broadcaster.task = asyncio.create_task(broadcaster.run(), name=f"broadcast:{event_id}")
        else:
            broadcaster.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget ``sub`` at once; its broadcaster stops at its next tick if it was the last."""
        broadcaster = self._broadcasters.get(sub.event_id)
        if broadcaster is not None:
            broadcaster.remove(sub)

    def forget(self, broadcaster: Broadcaster) -> None:
        if self._broadcasters.get(broadcaster.event_id) is broadcaster:
            del self._broadcasters[broadcaster.event_id]

    def subscribers(self, event_id: str) -> int:
        """How many connections this process holds for ``event_id``."""
        broadcaster = self._broadcasters.get(event_id)
        if broadcaster is None:
            return 0
        return sum(len(subs) for subs in broadcaster.subscribers.values())

    async def close(self) -> None:
        """Stop every broadcaster and release every connection waiting on one."""
        self._closed = True
        broadcasters = list(self._broadcasters.values())
        self._broadcasters.clear()
        tasks: list[asyncio.Task[Any]] = []
        for broadcaster in broadcasters:
            for subs in broadcaster.subscribers.values():
                for sub in subs:
                    sub.close((1001, "server shutting down"))
            if broadcaster.task is not None:
                tasks.append(broadcaster.task)
        await asyncio.gather(*(cancel_and_wait(task) for task in tasks))
