"""Long polls of a reservation whose payment is under way: answered when the payment settles.

After confirming, a checkout page used to ask for its reservation every half second until the
order was paid or the payment failed: some sixteen requests a buyer when a busy sale takes
eight seconds from confirm to paid, the largest share of a node's work in a sale's profile
(``BENCHMARKS.md``, issue 13). ``GET /v1/reservations/{id}?wait=N`` instead holds the request
up to ``N`` seconds (at most :data:`MAX_WAIT_S`) while a payment is under way, and answers as
soon as the order is paid or the payment failed: usually one request a buyer.

How the server learns it: PostgreSQL triggers (migration 0020) ``NOTIFY
waitroom_reservations`` with the hold's id when an order's status changes or a payment fails,
at the commit, whoever wrote it; the payment workers, who settle nearly all of them in a sale,
send it themselves just after their commit instead (migration 0025: a NOTIFY inside the
transaction made every such commit wait for the others' WAL flushes). Each server process keeps one connection listening
(:class:`ReservationChanges`) and wakes the requests waiting for that hold. Waiting is
registered *before* the reservation is read, so a change committed between the read and the
wait is not missed.

While the listening connection is down (PostgreSQL restarting), nothing waits: requests are
answered at once, as a plain poll, and the page polls as before. Every wait still ends after
``N`` seconds with the reservation as it is, so a lost notification costs a fan that much
delay, never a stuck page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import asyncpg

from inventory.orders import RESERVATIONS_CHANNEL
from waitroom.core.runtime import cancel_and_wait

log = logging.getLogger("waitroom.reservation_changes")

#: The channel migration 0020's triggers and the payment workers notify (payload: the hold id).
CHANNEL = RESERVATIONS_CHANNEL
#: Longest a request may wait (below the usual 30-60 s idle timeouts of proxies).
MAX_WAIT_S = 25.0
#: Seconds between two attempts to listen again after the connection was lost.
RECONNECT_S = 1.0
#: Seconds between two checks that the listening connection still answers.
PING_EVERY_S = 10.0


class ReservationChanges:
    """One process's listener of settled payments, and the requests waiting for them."""

    def __init__(self, dsn: str, *, connect_timeout_s: float = 5.0) -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._conn: asyncpg.Connection[Any] | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        """Whether notifications arrive now (otherwise nobody should wait)."""
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Start listening in the background (PostgreSQL may be down: retried)."""
        self._task = asyncio.create_task(self._run(), name="reservation-changes")

    async def close(self) -> None:
        """Stop listening and wake every waiting request."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._drop()

    @contextlib.contextmanager
    def watch(self, hold_id: str) -> Iterator[asyncio.Event]:
        """An event set when ``hold_id``'s order or payment changes (or listening stops),
        for the duration of the block."""
        event = asyncio.Event()
        self._waiting.setdefault(hold_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiting.get(hold_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiting[hold_id]

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        for event in self._waiting.get(str(payload), ()):
            event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiting.values():
            for event in waiters:
                event.set()

    async def _run(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s)
                self._lost.clear()
                conn.add_termination_listener(lambda _c: self._lost.set())
                await conn.add_listener(CHANNEL, self._notified)
                self._conn = conn
                # Whatever settled while nobody listened: the waiting requests read again.
                self._wake_all()
                while not self._lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._lost.wait(), PING_EVERY_S)
                    if not self._lost.is_set():  # a connection silently gone fails here
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), PING_EVERY_S)
                log.warning("listening for settled payments stopped: connection lost")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cannot listen for settled payments", extra={"error": repr(exc)})
            await self._drop()
            await asyncio.sleep(RECONNECT_S)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        # Waiting requests would wait in vain: they answer with what they read.
        self._wake_all()
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
