"""The inventory actor of one event: one task, one mailbox, group commit, replies after commit.

Callers :meth:`InventoryActor.ask` with a command and wait for its result. The actor task
takes whatever has piled up in its bounded mailbox (backpressure: a full mailbox makes
askers wait), applies the whole batch to its in-memory :class:`~inventory.ledger.Ledger`,
writes everything the batch changed in ONE fenced PostgreSQL transaction, and only then
answers the batch's callers (invariant 2: acknowledged means durable). While one batch
commits, the next piles up, so batches grow exactly when load does (group commit).

If a commit fails, nothing of that batch was acknowledged: the callers get 503 and the
actor rebuilds its ledger from PostgreSQL, so no unacknowledged change survives in memory.
If the commit was refused because another process took over (:class:`~inventory.store.Fenced`),
the actor stops; its supervisor does not restart it here.

Holds expire from the actor's own timer: it waits for mail at most until the ledger's next
deadline and then applies :class:`~inventory.ledger.Expire`, which pops only the holds due.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from prometheus_client import Counter, Gauge, Histogram

from inventory import store
from inventory.ledger import Changes, Command, Expire, Expired, Ledger, Refused, Result
from waitroom.errors import Unavailable

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
MAILBOX_DEPTH = Gauge(
    "waitroom_inventory_mailbox_depth", "Commands waiting in an actor's mailbox.", ["event"]
)
AVAILABLE = Gauge(
    "waitroom_inventory_tickets_available",
    "Tickets available per ticket type, as the owning actor sees them.",
    ["event", "ticket_type"],
)

#: What an actor publishes after commits: availability per type and whether it is sold out.
Publish = Callable[[dict[str, int], bool], Awaitable[None]]

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
        mailbox_size: int = 20_000,
        max_batch: int = 5_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.event_id = event_id
        self.epoch = epoch
        self.ledger = ledger
        self._pool = pool
        self._publish = publish
        self._max_batch = max_batch
        self._clock = clock
        self._send: MemoryObjectSendStream[_Mail]
        self._receive: MemoryObjectReceiveStream[_Mail]
        self._send, self._receive = anyio.create_memory_object_stream[_Mail](mailbox_size)
        self._closed = False
        self._fenced = False
        self._published: tuple[dict[str, int], bool] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        self._publish_wanted = asyncio.Event()

    @classmethod
    async def load(
        cls, event_id: str, pool: asyncpg.Pool[Any], epoch: int, **kwargs: Any
    ) -> InventoryActor:
        """An actor whose ledger is loaded from PostgreSQL."""
        async with pool.acquire() as conn:
            ledger = await store.load_ledger(conn, event_id)
        return cls(event_id, pool, epoch, ledger, **kwargs)

    # --- callers ---------------------------------------------------------------------------

    def submit(self, command: Command) -> Awaitable[Result]:
        """Queue ``command`` and return a future of its result (resolved after commit)."""
        if self._closed:
            raise ActorStopped()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
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
        :class:`~waitroom.errors.Unavailable` if no answer comes within ``timeout`` seconds
        (the command may still commit: a retry with the same idempotency key is safe).
        """
        pending = self.submit(command)
        if not isinstance(pending, asyncio.Future):
            waited: Result = await asyncio.wait_for(pending, timeout)
            return waited
        # A bare timer instead of asyncio.wait_for: this is the hot path of every reservation
        # and wait_for costs a wrapper future and callbacks per call.
        timer = asyncio.get_running_loop().call_later(timeout, _time_out, pending)
        try:
            result: Result = await pending
        finally:
            timer.cancel()
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

        Commits are pipelined one deep: while batch N is being committed, batch N+1 is
        already applied to the ledger in memory, but its callers hear back only after its
        own commit, which starts only once N's has succeeded. Commits stay in order, and a
        failed commit also fails the batch applied on top of it (neither was acknowledged),
        after which the ledger is rebuilt from PostgreSQL.
        """
        self._publish_task = asyncio.create_task(self._publisher(), name=f"publish:{self.event_id}")
        self._want_publish()
        inflight: asyncio.Task[bool] | None = None
        try:
            while not self._fenced:
                batch = await self._next_batch()
                if batch is None or self._fenced:
                    break
                if inflight is not None and inflight.done():
                    # Settle a commit that already finished before applying new mail on
                    # top of it, so mail that came after a failure is not failed with it.
                    committed, inflight = inflight.result(), None
                    if not committed:
                        await self._rebuild()
                replies = self._apply(batch)
                if inflight is not None:
                    committed = await inflight  # raises Fenced: this actor must stop
                    inflight = None
                    if not committed:
                        self._fail(replies, ActorStopped("the inventory could not commit; retry"))
                        await self._rebuild()
                        continue
                    # Mail that arrived during that commit joins this batch's commit.
                    replies += self._apply(self._drain(self._max_batch - len(replies)))
                changes = self.ledger.drain_changes()
                if changes.empty():
                    self._reply(replies)
                    continue
                inflight = asyncio.create_task(self._commit(changes, replies))
            if inflight is not None:
                task, inflight = inflight, None
                await task  # re-raises Fenced, so the supervisor knows why the actor stopped
        finally:
            if inflight is not None:
                await asyncio.gather(inflight, return_exceptions=True)
            self._closed = True
            self._send.close()
            self._fail_pending()
            self._publish_task.cancel()
            await asyncio.gather(self._publish_task, return_exceptions=True)

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
        batch = self._drain(self._max_batch - 1)
        if first is not None:
            batch.insert(0, first)
        return batch

    def _drain(self, limit: int) -> list[_Mail]:
        batch: list[_Mail] = []
        receive_nowait = self._receive.receive_nowait
        while len(batch) < limit:
            try:
                batch.append(receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        return batch

    def _apply(self, batch: list[_Mail]) -> list[tuple[asyncio.Future[Result], Result]]:
        now = self._clock()
        ledger = self.ledger
        new_id = _new_id
        # Due holds expire first, whether the timer fired (empty batch) or mail came.
        expired = ledger.apply(Expire(), now, new_id)
        replies = [(future, ledger.apply(command, now, new_id)) for command, future in batch]
        self._count(batch, replies, expired)
        return replies

    def _reply(self, replies: list[tuple[asyncio.Future[Result], Result]]) -> None:
        for future, result in replies:
            if not future.done():
                future.set_result(result)
        self._want_publish()

    async def _commit(
        self, changes: Changes, replies: list[tuple[asyncio.Future[Result], Result]]
    ) -> bool:
        """Commit one batch and answer its callers; False when the commit failed."""
        started = time.perf_counter()
        try:
            async with self._pool.acquire() as conn:
                await store.commit(conn, self.event_id, self.epoch, changes)
        except store.Fenced:
            self._fail(replies, ActorStopped("this process no longer owns the inventory"))
            # Wake the loop (it may be waiting for mail) so the actor stops now.
            self._fenced = True
            self.close()
            raise
        except Exception as exc:
            # Nothing of this batch is durable, so nothing of it may stay in memory either.
            log.warning(
                "group commit failed; rebuilding the ledger",
                extra={"event": self.event_id, "error": repr(exc), "batch": len(replies)},
            )
            self._fail(replies, ActorStopped("the inventory could not commit; retry shortly"))
            return False
        finally:
            COMMIT_LATENCY.observe(time.perf_counter() - started)
        BATCH_SIZE.observe(len(replies))
        self._reply(replies)
        return True

    async def _rebuild(self) -> None:
        self.ledger.drain_changes()
        async with self._pool.acquire() as conn:
            self.ledger = await store.load_ledger(conn, self.event_id)

    @staticmethod
    def _fail(results: list[tuple[asyncio.Future[Result], Result]], error: Exception) -> None:
        for future, _ in results:
            if not future.done():
                future.set_exception(error)

    def _fail_pending(self) -> None:
        while True:
            try:
                _, future = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if not future.done():
                future.set_exception(ActorStopped())
        self._receive.close()

    def _count(
        self,
        batch: list[_Mail],
        results: list[tuple[asyncio.Future[Result], Result]],
        expired: Result,
    ) -> None:
        """Counts outcomes per batch, not per command: metric calls cost on the hot path."""
        tally: dict[tuple[str, str], int] = {}
        for (command, _), (_, result) in zip(batch, results, strict=False):
            key = (
                command.__class__.__name__.lower(),
                result.code if isinstance(result, Refused) else "ok",
            )
            tally[key] = tally.get(key, 0) + 1
        if isinstance(expired, Expired) and expired.holds:
            tally[("expire", "ok")] = len(expired.holds)
        for (command_name, outcome), n in tally.items():
            _count_command(command_name, outcome, n)
        MAILBOX_DEPTH.labels(self.event_id).set(self.depth())

    # --- availability ----------------------------------------------------------------------

    def _want_publish(self) -> None:
        self._publish_wanted.set()

    async def _publisher(self) -> None:
        """Publishes availability at most every 50 ms, off the commit path."""
        while True:
            await self._publish_wanted.wait()
            self._publish_wanted.clear()
            current = (self.ledger.availability(), self.ledger.sold_out())
            if current != self._published:
                for name, left in current[0].items():
                    AVAILABLE.labels(self.event_id, name).set(left)
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

    def close(self) -> None:
        """Stop taking commands; the loop finishes what it has and returns."""
        self._closed = True
        self._send.close()


class _HoldIds:
    """Unguessable hold ids: 128 random bits each, in the canonical UUID text form.

    The bits come from os.urandom, read 64 KiB at a time: one getrandom() call per hold was
    the single largest cost of the actor's hot path.
    """

    __slots__ = ("_hex", "_pos")

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0

    def __call__(self) -> str:
        if self._pos >= len(self._hex):
            self._hex, self._pos = os.urandom(65536).hex(), 0
        h = self._hex[self._pos : self._pos + 32]
        self._pos += 32
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_new_id = _HoldIds()


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
