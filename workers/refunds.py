"""The refund worker: money back through the provider, tickets back to stock, then succeeded.

A refund (:mod:`inventory.refunds`) is due once it is ``approved`` (its tickets are voided by
then). Workers (any number, in any number of processes) claim due refunds with ``FOR UPDATE
SKIP LOCKED``; claiming moves it to ``processing`` and bumps ``attempts``, the claim's fencing
token: every later write is ``WHERE state = 'processing' AND attempts = <claimed>``, so a
worker that stalled (its claim was handed back after ``lease_s`` and claimed again) writes
nothing. One attempt, each step safe to repeat:

1. Money: ``POST /v1/refunds`` ``{"charge_id", "amount_minor"}`` under ``Idempotency-Key:
   order-refund:{refund id}``: the provider gives back at most once per key however often
   the request is repeated. The answer's id is written on the refund (``provider_ref``) at
   once, so a later claim skips this step. A timeout or 5xx is retried with full-jitter
   backoff (:func:`workers.payments.backoff`); a 4xx fails the refund for good (an operator
   must look: the tickets stay voided, and nothing in waitroom reinstates them).
2. Reconciliation: after :data:`MAX_ATTEMPTS` requests ended without an answer, whether the
   provider refunded is unknown (the answers were lost). The refund is marked ``reconcile =
   'due'`` and retried only after the reconcile delay (``WAITROOM_PAYMENT_RECONCILE_DELAY_S``,
   when no request under its key can still be in flight); the next claim first asks the
   provider (``GET /v1/refunds?idempotency_key=``) and takes the refund it made
   (``found``) or, when there is none (``not_found``), asks for it again. A refund is never
   given up on: the money must go back.
3. Stock: :class:`~inventory.ledger.Restock` through the event's inventory actor, keyed by the
   refund id, so a repeat returns the tickets once. Stock returns when the money is back, not
   at approval: until then a refund can still fail for good, and a ticket whose money was
   not returned must never have been sold again to someone else. Tickets of
   seats name their seats (``tickets.seat_id``), which go back on sale with them: a partial
   refund of a seated order frees exactly the refunded tickets' seats.
4. One transaction: ``succeeded`` (the stock not returned when the actor refused the
   ``Restock`` or the event is gone: ``stock_returned`` false, logged), the order's history (``refund.succeeded``), the audit log
   and the outbox message ``order.refunded`` (:class:`inventory.refunds.OrderRefunded`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, Literal, get_args

import asyncpg
import httpx
import msgspec
from prometheus_client import Counter

from inventory.hosting import InventoryHost
from inventory.ledger import Refused, Restock, Restocked
from inventory.orders import record_event
from inventory.refunds import (
    ORDER_REFUNDED,
    REFUND_FAILED,
    REFUND_RECONCILED,
    REFUND_RETRY,
    REFUND_SUCCEEDED,
    REFUNDS_CHANNEL,
    OrderRefunded,
)
from waitroom.core import audit
from waitroom.core.errors import Unavailable, WaitroomError
from workers.payments import (
    ProviderClient,
    ProviderRefused,
    ProviderUnavailable,
    backoff,
    describe,
)

log = logging.getLogger("waitroom.refunds")

#: Requests to the provider that may end unanswered before the refund is reconciled.
MAX_ATTEMPTS = 3
BASE_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: A ``processing`` refund untouched this long belonged to a worker that died: handed back.
LEASE_S = 60.0
#: The audit log's name for this worker.
ACTOR = "workers:refunds"

#: How one claim ended; ``lost``: another claim owns the refund now, nothing was written.
RefundOutcome = Literal["succeeded", "failed", "retry", "lost"]

REFUND_ATTEMPTS = Counter(
    "waitroom_refund_attempts_total",
    "Refund attempts this process finished, by outcome: succeeded (the money is back, the"
    " stock returned unless the inventory refused it), failed (the provider refused for good:"
    " an operator must look), retry (backing off, or a reconciliation pending), lost (another"
    " worker took the refund over).",
    ["outcome"],
)
# Every outcome exported from the start, at 0: an alert on increase() (WaitroomRefundsFailed)
# sees the first failure, which a series born at 1 would hide.
for _outcome in get_args(RefundOutcome):
    REFUND_ATTEMPTS.labels(_outcome)


def refund_key(refund_id: str) -> str:
    """The provider's idempotency key of a refund."""
    return f"order-refund:{refund_id}"


