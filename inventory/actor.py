"""The inventory actor of one event: one mailbox, group commit, replies after commit.

Callers :meth:`InventoryActor.ask` with a command and wait for its result. The actor task
takes mail from its bounded mailbox (backpressure: a full mailbox makes askers wait) a chunk
at a time and applies it to its in-memory :class:`~inventory.ledger.Ledger`; its committer
task writes everything applied since the last commit in ONE fenced PostgreSQL transaction,
and only then answers those callers (invariant 2: acknowledged means durable). While one
batch commits, the next is applied on top of it, so batches grow exactly when load does
(group commit) and this process works while PostgreSQL does.

If a commit fails, nothing of that batch was acknowledged: its callers, and those of
everything applied on top of it, get 503, and the actor rebuilds its ledger from
PostgreSQL, so no unacknowledged change survives in memory. If the commit was refused
because another process took over (:class:`~inventory.store.Fenced`), the actor stops; its
supervisor does not restart it here.

Holds expire from the actor's own timer: it waits for mail at most until the ledger's next
deadline and then applies :class:`~inventory.ledger.Expire`, which pops only the holds due.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from asyncpg.pool import PoolConnectionProxy
from opentelemetry.trace import Link
from prometheus_client import Counter, Gauge, Histogram

from inventory import store
from inventory.ledger import (
    Changes,
    Command,
    Expire,
    Expired,
    Ledger,
    Refused,
    Reserve,
    Result,
)
from waitroom.core import tracing
from waitroom.core.errors import Unavailable
from waitroom.core.metrics import forget
from waitroom.core.runtime import cancel_and_wait

log = logging.getLogger("waitroom.inventory")

COMMANDS = Counter(
    "waitroom_inventory_commands_total",
    "Inventory commands applied, by type and outcome.",
    ["command", "outcome"],
)
BATCH_SIZE = Histogram(
    "waitroom_inventory_batch_size",
    "Commands per group commit.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
COMMIT_LATENCY = Histogram(
    "waitroom_inventory_commit_seconds",
    "Latency of one group-commit transaction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# The owning actor's view: forgotten when the actor stops, so a former owner never shows
# stale figures (waitroom.core.metrics.forget).
MAILBOX_DEPTH = Gauge(
    "waitroom_inventory_mailbox_depth",
    "Commands waiting in an actor's mailbox.",
    ["event"],
    multiprocess_mode="livemax",
)
AVAILABLE = Gauge(
    "waitroom_inventory_tickets_available",
    "Tickets available per ticket type, as the owning actor sees them.",
    ["event", "ticket_type"],
    multiprocess_mode="livemax",
)
HELD = Gauge(
    "waitroom_inventory_tickets_held",
    "Tickets in holds not yet paid nor expired per ticket type, as the owning actor sees them.",
    ["event", "ticket_type"],
    multiprocess_mode="livemax",
)
SOLD = Gauge(
    "waitroom_inventory_tickets_sold",
    "Tickets paid per ticket type, as the owning actor sees them.",
    ["event", "ticket_type"],
    multiprocess_mode="livemax",
)

#: Longest a busy actor keeps one pooled connection before it queues for one again.
CONNECTION_HOLD_S = 0.25
#: How long a stopping actor may take to publish the seats its last commits moved.
FINAL_PUBLISH_S = 1.0

#: What an actor publishes after commits: availability per type and whether it is sold out.
Publish = Callable[[dict[str, int], bool], Awaitable[None]]
#: What an actor publishes after commits that moved seats: seat id -> new state (``free``,
#: ``held``, ``sold``), the last state of each seat since the previous publication.
PublishSeats = Callable[[dict[str, str]], Awaitable[None]]
#: A hold's status as the state of its seats.
_SEAT_STATE = {"held": "held", "paid": "sold", "expired": "free", "cancelled": "free"}
#: Told the jtis of queue passes whose hold cycle ended because their last hold expired
#: (see inventory.ledger): their admission slot may go to the next fan.
TurnOver = Callable[[list[str]], None]

_Mail = tuple[Command, "asyncio.Future[Result]"]


class ActorStopped(Unavailable):
    """The actor is not running (shutting down, crashed or no longer the owner)."""

    def __init__(self, message: str = "the inventory is restarting; retry shortly") -> None:
        super().__init__(message, retry_after=1, code="inventory_unavailable")


class InventoryActor:
    """The single writer of one event's inventory in this process."""

    def __init__(
        self,
        event_id: str,
        pool: asyncpg.Pool[Any],
        epoch: int,
        ledger: Ledger,
        *,
        publish: Publish | None = None,
        publish_seats: PublishSeats | None = None,
        on_turn_over: TurnOver | None = None,
        mailbox_size: int = 20_000,
        max_batch: int = 5_000,
        apply_chunk: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.event_id = event_id
        self.epoch = epoch
        self.ledger = ledger
        self._pool = pool
        self._publish = publish
        self._publish_seats = publish_seats
        # Seats moved by commits since the last publication (seat id -> state, last wins).
        self._seat_changes: dict[str, str] = {}
        self._on_turn_over = on_turn_over
        self._max_batch = max_batch
        self._apply_chunk = apply_chunk
        self._clock = clock
        self._send: MemoryObjectSendStream[_Mail]
        self._receive: MemoryObjectReceiveStream[_Mail]
        self._send, self._receive = anyio.create_memory_object_stream[_Mail](mailbox_size)
        self._closed = False
        self._mail_done = False  # set once run() will apply nothing more
        self._loop = asyncio.get_running_loop()
        self._timeouts = _Timeouts(self._loop)
        # Applied to the ledger but not yet committed: the callers and what they will hear.
        self._futures: list[asyncio.Future[Result]] = []
        self._results: list[Result] = []
        # With tracing on, links to the spans of the asks since the last commit: the commit
        # runs in the actor's task, outside every asker's trace (bounded as OTel bounds links).
        self._links: list[Link] = []
        self._committer_waiting: asyncio.Future[None] | None = None
        self._wanted = False  # the committer has something to look at
        self._conn: PoolConnectionProxy[Any] | None = None
        self._conn_since = 0.0
        self._replying: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()  # cleared while the ledger is rebuilt
        self._ready.set()
        self._room = asyncio.Event()  # cleared while too much waits for a commit
        self._room.set()
        self._published: tuple[dict[str, int], bool] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        self._publish_wanted = asyncio.Event()
        #: When the last reservation was asked of this actor (event-loop time; None: never):
        #: how a node tells the load balancer it is busy with a sale's checkout
        #: (:mod:`waitroom.balancer_agent`).
        self.reserved_at: float | None = None

    @classmethod
    async def load(
        cls, event_id: str, pool: asyncpg.Pool[Any], epoch: int, **kwargs: Any
    ) -> InventoryActor:
        """An actor whose ledger is loaded from PostgreSQL."""
        async with pool.acquire() as conn:
            ledger = await store.load_ledger(conn, event_id)
        return cls(event_id, pool, epoch, ledger, **kwargs)

    # --- callers ---------------------------------------------------------------------------

    def submit(self, command: Command, link: Link | None = None) -> Awaitable[Result]:
        """Queue ``command`` and return a future of its result (resolved after commit);
        with tracing on, the commit links ``link`` (a forwarded asker's span) or the
        current span."""
        if self._closed:
            raise ActorStopped()
        future: asyncio.Future[Result] = self._loop.create_future()
        if type(command) is Reserve:
            self.reserved_at = self._loop.time()
        link = link or tracing.current_link()
        if link is not None and len(self._links) < 128:
            self._links.append(link)
        try:
            self._send.send_nowait((command, future))
        except anyio.WouldBlock:
            return self._submit_waiting(command, future)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ActorStopped() from None
        return future

    async def _submit_waiting(self, command: Command, future: asyncio.Future[Result]) -> Result:
        try:
            await self._send.send((command, future))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ActorStopped() from None
        return await future

    async def ask(self, command: Command, timeout: float = 10.0) -> Result:
        """Apply ``command`` and return its result once it is durable.

        Raises :class:`ActorStopped` (503) if the actor stops first, and
        :class:`~waitroom.core.errors.Unavailable` if no answer comes within ``timeout`` seconds
        (the command may still commit: a retry with the same idempotency key is safe).
        """
        pending = self.submit(command)
        if not isinstance(pending, asyncio.Future):
            waited: Result = await asyncio.wait_for(pending, timeout)
            return waited
        # Not asyncio.wait_for, nor a loop timer per ask: this is the hot path of every
        # reservation, and a timer per ask cost more than the ledger's rules.
        watch = self._timeouts.watch(pending, timeout)
        try:
            result: Result = await pending
        finally:
            del watch[pending]
        return result

    @property
    def running(self) -> bool:
        """Whether the actor still takes commands."""
        return not self._closed

    def depth(self) -> int:
        """Commands waiting in the mailbox."""
        return self._receive.statistics().current_buffer_used

    # --- the actor task --------------------------------------------------------------------

    async def run(self) -> None:
        """The actor's loop; returns when closed, raises when it crashes or is fenced.

        Two tasks share the work. This one takes mail, applies it to the ledger and queues
        the replies; the committer (:meth:`_committer`) takes everything applied so far,
        writes it in one transaction and only then answers. While one commit is in flight,
        new mail is applied on top of it, and the next commit starts as soon as the previous
        one is done, before its callers have even woken up: PostgreSQL's work and this
        process's work overlap instead of taking turns. Commits stay in order, and a failed
        commit also fails everything applied on top of it (none of it was acknowledged),
        after which the ledger is rebuilt from PostgreSQL.
        """
        self._publish_task = asyncio.create_task(self._publisher(), name=f"publish:{self.event_id}")
        committer = asyncio.create_task(self._committer(), name=f"commit:{self.event_id}")
        committer.add_done_callback(self._committer_done)
        self._want_publish()
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    break
                if not self._ready.is_set():
                    await self._ready.wait()  # a rebuild after a failed commit is under way
                if committer.done():  # it crashed or was fenced: nobody would commit this
                    self._fail_mail(batch)
                    break
                try:
                    self._apply(batch)
                except BaseException:
                    # A bug: the ledger may be half-way through the batch. Nothing applied
                    # since the last commit started may be written now, so all of it fails;
                    # the supervisor restarts the actor from PostgreSQL.
                    self.ledger.drain_changes()
                    self._fail_mail(batch)
                    self._fail(self._futures, ActorStopped())
                    self._futures, self._results = [], []
                    raise
                if len(self._futures) >= self._max_batch:
                    # Backpressure: stop taking mail (so senders wait on the bounded mailbox)
                    # until the committer has taken what is queued.
                    self._room.clear()
                    await self._room.wait()
        finally:
            self._closed = True
            self._mail_done = True
            self._send.close()
            self._wake_committer()
            # The committer writes and answers what was applied, then stops; if it died,
            # whatever it left is failed here.
            await asyncio.gather(committer, return_exceptions=True)
            self._fail(self._futures, ActorStopped())
            self._futures, self._results = [], []
            self._fail_pending()
            # Cancelled again every 50 ms, not every second: redis-py connecting through
            # Python 3.11's asyncio.wait_for can swallow a cancellation (the inner write
            # finishing as it lands), and then the publisher's next round trip held up a
            # crashed actor's restart by a whole second. It has nothing to clean up.
            await cancel_and_wait(self._publish_task, every_s=0.05)
            # Seats moved by the last commits and not published yet: committed, so true
            # whatever stopped the actor; the open maps would otherwise miss them until
            # they read the snapshot again. Bounded: a Redis that is down loses only this.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._publish_seat_changes(), FINAL_PUBLISH_S)
            self._forget_gauges()
        crash = None if committer.cancelled() else committer.exception()
        if crash is not None:
            raise crash  # Fenced, or a rebuild that failed: the supervisor decides

    async def _next_batch(self) -> list[_Mail] | None:
        deadline = self.ledger.next_deadline()
        first: _Mail | None = None
        try:
            if deadline is None:
                first = await self._receive.receive()
            else:
                with anyio.move_on_after(max(0.0, deadline - self._clock())):
                    first = await self._receive.receive()
        except anyio.EndOfStream:
            return None
        batch = self._drain(self._apply_chunk - 1)
        if first is not None:
            batch.insert(0, first)
        return batch

    def _drain(self, limit: int) -> list[_Mail]:
        batch: list[_Mail] = []
        append = batch.append
        receive_nowait = self._receive.receive_nowait
        for _ in range(limit):
            try:
                append(receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        return batch

    def _apply(self, batch: list[_Mail]) -> None:
        """Apply ``batch`` to the ledger and queue its replies for the next commit."""
        now = self._clock()
        commands = [command for command, _ in batch]
        # Due holds expire first, whether the timer fired (empty batch) or mail came.
        commands.insert(0, _EXPIRE)
        results = self.ledger.apply_many(commands, now, _new_id)
        expired = results[0]
        del commands[0], results[0]
        self._futures += [future for _, future in batch]
        self._results += results
        self._count(commands, results, expired)
        self._wake_committer()
        if self._on_turn_over is not None and isinstance(expired, Expired) and expired.holds:
            self._turned_over(expired)

    def _turned_over(self, expired: Expired) -> None:
        """Tell which queue passes had their turn end with these holds' expiry.

        Not after the commit: the holds are past their deadline, so they are expired
        whatever becomes of this batch (a rebuild expires them again), and the fans behind
        in line should not wait for a commit to be admitted. Cancels need nothing here: the
        cancel route frees the pass's slot itself, and a paid pass is spent.
        """
        ledger = self.ledger
        jtis = sorted(
            {
                h.pass_jti
                for h in expired.holds
                if h.pass_jti is not None and ledger.pass_used(h.fan_id, h.pass_jti)
            }
        )
        if jtis and self._on_turn_over is not None:
            self._on_turn_over(jtis)

    def _wake_committer(self) -> None:
        self._wanted = True
        waiter = self._committer_waiting
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _committer(self) -> None:
        """Commit what was applied, in order, and answer its callers after each commit."""
        try:
            while True:
                self._wanted = False
                changes = self.ledger.drain_changes()
                futures, results = self._futures, self._results
                self._futures, self._results = [], []
                self._room.set()
                if changes.empty():
                    # Nothing to write (refusals, replays), and every earlier change is
                    # already committed: these answers are as durable as they will ever be.
                    self._reply(futures, results)
                    self._links.clear()  # nothing committed: no commit span to link
                    if self._mail_done and not self._futures:
                        return
                    if not self._wanted:
                        # Idle: give the connection back so that idle events hold none.
                        await self._release_connection()
                    # Checked again after every await: a wake-up while the release ran
                    # must not be lost.
                    while not self._wanted:
                        self._committer_waiting = self._loop.create_future()
                        await self._committer_waiting
                        self._committer_waiting = None
                    continue
                if not await self._commit(changes, futures, results):
                    await self._rebuild()
        finally:
            await self._release_connection()
            await asyncio.gather(*self._replying, return_exceptions=True)

    def _committer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # Fenced, or the rebuild failed: stop taking mail; run() reports why.
        self._closed = True
        self._send.close()
        self._ready.set()
        self._room.set()

    def _reply(self, futures: list[asyncio.Future[Result]], results: list[Result]) -> None:
        """Answer callers whose results are durable; large batches a chunk at a time.

        Each answer wakes a caller's task, and the loop runs every task woken at once in one
        go before it looks at its sockets again: thousands at a time would hold up the next
        commit's round trips for milliseconds. A chunk at a time, with a yield between
        chunks, the next commit (already started) keeps moving while callers wake.
        """
        if len(futures) <= self._apply_chunk:
            _resolve(futures, results)
        else:
            task = asyncio.create_task(self._reply_chunks(futures, results))
            self._replying.add(task)
            task.add_done_callback(self._replying.discard)
        self._want_publish()

    async def _reply_chunks(
        self, futures: list[asyncio.Future[Result]], results: list[Result]
    ) -> None:
        step = self._apply_chunk
        for start in range(0, len(futures), step):
            _resolve(futures[start : start + step], results[start : start + step])
            await asyncio.sleep(0)

    async def _connection(self) -> PoolConnectionProxy[Any]:
        """The connection commits go through, held from one commit to the next while busy.

        Not a pool checkout per commit: giving a connection back costs a reset round trip
        (and a wait to get it again) between commits that follow each other closely. Not
        held for good either: the pool is shared with every other event's actor and with
        request handlers, so a busy actor gives it back every ``CONNECTION_HOLD_S`` and
        queues for it again like everyone else.
        """
        if self._conn is None:
            self._conn = await self._pool.acquire()
            self._conn_since = time.monotonic()
        return self._conn

    async def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)

    async def _commit(
        self, changes: Changes, futures: list[asyncio.Future[Result]], results: list[Result]
    ) -> bool:
        """Commit one batch and answer its callers; False when the commit failed."""
        started = time.perf_counter()
        links, self._links = self._links, []
        try:
            with tracing.span(
                "inventory.commit", links=links, event=self.event_id, batch=len(futures)
            ):
                await store.commit(await self._connection(), self.event_id, self.epoch, changes)
        except store.Fenced:
            self._fail(futures, ActorStopped("this process no longer owns the inventory"))
            self._fail(self._futures, ActorStopped("this process no longer owns the inventory"))
            self._futures, self._results = [], []
            raise
        except Exception as exc:
            # Nothing of this batch is durable, so nothing of it may stay in memory either.
            log.warning(
                "group commit failed; rebuilding the ledger",
                extra={"event": self.event_id, "error": repr(exc), "batch": len(futures)},
            )
            self._fail(futures, ActorStopped("the inventory could not commit; retry shortly"))
            # No new mail is applied until the ledger is rebuilt (see _rebuild).
            self._ready.clear()
            # The connection may be broken or mid-transaction: the pool checks and resets it.
            with contextlib.suppress(Exception):
                await self._release_connection()
            return False
        finally:
            COMMIT_LATENCY.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(futures))
        if self._publish_seats is not None:
            self._note_seats(changes)
        self._reply(futures, results)
        if time.monotonic() - self._conn_since > CONNECTION_HOLD_S:
            await self._release_connection()
        return True

    async def _rebuild(self) -> None:
        """Throw away what is not in PostgreSQL and load the ledger again."""
        # Everything applied on top of the failed commit was computed from a state that
        # never became durable: it fails too, and no new mail is applied until the ledger
        # is PostgreSQL's again.
        self._ready.clear()
        try:
            self._fail(self._futures, ActorStopped("the inventory could not commit; retry"))
            self._futures, self._results = [], []
            self.ledger.drain_changes()
            async with self._pool.acquire() as conn:
                self.ledger = await store.load_ledger(conn, self.event_id)
        finally:
            self._ready.set()

    @staticmethod
    def _fail(futures: list[asyncio.Future[Result]], error: Exception) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(error)

    def _fail_mail(self, batch: list[_Mail]) -> None:
        self._fail([future for _, future in batch], ActorStopped())

    def _fail_pending(self) -> None:
        while True:
            try:
                _, future = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if not future.done():
                future.set_exception(ActorStopped())
        self._receive.close()

    def _count(self, commands: list[Command], results: list[Result], expired: Result) -> None:
        """Counts outcomes per batch, not per command: metric calls cost on the hot path."""
        kinds = collections.Counter(map(type, commands))
        refusals = collections.Counter(
            (command.__class__, result.code)
            for command, result in zip(commands, results, strict=True)
            if isinstance(result, Refused)
        )
        for (kind, code), n in refusals.items():
            kinds[kind] -= n
            _count_command(kind.__name__.lower(), code, n)
        for kind, n in kinds.items():
            if n:
                _count_command(kind.__name__.lower(), "ok", n)
        if isinstance(expired, Expired) and expired.holds:
            _count_command("expire", "ok", len(expired.holds))
        MAILBOX_DEPTH.labels(self.event_id).set(self.depth())

    # --- availability ----------------------------------------------------------------------

    def _want_publish(self) -> None:
        self._publish_wanted.set()

    def _note_seats(self, changes: Changes) -> None:
        """Remember the seats a committed batch moved, for the next publication."""
        pending = self._seat_changes
        for hold in (*changes.new_holds, *changes.updated_holds):
            if hold.seats:
                state = _SEAT_STATE.get(hold.status)
                if state is not None:
                    for seat in hold.seats:
                        pending[seat] = state
        for restock in changes.restocks:
            for seat in restock.seats:
                pending[seat] = "free"

    async def _publish_seat_changes(self) -> None:
        """Publish the seats moved since the last time (advisory, like availability: a
        failure is logged and the changes are kept for the next try)."""
        if not self._seat_changes or self._publish_seats is None:
            return
        pending, self._seat_changes = self._seat_changes, {}
        try:
            await self._publish_seats(pending)
        except Exception as exc:
            log.warning("publishing seat changes failed", extra={"error": repr(exc)})
            self._seat_changes = {**pending, **self._seat_changes}
            raise

    async def _publisher(self) -> None:
        """Publishes availability at most every 50 ms, off the commit path."""
        while True:
            await self._publish_wanted.wait()
            self._publish_wanted.clear()
            current = (self.ledger.availability(), self.ledger.sold_out())
            self._set_stock_gauges(current[0])
            try:
                await self._publish_seat_changes()
            except Exception:
                await asyncio.sleep(0.5)
                self._publish_wanted.set()
                continue
            if current != self._published:
                if self._publish is not None:
                    try:
                        await self._publish(*current)
                    except Exception as exc:  # availability is advisory; the next try fixes it
                        log.warning("publishing availability failed", extra={"error": repr(exc)})
                        await asyncio.sleep(0.5)
                        self._publish_wanted.set()
                        continue
                self._published = current
            await asyncio.sleep(0.05)

    def _set_stock_gauges(self, available: dict[str, int]) -> None:
        # Every time, not only when availability changes: a payment moves tickets from held
        # to sold and leaves availability as it was.
        held = self.ledger.held()
        for ticket_type in self.ledger.rules.ticket_types:
            name = ticket_type.name
            AVAILABLE.labels(self.event_id, name).set(available[name])
            HELD.labels(self.event_id, name).set(held[name])
            SOLD.labels(self.event_id, name).set(
                ticket_type.quantity - available[name] - held[name]
            )

    def _forget_gauges(self) -> None:
        forget(MAILBOX_DEPTH, self.event_id)
        for ticket_type in self.ledger.rules.ticket_types:
            for gauge in (AVAILABLE, HELD, SOLD):
                forget(gauge, self.event_id, ticket_type.name)

    def close(self) -> None:
        """Stop taking commands; the loop finishes what it has and returns."""
        self._closed = True
        self._send.close()


