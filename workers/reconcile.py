"""Reconciliation: payments that ended without knowing what the provider did.

A payment attempt that gives up after transient errors of its charge (timeouts, 5xx, the
provider unreachable) cannot tell "nothing was charged" from "charged, and the answer was
lost": :mod:`workers.payments` fails it with ``reconcile = 'due'``, due
``WAITROOM_PAYMENT_RECONCILE_DELAY_S`` later, when no request under its charge key can still be
in flight at the provider. So does an attempt whose charge went through while another attempt
paid the order. The reconciler, run by the workers every
``WAITROOM_PAYMENT_RECONCILE_INTERVAL_S`` and once by ``waitroom payments reconcile``, settles
each such payment:

1. Ask the provider for the charge made under the payment's charge key
   (``GET /v1/charges?idempotency_key=``). None, or declined: ``no_charge``. Already refunded:
   ``refunded``.
2. Money was taken. Confirm the hold with this charge through the event's inventory actor
   (the same idempotent confirm as a payment attempt's,
   :func:`workers.payments.confirm_charge`): the hold is still valid (or already paid with
   this very charge), so the order is ``completed`` in one transaction (the payment moves
   from ``failed`` to ``succeeded``, the order is paid, tickets are issued, the pass is spent
   through the outbox: :func:`workers.payments.pay_order`); or the hold is gone (expired,
   cancelled, paid with another attempt's charge), so the charge is ``refunded``. Only the
   inventory's answer decides: it is the same for every claim of the same charge.
3. The outcome is written on the payment (``reconcile``, ``reconciled_at``, ``provider_ref``)
   with a ``payment.reconciled`` row in the order's history (``order_events``) saying what
   was found and done, in one transaction.

A 4xx refusal of the refund ends as ``refund_refused``, logged as an error for an operator.
Anything transient (provider or inventory unavailable) leaves the payment due, again after a
full-jitter backoff (:data:`BASE_BACKOFF_S` doubling to :data:`MAX_BACKOFF_S`) with
``reconcile_error`` saying why: a charge is never left unsettled.

Concurrency: reconcilers (any number, in any number of processes) claim due payments with
``FOR UPDATE SKIP LOCKED``, pushing ``reconcile_after`` ``lease_s`` ahead and bumping
``reconcile_attempts``, the claim's fencing token: every write is ``WHERE reconcile = 'due'
AND reconcile_attempts = <claimed>``. Two reconcilers never hold the same payment at once;
one whose lease ran out while it worked (the payment was claimed again) writes nothing, and
whatever it already did at the provider or in the inventory is repeated by the next claim
under the same keys (the confirm's ``charge:{id}``, the refund's ``refund:{id}``), so the
order is completed or the charge refunded once.

Each pass also hands back ``processing`` payments whose worker stopped heartbeating
(:func:`workers.payments.recover_stale`), so payments stuck with a dead worker are taken over
even where no payment pool runs the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any, Literal

import asyncpg
import httpx
import msgspec

from inventory.hosting import InventoryHost
from inventory.orders import PAYMENT_RECONCILED, record_event
from waitroom.core.errors import Unavailable
from workers.payments import (
    HEARTBEAT_TIMEOUT_S,
    OrderToPay,
    Paid,
    ProviderClient,
    ProviderRefused,
    ProviderUnavailable,
    backoff,
    confirm_charge,
    pay_order,
    recover_stale,
    transition,
)

log = logging.getLogger("waitroom.reconcile")

#: How often the workers reconcile (the default of ``WAITROOM_PAYMENT_RECONCILE_INTERVAL_S``).
INTERVAL_S = 30.0
#: How long a claimed payment is left to its reconciler before another may claim it.
LEASE_S = 60.0
BASE_BACKOFF_S = 5.0
MAX_BACKOFF_S = 300.0
BATCH = 50
#: Batches one pass claims at most (a pass ends earlier when nothing more is due).
MAX_BATCHES = 100

#: What a reconciler did with one payment: settled (the first four, written on the payment
#: and in the order's history); ``retry``: try again later; ``lost``: another reconciler's
#: claim owns the payment now, and nothing was written.
ReconcileOutcome = Literal["completed", "refunded", "no_charge", "refund_refused", "retry", "lost"]

_REVIVE = transition("failed", "succeeded")


class Suspect(msgspec.Struct, frozen=True):
    """A failed payment claimed for reconciliation, with its order and hold."""

    id: str
    order_id: str
    charge_key: str
    #: Reconciler claims so far including this one: the claim's fencing token.
    token: int
    hold_id: str
    event_id: str
    fan_id: str
    ticket_type: str
    quantity: int
    pass_jti: str | None


class ReconcileReport(msgspec.Struct, frozen=True):
    """What one pass did: payments of stalled workers handed back, outcomes by payment id."""

    recovered: int
    outcomes: dict[str, str]

    def counts(self) -> dict[str, int]:
        """How many payments ended each way."""
        found: dict[str, int] = {}
        for outcome in self.outcomes.values():
            found[outcome] = found.get(outcome, 0) + 1
        return found


_CLAIM = """
WITH due AS (
    SELECT id FROM payments
     WHERE reconcile = 'due' AND reconcile_after <= now()
     ORDER BY reconcile_after LIMIT $1
     FOR UPDATE SKIP LOCKED),