class ProviderRefund(msgspec.Struct, frozen=True):
    """The part of the provider's refund the worker reads."""

    id: str
    amount_minor: int


class RefundProvider(ProviderClient):
    """The provider's partial refunds, on the payment workers' client (same timeouts, same
    classification of errors: 5xx, 429 and timeouts are :class:`ProviderUnavailable`)."""

    async def refund_part(self, charge_id: str, amount_minor: int, key: str) -> ProviderRefund:
        """Give ``amount_minor`` of ``charge_id`` back, at most once per ``key``."""
        response = await self._send(
            "POST",
            "/v1/refunds",
            json={"charge_id": charge_id, "amount_minor": amount_minor},
            headers={"Idempotency-Key": key},
        )
        if response.status_code not in (200, 201):
            raise ProviderRefused(f"provider refused the refund: {describe(response)}")
        return _refund_of(response)

    async def find_refund(self, key: str) -> ProviderRefund | None:
        """The refund made under ``key``, or None if no request under it refunded."""
        response = await self._send("GET", "/v1/refunds", params={"idempotency_key": key})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ProviderRefused(f"provider refused the lookup: {describe(response)}")
        return _refund_of(response)


def _refund_of(response: httpx.Response) -> ProviderRefund:
    try:
        return msgspec.json.decode(response.content, type=ProviderRefund)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise ProviderUnavailable("provider answered an unreadable refund") from None


class ClaimedRefund(msgspec.Struct, frozen=True):
    """A refund this worker claimed, with what it needs."""

    id: str
    order_id: str
    event_id: str
    fan_id: str
    hold_id: str
    ticket_type: str
    quantity: int
    amount_minor: int
    currency: str
    charge_id: str
    provider_ref: str | None
    #: Claims so far including this one: the claim's fencing token.
    attempts: int
    reconcile: str | None
    #: The seats of the refunded tickets (seated tickets), in the refund's ticket order.
    seats: tuple[str, ...] = ()


_CLAIM = """
UPDATE refunds r SET state = 'processing', attempts = attempts + 1, updated_at = now()
 WHERE id IN (SELECT id FROM refunds
               WHERE state = 'approved' AND next_attempt_at <= now()
               ORDER BY next_attempt_at LIMIT $1
               FOR UPDATE SKIP LOCKED)
RETURNING id::text, order_id::text, event_id, fan_id, hold_id::text, ticket_type,
          cardinality(tickets) AS quantity, amount_minor, currency, charge_id, provider_ref,
          attempts, reconcile,
          ARRAY(SELECT t.seat_id FROM tickets t
                 WHERE t.code = ANY(r.tickets) AND t.seat_id IS NOT NULL
                 ORDER BY array_position(r.tickets, t.code)) AS seats
"""
_FENCE = "id = $1 AND state = 'processing' AND attempts = $2"