class _Timeouts:
    """Times out asks with one loop timer per 50 ms slot, not one per ask.

    A timer per ask (``call_later`` and ``cancel``) cost more than the ledger's own rules on
    the reserve path. Here an ask costs two dict operations: it is put in the slot of its
    deadline and taken out when it is answered; each slot's timer fails whatever is still
    in it when it fires, at most 50 ms late.
    """

    SLOT_S = 0.05

    __slots__ = ("_loop", "_slots")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, dict[asyncio.Future[Result], None]] = {}

    def watch(
        self, future: asyncio.Future[Result], timeout: float
    ) -> dict[asyncio.Future[Result], None]:
        """Fail ``future`` after ``timeout`` s unless it is taken out of the returned slot."""
        slot = int((self._loop.time() + timeout) / self.SLOT_S) + 1
        watched = self._slots.get(slot)
        if watched is None:
            watched = self._slots[slot] = {}
            self._loop.call_at(slot * self.SLOT_S, self._fire, slot)
        watched[future] = None
        return watched

    def _fire(self, slot: int) -> None:
        for future in self._slots.pop(slot, ()):
            _time_out(future)


class _HoldIds:
    """Unguessable, time-ordered hold ids in the canonical UUID text form (UUID version 7).

    48 bits of unix milliseconds, then 72 random bits. Time-ordered because a group commit
    inserts thousands of ids into the primary-key index at once: random ids land on random
    leaf pages all over a large index, ordered ones on the few rightmost (measured: +15% on
    the commit). The random bits come from os.urandom, 36 KiB at a time: one getrandom()
    call per hold was the single largest cost of the actor's hot path.
    """

    __slots__ = ("_hex", "_ms", "_pos", "_prefix")

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0
        self._ms = -1
        self._prefix = ""

    def __call__(self) -> str:
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._ms = ms
            t = f"{ms & 0xFFFFFFFFFFFF:012x}"
            self._prefix = f"{t[:8]}-{t[8:]}-7"
        if self._pos >= len(self._hex):
            # 9 random bytes (18 hex digits) per id, 4,096 ids per read.
            self._hex, self._pos = os.urandom(9 * 4096).hex(), 0
        h = self._hex[self._pos : self._pos + 18]
        self._pos += 18
        # "8" sets the RFC 9562 variant bits (10xx); the rest of that nibble is fixed.
        return f"{self._prefix}{h[:3]}-8{h[3:6]}-{h[6:]}"


_new_id = _HoldIds()
_EXPIRE = Expire()


def _resolve(futures: list[asyncio.Future[Result]], results: list[Result]) -> None:
    for future, result in zip(futures, results, strict=True):
        if not future.done():
            future.set_result(result)


def _time_out(future: asyncio.Future[Result]) -> None:
    if not future.done():
        future.set_exception(
            Unavailable(
                "the inventory did not answer in time; retry with the same Idempotency-Key",
                retry_after=1,
                code="inventory_timeout",
            )
        )


_command_counters: dict[tuple[str, str], Any] = {}


def _count_command(command: str, outcome: str, by: int = 1) -> None:
    child = _command_counters.get((command, outcome))
    if child is None:
        child = _command_counters[(command, outcome)] = COMMANDS.labels(command, outcome)
    child.inc(by)