claimed AS (
    UPDATE payments p
       SET reconcile_after = now() + make_interval(secs => $2),
           reconcile_attempts = p.reconcile_attempts + 1
      FROM due WHERE p.id = due.id
    RETURNING p.id, p.order_id, p.charge_key, p.reconcile_attempts)
SELECT c.id::text, c.order_id::text, c.charge_key, c.reconcile_attempts AS token,
       o.hold_id::text, o.event_id, o.fan_id, h.ticket_type, h.quantity, h.pass_jti
  FROM claimed c JOIN orders o ON o.id = c.order_id JOIN holds h ON h.id = o.hold_id
"""

# Every write of a reconciler's claim is fenced by it: see the module docstring.
_FENCE = "id = $1 AND state = 'failed' AND reconcile = 'due' AND reconcile_attempts = $2"


class Reconciler:
    """Settles payments marked ``reconcile = 'due'``; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        host: InventoryHost,
        http: httpx.AsyncClient,
        *,
        timeout_s: float = 2.0,
        lease_s: float = LEASE_S,
        base_backoff_s: float = BASE_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        rng: random.Random | None = None,
    ) -> None:
        """``http``: a client of the provider; ``timeout_s`` bounds each call to it."""
        self._pool = pool
        self._host = host
        self._provider = ProviderClient(http, timeout_s)
        self._lease_s = lease_s
        self._base = base_backoff_s
        self._cap = max_backoff_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._rng = rng or random.Random()

    async def run_once(self, batch: int = BATCH) -> ReconcileReport:
        """One pass: hand back stalled payments, then settle every payment due now."""
        recovered = await recover_stale(self._pool, self._heartbeat_timeout_s)
        outcomes: dict[str, str] = {}
        for _ in range(MAX_BATCHES):
            claimed = await self.claim(batch)
            results = await asyncio.gather(*(self.reconcile(s) for s in claimed))
            outcomes.update({s.id: r for s, r in zip(claimed, results, strict=True)})
            if len(claimed) < batch:
                break
        report = ReconcileReport(recovered=recovered, outcomes=outcomes)
        if outcomes or recovered:
            log.info(
                "payments reconciled", extra={"recovered": recovered, "outcomes": report.counts()}
            )
        return report

    async def run(self, stop: asyncio.Event, *, interval_s: float = INTERVAL_S) -> None:
        """A pass every ``interval_s`` until ``stop`` is set; outages are logged and retried."""
        while not stop.is_set():
            try:
                # Shielded: a pass cut in the middle would be safe (fenced, idempotent), but
                # the payment in hand would wait for its lease to run out.
                await asyncio.shield(self.run_once())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconciliation failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    async def claim(self, limit: int) -> list[Suspect]:
        """Claim up to ``limit`` payments due for reconciliation."""
        rows = await self._pool.fetch(_CLAIM, limit, self._lease_s)
        return [Suspect(**dict(r)) for r in rows]

    async def reconcile(self, s: Suspect) -> ReconcileOutcome:
        """Settle one claimed payment, or leave it due for later; never raises (but cancels)."""
        try:
            return await self._reconcile(s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database hiccup: the lease brings it back
            log.exception("reconciling a payment crashed", extra={"payment": s.id})
            try:
                return await self._later(s, f"internal error: {exc!r}"[:200])
            except Exception:
                return "retry"

    async def _reconcile(self, s: Suspect) -> ReconcileOutcome:
        try:
            charge = await self._provider.find_charge(s.charge_key)
        except (ProviderUnavailable, ProviderRefused) as exc:
            return await self._later(s, f"lookup failed: {exc}")
        if charge is None:
            return await self._settle(
                s, "no_charge", None, "the provider has no charge under its key"
            )
        if charge.status == "declined":
            return await self._settle(s, "no_charge", charge.id, "the charge was declined")
        if charge.refunded:
            return await self._settle(s, "refunded", charge.id, "the charge was refunded already")
        # The provider took the money: it ends as tickets or as a refund, as the inventory
        # says. Only its answer decides on a refund (it is the same for every claim of this
        # charge, so a stale claim never refunds a charge another claim completed with), never
        # the order's row (paid, but maybe with this very charge by another claim).
        try:
            verdict = await confirm_charge(
                self._host,
                self._pool,
                event_id=s.event_id,
                hold_id=s.hold_id,
                fan_id=s.fan_id,
                charge_id=charge.id,
            )
        except Unavailable as exc:
            return await self._later(s, f"inventory unavailable: {exc.code}")
        if isinstance(verdict, Paid):
            return await self._complete(s, charge.id)
        return await self._refund(s, charge.id, verdict.reason)

    async def _complete(self, s: Suspect, charge_id: str) -> ReconcileOutcome:
        """The hold is paid with this charge: the payment succeeds and the order gets tickets."""
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval(
                "SELECT status FROM orders WHERE id = $1 FOR UPDATE", s.order_id
            )
            if status == "paid":
                completed = await conn.fetchval(
                    "SELECT 1 FROM payments WHERE order_id = $1 AND state = 'succeeded'"
                    " AND provider_ref = $2",
                    s.order_id,
                    charge_id,
                )
                if completed:  # with this charge, by another claim: this one is stale
                    return "lost"
            paid_elsewhere = status == "paid"
            if not paid_elsewhere:
                done = await conn.fetchval(
                    f"UPDATE payments SET {_REVIVE}, provider_ref = $3, last_error = NULL,"
                    " reconcile = 'completed', reconciled_at = now(), reconcile_error = NULL,"
                    f" updated_at = now() WHERE {_FENCE} RETURNING id",
                    s.id,
                    s.token,
                    charge_id,
                )
                if done is None:
                    return "lost"
                tickets = await pay_order(
                    conn,
                    OrderToPay(
                        order_id=s.order_id,
                        payment_id=s.id,
                        charge_id=charge_id,
                        hold_id=s.hold_id,
                        event_id=s.event_id,
                        fan_id=s.fan_id,
                        ticket_type=s.ticket_type,
                        quantity=s.quantity,
                        pass_jti=s.pass_jti,
                    ),
                    PAYMENT_RECONCILED,
                    outcome="completed",
                    detail="the provider had charged and the hold was still valid",
                )
        if paid_elsewhere:  # another payment paid the order meanwhile: this charge goes back
            return await self._refund(s, charge_id, "order paid by another payment")
        log.info(
            "reconciled payment completed",
            extra={"payment": s.id, "order": s.order_id, "charge": charge_id, "tickets": tickets},
        )
        return "completed"

    async def _refund(self, s: Suspect, charge_id: str, reason: str) -> ReconcileOutcome:
        try:
            result, answer = await self._provider.refund(charge_id)
        except ProviderUnavailable as exc:
            return await self._later(s, f"{reason}; refund failed: {exc}")
        if result == "refused":
            log.error(
                "refund refused; needs an operator",
                extra={"payment": s.id, "charge": charge_id, "answer": answer},
            )
            return await self._settle(
                s, "refund_refused", charge_id, f"{reason}; refund refused: {answer}"
            )
        return await self._settle(s, "refunded", charge_id, reason)

    async def _settle(
        self,
        s: Suspect,
        outcome: Literal["refunded", "no_charge", "refund_refused"],
        charge_id: str | None,
        detail: str,
    ) -> ReconcileOutcome:
        """Record an outcome that leaves the payment failed, with its step in the history."""
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                "UPDATE payments SET reconcile = $3, reconciled_at = now(), reconcile_error = NULL,"
                " provider_ref = coalesce($4, provider_ref), updated_at = now()"
                f" WHERE {_FENCE} RETURNING id",
                s.id,
                s.token,
                outcome,
                charge_id,
            )
            if done is None:
                return "lost"
            await record_event(
                conn,
                s.order_id,
                PAYMENT_RECONCILED,
                payment_id=s.id,
                outcome=outcome,
                charge_id=charge_id,
                detail=detail,
            )
        log.info(
            "payment reconciled",
            extra={"payment": s.id, "order": s.order_id, "outcome": outcome, "detail": detail},
        )
        return outcome

    async def _later(self, s: Suspect, error: str) -> ReconcileOutcome:
        """Leave the payment due, after a backoff from the database's clock."""
        delay = backoff(s.token, 0.0, self._rng, base=self._base, cap=self._cap)
        done = await self._pool.fetchval(
            "UPDATE payments SET reconcile_after = now() + make_interval(secs => $3),"
            f" reconcile_error = $4 WHERE {_FENCE} RETURNING id",
            s.id,
            s.token,
            delay,
            error[:500],
        )
        log.warning(
            "payment not reconciled yet",
            extra={"payment": s.id, "error": error, "attempts": s.token, "in_s": delay},
        )
        return "retry" if done is not None else "lost"