class RefundWorker:
    """Claims due refunds and runs at most ``concurrency`` of them at once."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        host: InventoryHost,
        http: httpx.AsyncClient,
        *,
        timeout_s: float = 2.0,
        concurrency: int = 8,
        max_attempts: int = MAX_ATTEMPTS,
        base_backoff_s: float = BASE_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        reconcile_delay_s: float = 60.0,
        lease_s: float = LEASE_S,
        poll_s: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        """``http`` is a client whose ``base_url`` is the provider; ``timeout_s`` bounds each
        call. ``reconcile_delay_s``: how long after the last unanswered request the provider
        is asked what it did."""
        self._pool = pool
        self._host = host
        self._provider = RefundProvider(http, timeout_s)
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._base = base_backoff_s
        self._cap = max_backoff_s
        self._reconcile_delay_s = reconcile_delay_s
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; never raises on outages."""
        listener = await self._listen()
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    done = await self.run_once()
                except Exception as exc:  # database down: keep trying, never die
                    log.warning("refund pass failed", extra={"error": repr(exc)})
                    done = {}
                if not done:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wait(stop), self._poll_s)
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.remove_listener(REFUNDS_CHANNEL, self._notified)
                with contextlib.suppress(Exception):
                    await self._pool.release(listener)

    async def _wait(self, stop: asyncio.Event) -> None:
        stopper = asyncio.ensure_future(stop.wait())
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stopper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            waker.cancel()

    async def _listen(self) -> Any:
        try:
            conn = await self._pool.acquire()
            await conn.add_listener(REFUNDS_CHANNEL, self._notified)
        except Exception as exc:  # polling still finds the work
            log.warning("cannot listen for refunds", extra={"error": repr(exc)})
            return None
        return conn

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def run_once(self) -> dict[str, RefundOutcome]:
        """Hand back stalled claims, claim what is due, run it all; outcomes by refund id."""
        await self._pool.execute(
            "UPDATE refunds SET state = 'approved', next_attempt_at = now(), updated_at = now(),"
            " last_error = 'worker stopped' WHERE state = 'processing'"
            " AND updated_at < now() - make_interval(secs => $1)",
            self._lease_s,
        )
        rows = await self._pool.fetch(_CLAIM, self._concurrency)
        claimed = [
            ClaimedRefund(
                **{**dict(r), "currency": r["currency"].strip(), "seats": tuple(r["seats"])}
            )
            for r in rows
        ]
        outcomes = await asyncio.gather(*(self.process(r) for r in claimed))
        return {r.id: o for r, o in zip(claimed, outcomes, strict=True)}

    async def process(self, r: ClaimedRefund) -> RefundOutcome:
        """One claimed refund to its outcome for this claim; never raises (but cancels)."""
        outcome: RefundOutcome = "lost"
        try:
            outcome = await self._attempt(r)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database hiccup mid-attempt: retry it, lose nothing
            log.exception("refund attempt crashed", extra={"refund": r.id})
            with contextlib.suppress(Exception):
                outcome = await self._retry(r, f"internal error: {exc!r}"[:200], ambiguous=False)
        REFUND_ATTEMPTS.labels(outcome).inc()
        return outcome

    async def _attempt(self, r: ClaimedRefund) -> RefundOutcome:
        provider_ref = r.provider_ref
        if provider_ref is None and r.amount_minor == 0:
            provider_ref = "nothing-to-refund"  # free tickets: no money moves
        if provider_ref is None and r.reconcile == "due":
            try:
                found = await self._provider.find_refund(refund_key(r.id))
            except ProviderUnavailable as exc:
                return await self._retry(r, f"lookup: {exc}", ambiguous=False)
            except ProviderRefused as exc:
                return await self._retry(r, str(exc), ambiguous=False)
            outcome = "found" if found is not None else "not_found"
            if not await self._reconciled(r, outcome, found):
                return "lost"
            if found is not None:
                provider_ref = found.id
        if provider_ref is None:
            try:
                refund = await self._provider.refund_part(
                    r.charge_id, r.amount_minor, refund_key(r.id)
                )
            except ProviderUnavailable as exc:
                return await self._retry(r, str(exc), ambiguous=True)
            except ProviderRefused as exc:
                return await self._fail(r, str(exc))
            provider_ref = refund.id
            done = await self._pool.fetchval(
                f"UPDATE refunds SET provider_ref = $3, updated_at = now() WHERE {_FENCE}"
                " RETURNING id",
                r.id,
                r.attempts,
                provider_ref,
            )
            if done is None:
                return "lost"
        try:
            result = await self._host.ask(
                r.event_id,
                Restock(r.id, r.hold_id, r.fan_id, r.ticket_type, r.quantity, r.seats),
            )
        except Unavailable as exc:
            return await self._retry(r, f"inventory unavailable: {exc.code}", ambiguous=False)
        except WaitroomError as exc:  # the event is gone: nothing to put back on sale
            log.error("stock not returned", extra={"refund": r.id, "error": exc.code})
            result = Refused(exc.code, exc.message, {})
        if isinstance(result, Refused):
            log.error(
                "the inventory refused a refund's stock return",
                extra={"refund": r.id, "code": result.code},
            )
        return await self._succeed(r, provider_ref, restocked=isinstance(result, Restocked))

    async def _reconciled(
        self, r: ClaimedRefund, outcome: str, found: ProviderRefund | None
    ) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                f"UPDATE refunds SET reconcile = $3, provider_ref = coalesce($4, provider_ref),"
                f" updated_at = now() WHERE {_FENCE} RETURNING id",
                r.id,
                r.attempts,
                outcome,
                found.id if found is not None else None,
            )
            if done is None:
                return False
            await record_event(
                conn,
                r.order_id,
                REFUND_RECONCILED,
                refund_id=r.id,
                found=outcome,
                provider_ref=found.id if found is not None else None,
            )
        return True

    async def _succeed(
        self, r: ClaimedRefund, provider_ref: str, *, restocked: bool
    ) -> RefundOutcome:
        payload = OrderRefunded(r.order_id, r.id, r.amount_minor, r.currency)
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                f"UPDATE refunds SET state = 'succeeded', provider_ref = $3, last_error = NULL,"
                f" stock_returned_at = CASE WHEN $4 THEN now() END, next_attempt_at = NULL,"
                f" updated_at = now() WHERE {_FENCE} RETURNING id",
                r.id,
                r.attempts,
                provider_ref,
                restocked,
            )
            if done is None:
                return "lost"
            detail: dict[str, Any] = {
                "refund_id": r.id,
                "amount_minor": r.amount_minor,
                "provider_ref": provider_ref,
                "stock_returned": restocked,
            }
            await record_event(conn, r.order_id, REFUND_SUCCEEDED, **detail)
            await audit.record(
                conn, ACTOR, "refund.succeed", r.event_id, new=msgspec.json.encode(detail).decode()
            )
            await conn.execute(
                # A task as well as a message: the mailer's outbox handler writes the fan's
                # e-mail (workers.mailer); the relay publishes it to the stream either way.
                "INSERT INTO outbox (event_id, topic, payload, handle_after)"
                " VALUES ($1, $2, $3, now())",
                r.event_id,
                ORDER_REFUNDED,
                msgspec.json.encode(payload).decode(),
            )
        log.info("refund succeeded", extra={"refund": r.id, "order": r.order_id})
        return "succeeded"

    async def _fail(self, r: ClaimedRefund, error: str) -> RefundOutcome:
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                f"UPDATE refunds SET state = 'failed', last_error = $3, next_attempt_at = NULL,"
                f" updated_at = now() WHERE {_FENCE} RETURNING id",
                r.id,
                r.attempts,
                error[:500],
            )
            if done is None:
                return "lost"
            await record_event(conn, r.order_id, REFUND_FAILED, refund_id=r.id, error=error)
            await audit.record(
                conn,
                ACTOR,
                "refund.fail",
                r.event_id,
                new=msgspec.json.encode({"refund_id": r.id, "error": error}).decode(),
            )
        log.error("refund failed; needs an operator", extra={"refund": r.id, "error": error})
        return "failed"

    async def _retry(self, r: ClaimedRefund, error: str, *, ambiguous: bool) -> RefundOutcome:
        """Back to ``approved``, due after a backoff; after ``max_attempts`` unanswered
        requests, due for reconciliation after the reconcile delay instead."""
        now = time.time()
        reconcile = ambiguous and r.attempts >= self._max_attempts and r.reconcile != "due"
        if reconcile:
            delay = self._reconcile_delay_s
        else:
            delay = backoff(r.attempts, now, self._rng, base=self._base, cap=self._cap) - now
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                f"UPDATE refunds SET state = 'approved', last_error = $3, updated_at = now(),"
                f" next_attempt_at = now() + make_interval(secs => $4),"
                f" reconcile = CASE WHEN $5 THEN 'due' ELSE reconcile END WHERE {_FENCE}"
                " RETURNING id",
                r.id,
                r.attempts,
                error[:500],
                delay,
                reconcile,
            )
            if done is None:
                return "lost"
            await record_event(
                conn,
                r.order_id,
                REFUND_RETRY,
                refund_id=r.id,
                attempt=r.attempts,
                error=error,
                reconcile=reconcile,
            )
        log.info("refund will be retried", extra={"refund": r.id, "error": error, "in_s": delay})
        return "retry"
