"""The payment worker pool: charge at the provider, confirm through the inventory, issue tickets.

A payment attempt is a ``payments`` row (see :mod:`inventory.orders`); its state machine is::

    pending ──claim──▶ processing ──▶ succeeded   (order paid, tickets issued)
       ▲                  │       └─▶ failed      (declined, refunded, gave up)
       └── retry / lease ─┘

Workers (any number, in any number of processes) claim due rows with ``FOR UPDATE SKIP
LOCKED``; claiming bumps ``attempts``, which doubles as the claim's fencing token: every later
write of that claim is ``WHERE state = 'processing' AND attempts = <claimed>``, so a worker
that stalled past its lease (the row went back to pending and someone else claimed it) can
no longer write. A ``processing`` row not touched for ``lease_s`` belonged to a dead worker and
goes back to ``pending``.

One attempt, and why it is safe to repeat any prefix of it:

1. Charge ``POST /v1/charges`` with ``Idempotency-Key: payments.charge_key``. Every retry of
   the row reuses the key, so the provider charges it at most once; a timeout or 5xx is
   retried with exponential backoff and full jitter (:func:`backoff`) up to ``max_attempts``.
2. Confirm the hold through the event's inventory actor with ``payment_ref = charge id`` and
   the idempotency key ``charge:{charge id}``: a repeat returns the first answer.
3. ``Confirmed``: one PostgreSQL transaction marks the order paid, the payment succeeded and
   issues the tickets, guarded by the order's row lock (an order already paid gets nothing
   more); then the ``on_paid`` hook frees the fan's admission slot.
4. Refused because the hold lapsed, was cancelled, or was paid by another attempt: the charge
   is refunded (idempotent per charge) and the attempt fails.

Once a charge exists the attempt never gives up on a transient error (inventory or refund
unavailable): it retries until the inventory answers for good, because a charge must end as
tickets or as a refund.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import asyncpg
import httpx
import msgspec

from inventory.hosting import InventoryHost
from inventory.ledger import (
    ALREADY_CONFIRMED,
    HOLD_CANCELLED,
    Confirm,
    Confirmed,
    Refused,
)
from inventory.orders import PAYMENTS_CHANNEL
from waitroom.core.errors import Unavailable, WaitroomError

log = logging.getLogger("waitroom.payments")

PaymentState = Literal["pending", "processing", "succeeded", "failed"]

#: The moves a payment may make; succeeded and failed are final.
TRANSITIONS: dict[PaymentState, frozenset[PaymentState]] = {
    "pending": frozenset({"processing"}),
    "processing": frozenset({"pending", "succeeded", "failed"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
}

MAX_ATTEMPTS = 5
BASE_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
LEASE_S = 30.0
#: Bytes of randomness per ticket code: 144 bits, 24 URL-safe characters.
TICKET_CODE_BYTES = 18

#: Called after an order is paid with ``(event_id, pass_jti)``: frees the fan's admission slot.
OnPaid = Callable[[str, str], Awaitable[object]]


def can_move(current: PaymentState, new: PaymentState) -> bool:
    """Whether a payment in state ``current`` may move to ``new``."""
    return new in TRANSITIONS[current]


def transition(current: PaymentState, new: PaymentState) -> str:
    """The SQL ``SET`` of moving a payment from ``current`` to ``new``.

    Every state change below is written with one of these, so a move :data:`TRANSITIONS`
    does not allow cannot be written at all (it fails at import); the ``WHERE`` of each
    statement pins ``current``.
    """
    if not can_move(current, new):
        raise ValueError(f"a payment cannot move from {current} to {new}")
    return f"state = '{new}'"


_START = transition("pending", "processing")
_RETRY = transition("processing", "pending")
_SUCCEED = transition("processing", "succeeded")
_FAIL = transition("processing", "failed")


# --- retry schedule (pure) ---------------------------------------------------------------


def backoff_ceiling(
    attempt: int, *, base: float = BASE_BACKOFF_S, cap: float = MAX_BACKOFF_S
) -> float:
    """The longest wait after failed attempt number ``attempt`` (1-based): ``base * 2^(n-1)``, capped."""
    # The exponent is clamped so a huge attempt count cannot overflow the float.
    return min(cap, base * 2.0 ** min(max(attempt, 1) - 1, 64))


def backoff(
    attempt: int,
    now: float,
    rng: random.Random,
    *,
    base: float = BASE_BACKOFF_S,
    cap: float = MAX_BACKOFF_S,
) -> float:
    """When to try again after failed attempt ``attempt``: ``now`` plus a full-jitter wait.

    Full jitter (a uniform draw in ``[0, ceiling)``) rather than a fixed exponential wait:
    when the provider hiccups, hundreds of payments fail together, and a fixed schedule would
    bring them all back together.
    """
    return now + rng.random() * backoff_ceiling(attempt, base=base, cap=cap)


class Retry(msgspec.Struct, frozen=True):
    """Try again at ``at`` (unix seconds)."""

    at: float


class GiveUp(msgspec.Struct, frozen=True):
    """Stop: the attempt fails."""


def after_transient_error(
    attempts: int,
    now: float,
    rng: random.Random,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    must_finish: bool = False,
    base: float = BASE_BACKOFF_S,
    cap: float = MAX_BACKOFF_S,
) -> Retry | GiveUp:
    """What to do after a timeout, 5xx or outage on claim number ``attempts``.

    ``must_finish``: money has moved (a charge exists), so the attempt retries however long
    it takes, until it ends as tickets or as a refund.
    """
    if must_finish or attempts < max_attempts:
        return Retry(backoff(attempts, now, rng, base=base, cap=cap))
    return GiveUp()


# --- the adapter -------------------------------------------------------------------------


class Claimed(msgspec.Struct, frozen=True):
    """A payment attempt this worker claimed, with what it needs of its order and hold."""

    id: str
    order_id: str
    charge_key: str
    method: str
    #: Claims so far including this one: the claim's fencing token.
    attempts: int
    amount_minor: int
    currency: str
    order_status: str
    hold_id: str
    event_id: str
    fan_id: str
    ticket_type: str
    quantity: int
    pass_jti: str | None
    hold_status: str
    #: The hold was past its deadline when claimed.
    lapsed: bool


class ProviderCharge(msgspec.Struct, frozen=True):
    """The part of the provider's charge the worker reads."""

    id: str
    status: Literal["succeeded", "declined"]


#: How one claim of an attempt ended: ``retry`` went back to pending; ``refunded`` failed
#: after its charge was given back; ``lost`` found the row claimed by someone else (its lease
#: lapsed) and wrote nothing.
Outcome = Literal["succeeded", "declined", "failed", "refunded", "retry", "lost"]


class _Transient(Exception):
    """Worth retrying: the provider timed out, answered 5xx or 429, or was unreachable."""


class _Permanent(Exception):
    """Not worth retrying: the provider refused the request itself (4xx)."""


_CLAIM = f"""
WITH claimed AS (
    UPDATE payments SET {_START}, attempts = attempts + 1, updated_at = now()
     WHERE id IN (SELECT id FROM payments
                   WHERE state = 'pending' AND next_attempt_at <= now()
                   ORDER BY next_attempt_at LIMIT $1
                   FOR UPDATE SKIP LOCKED)
    RETURNING id, order_id, charge_key, method, attempts)
SELECT c.id::text, c.order_id::text, c.charge_key, c.method, c.attempts,
       o.amount_minor, o.currency, o.status AS order_status, o.hold_id::text, o.event_id,
       o.fan_id, h.ticket_type, h.quantity, h.pass_jti, h.status AS hold_status,
       h.expires_at <= now() AS lapsed
  FROM claimed c JOIN orders o ON o.id = c.order_id JOIN holds h ON h.id = o.hold_id
"""

# Every write of a claim is fenced by (state, attempts): see the module docstring.
_FENCE = "id = $1 AND state = 'processing' AND attempts = $2"


class PaymentPool:
    """Claims due payment attempts and runs at most ``concurrency`` of them at once."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        host: InventoryHost,
        http: httpx.AsyncClient,
        *,
        concurrency: int = 32,
        timeout_s: float = 2.0,
        max_attempts: int = MAX_ATTEMPTS,
        base_backoff_s: float = BASE_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        lease_s: float = LEASE_S,
        poll_s: float = 0.5,
        drain_s: float = 10.0,
        on_paid: OnPaid | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``http`` is a client whose ``base_url`` is the provider; ``timeout_s`` bounds each call.

        ``drain_s``: at shutdown, how long in-flight attempts may take to finish before they
        are cancelled and handed back to ``pending``.
        """
        self._pool = pool
        self._host = host
        self._http = http
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._base = base_backoff_s
        self._cap = max_backoff_s
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._drain_s = drain_s
        self._on_paid = on_paid
        self._rng = rng or random.Random()
        self._inflight: dict[asyncio.Task[Outcome], Claimed] = {}
        self._wake = asyncio.Event()

    # --- driving -----------------------------------------------------------------------------

    async def run_once(self, limit: int | None = None) -> dict[str, Outcome]:
        """Claim the attempts due now (at most ``limit``), run them all, return their outcomes."""
        claimed = await self.claim(limit or self._concurrency)
        outcomes = await asyncio.gather(*(self.process(p) for p in claimed))
        return {p.id: o for p, o in zip(claimed, outcomes, strict=True)}

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain (see ``drain_s``); never raises on outages.

        Only as many attempts are claimed as there are free slots, rather than claiming a
        batch and queueing it behind a semaphore: a claimed row's lease is ticking, and rows
        left unclaimed stay available to other workers.
        """
        listener = await self._listen()
        stopper = asyncio.create_task(self._wake_when(stop))
        last_recovery = 0.0
        failures = 0
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    if time.monotonic() - last_recovery >= self._lease_s / 3:
                        await self.recover_stale()
                        last_recovery = time.monotonic()
                    free = self._concurrency - len(self._inflight)
                    claimed = await self.claim(free) if free > 0 else []
                    failures = 0
                except Exception as exc:  # database down: keep trying, never die
                    failures += 1
                    log.warning("claiming payments failed", extra={"error": repr(exc)})
                    claimed = []
                    await self._sleep(stop, min(5.0, 0.2 * 2**failures))
                    continue
                for payment in claimed:
                    task = asyncio.create_task(self.process(payment), name=f"payment:{payment.id}")
                    self._inflight[task] = payment
                    task.add_done_callback(self._finished)
                if not claimed or len(self._inflight) >= self._concurrency:
                    await self._sleep(stop, self._poll_s)
        finally:
            stopper.cancel()
            await self._drain()
            if listener is not None:
                await self._unlisten(listener)

    async def claim(self, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` due attempts (``pending`` → ``processing``, attempts + 1)."""
        rows = await self._pool.fetch(_CLAIM, limit)
        return [Claimed(**{**dict(r), "currency": r["currency"].strip()}) for r in rows]

    async def recover_stale(self) -> int:
        """Hand attempts whose worker died (``processing`` past the lease) back; return how many."""
        rows = await self._pool.fetch(
            f"UPDATE payments SET {_RETRY}, next_attempt_at = now(),"
            " last_error = 'worker lease expired', updated_at = now()"
            " WHERE state = 'processing' AND updated_at < now() - make_interval(secs => $1)"
            " RETURNING id",
            self._lease_s,
        )
        if rows:
            log.warning("recovered payments of a dead worker", extra={"count": len(rows)})
        return len(rows)

    def _finished(self, task: asyncio.Task[Outcome]) -> None:
        self._inflight.pop(task, None)
        self._wake.set()

    async def _wake_when(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _drain(self) -> None:
        """Let in-flight attempts finish for ``drain_s``; hand the rest back to ``pending``."""
        if not self._inflight:
            return
        tasks = dict(self._inflight)
        log.info("draining payments", extra={"in_flight": len(tasks)})
        _, late = await asyncio.wait(tasks, timeout=self._drain_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for task in late:
            payment = tasks[task]
            try:
                # Safe at any point of the attempt: the charge key and the confirm's
                # idempotency key make the next claim pick up exactly where this one stopped.
                await self._pool.execute(
                    f"UPDATE payments SET {_RETRY}, next_attempt_at = now(),"
                    f" last_error = 'handed back at shutdown', updated_at = now() WHERE {_FENCE}",
                    payment.id,
                    payment.attempts,
                )
            except Exception as exc:  # the lease recovers it later
                log.warning(
                    "could not hand a payment back",
                    extra={"payment": payment.id, "error": repr(exc)},
                )
        if late:
            log.info("handed payments back", extra={"count": len(late)})

    async def _listen(self) -> Any:
        """Wake on new payments announced by :func:`inventory.orders.start_payment` (best effort)."""
        try:
            conn = await self._pool.acquire()
            await conn.add_listener(PAYMENTS_CHANNEL, self._notified)
        except Exception as exc:  # polling still finds the work
            log.warning("cannot listen for new payments", extra={"error": repr(exc)})
            return None
        return conn

    async def _unlisten(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.remove_listener(PAYMENTS_CHANNEL, self._notified)
        with contextlib.suppress(Exception):
            await self._pool.release(conn)

    def _notified(self, *_: object) -> None:
        self._wake.set()

    # --- one attempt ---------------------------------------------------------------------------

    async def process(self, payment: Claimed) -> Outcome:
        """Run one claimed attempt to its outcome for this claim; never raises (but cancels)."""
        try:
            return await self._attempt(payment)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database hiccup mid-attempt: retry it, lose nothing
            log.exception("payment attempt crashed", extra={"payment": payment.id})
            try:
                return await self._retry(
                    payment, f"internal error: {exc!r}"[:200], must_finish=True
                )
            except Exception:  # the lease recovers it
                return "lost"

    async def _attempt(self, p: Claimed) -> Outcome:
        if p.attempts == 1:
            # Nothing was sent to the provider under this key yet, so refusing now charges
            # nobody; on later claims the key may already have charged, so we go on and let
            # the inventory's answer decide between tickets and a refund.
            if p.order_status == "paid" or p.hold_status == "paid":
                return await self._fail(p, "order already paid", fail_order=False)
            if p.hold_status == "cancelled":
                return await self._fail(p, "hold cancelled", fail_order=True)
            if p.hold_status == "expired" or p.lapsed:
                return await self._fail(p, "hold expired", fail_order=True)
        try:
            charge = await self._charge(p)
        except _Transient as exc:
            return await self._retry(p, str(exc), must_finish=False)
        except _Permanent as exc:
            return await self._fail(p, str(exc), fail_order=True)
        if charge.status == "declined":
            # The hold is left alone: the fan may try again (a new attempt) until its deadline.
            return await self._fail(p, "declined", fail_order=True, outcome="declined")
        return await self._confirm(p, charge.id)

    async def _confirm(self, p: Claimed, charge_id: str) -> Outcome:
        command = Confirm(p.hold_id, p.fan_id, charge_id, f"charge:{charge_id}")
        try:
            result = await self._host.ask(p.event_id, command)
        except Unavailable as exc:
            return await self._retry(p, f"inventory unavailable: {exc.code}", must_finish=True)
        except WaitroomError as exc:  # e.g. the event is gone: it will never confirm
            return await self._refund_and_fail(p, charge_id, exc.code, fail_order=True)
        if isinstance(result, Confirmed):
            return await self._succeed(p, charge_id)
        if isinstance(result, Refused):
            if result.code == ALREADY_CONFIRMED:
                paid_by = await self._pool.fetchval(
                    "SELECT payment_ref FROM holds WHERE id = $1", p.hold_id
                )
                if paid_by == charge_id:  # ours, answered again: finish the job
                    return await self._succeed(p, charge_id)
                return await self._refund_and_fail(
                    p, charge_id, "order already paid", fail_order=False
                )
            reason = "hold cancelled" if result.code == HOLD_CANCELLED else "hold expired"
            if result.code not in (HOLD_CANCELLED, "hold_expired", "hold_not_found"):
                reason = result.code
            return await self._refund_and_fail(p, charge_id, reason, fail_order=True)
        raise TypeError(f"unexpected answer to Confirm: {result!r}")

    async def _charge(self, p: Claimed) -> ProviderCharge:
        response = await self._call(
            "/v1/charges",
            {
                "amount_minor": p.amount_minor,
                "currency": p.currency,
                "method": p.method,
                "reference": p.order_id,
            },
            p.charge_key,
        )
        if response.status_code not in (200, 201):
            raise _Permanent(f"provider refused the charge: {_describe(response)}")
        try:
            return msgspec.json.decode(response.content, type=ProviderCharge)
        except msgspec.DecodeError:
            # Odd, but the key makes asking again safe.
            raise _Transient("provider answered an unreadable charge") from None

    async def _refund_and_fail(
        self, p: Claimed, charge_id: str, reason: str, *, fail_order: bool
    ) -> Outcome:
        try:
            response = await self._call(
                "/v1/refunds", {"charge_id": charge_id}, f"refund:{charge_id}"
            )
        except _Transient as exc:
            return await self._retry(p, f"{reason}; refund pending: {exc}", must_finish=True)
        # 409: the charge was declined after all, nothing to give back.
        if response.status_code not in (200, 201, 409):
            log.error(
                "refund refused; needs an operator",
                extra={"payment": p.id, "charge": charge_id, "answer": _describe(response)},
            )
            return await self._fail(
                p, f"{reason}; refund refused: {_describe(response)}", fail_order=fail_order
            )
        return await self._fail(p, f"{reason}; refunded", fail_order=fail_order, outcome="refunded")

    async def _call(self, path: str, body: dict[str, Any], key: str) -> httpx.Response:
        """POST to the provider within one attempt's timeout; 5xx and 429 are transient."""
        try:
            # A total bound, not httpx's per-read one: a provider that trickles bytes must
            # not hold a worker slot past the attempt's budget either.
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.post(
                    path, json=body, headers={"Idempotency-Key": key}, timeout=self._timeout_s
                )
        except (TimeoutError, httpx.TimeoutException):
            raise _Transient(f"provider timed out after {self._timeout_s:g}s") from None
        except httpx.TransportError as exc:
            raise _Transient(f"provider unreachable: {type(exc).__name__}") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise _Transient(f"provider answered {response.status_code}")
        return response

    # --- writing outcomes ----------------------------------------------------------------------

    async def _succeed(self, p: Claimed, charge_id: str) -> Outcome:
        """Order paid, payment succeeded, tickets issued: all or nothing, at most once per order."""
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval(
                "SELECT status FROM orders WHERE id = $1 FOR UPDATE", p.order_id
            )
            if status == "paid":
                # Someone finished this order already; issuing again would double the tickets.
                done = await conn.fetchval(
                    f"UPDATE payments SET {_SUCCEED}, provider_ref = $3,"
                    f" last_error = NULL, updated_at = now() WHERE {_FENCE}"
                    " AND NOT EXISTS (SELECT 1 FROM payments q"
                    "                  WHERE q.order_id = payments.order_id AND q.state = 'succeeded')"
                    " RETURNING id",
                    p.id,
                    p.attempts,
                    charge_id,
                )
                if done is not None:
                    return "succeeded"
                failed = await conn.fetchval(
                    f"UPDATE payments SET {_FAIL}, provider_ref = $3,"
                    f" last_error = 'order already paid', updated_at = now() WHERE {_FENCE}"
                    " RETURNING id",
                    p.id,
                    p.attempts,
                    charge_id,
                )
                return "failed" if failed is not None else "lost"
            claimed = await conn.fetchval(
                f"UPDATE payments SET {_SUCCEED}, provider_ref = $3, last_error = NULL,"
                f" updated_at = now() WHERE {_FENCE} RETURNING id",
                p.id,
                p.attempts,
                charge_id,
            )
            if claimed is None:
                # Our lease lapsed and another claim owns the row now; it reaches the same
                # outcome through the same keys.
                return "lost"
            await conn.execute(
                "UPDATE orders SET status = 'paid', paid_at = now() WHERE id = $1", p.order_id
            )
            codes = [secrets.token_urlsafe(TICKET_CODE_BYTES) for _ in range(p.quantity)]
            await conn.execute(
                "INSERT INTO tickets (id, order_id, event_id, ticket_type, fan_id, code)"
                " SELECT unnest($1::uuid[]), $2, $3, $4, $5, unnest($6::text[])",
                [uuid.uuid4() for _ in codes],
                p.order_id,
                p.event_id,
                p.ticket_type,
                p.fan_id,
                codes,
            )
            await conn.execute(
                "INSERT INTO outbox (event_id, topic, payload) VALUES ($1, 'tickets.issued', $2)",
                p.event_id,
                msgspec.json.encode(
                    {
                        "order_id": p.order_id,
                        "hold_id": p.hold_id,
                        "fan_id": p.fan_id,
                        "ticket_type": p.ticket_type,
                        "tickets": len(codes),
                    }
                ).decode(),
            )
        log.info("order paid", extra={"order": p.order_id, "payment": p.id, "tickets": len(codes)})
        if self._on_paid is not None and p.pass_jti:
            try:
                await self._on_paid(p.event_id, p.pass_jti)
            except Exception as exc:  # the pass stops counting when it expires anyway
                log.warning("on_paid hook failed", extra={"order": p.order_id, "error": repr(exc)})
        return "succeeded"

    async def _fail(
        self, p: Claimed, reason: str, *, fail_order: bool, outcome: Outcome = "failed"
    ) -> Outcome:
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                f"UPDATE payments SET {_FAIL}, last_error = $3, updated_at = now()"
                f" WHERE {_FENCE} RETURNING id",
                p.id,
                p.attempts,
                reason,
            )
            if done is None:
                return "lost"
            if fail_order:
                # Only an order still waiting fails: never one another attempt has paid.
                await conn.execute(
                    "UPDATE orders SET status = 'failed'"
                    " WHERE id = $1 AND status = 'awaiting_payment'",
                    p.order_id,
                )
        log.info("payment failed", extra={"payment": p.id, "order": p.order_id, "reason": reason})
        return outcome

    async def _retry(self, p: Claimed, error: str, *, must_finish: bool) -> Outcome:
        now = time.time()
        step = after_transient_error(
            p.attempts,
            now,
            self._rng,
            max_attempts=self._max_attempts,
            must_finish=must_finish,
            base=self._base,
            cap=self._cap,
        )
        if isinstance(step, GiveUp):
            return await self._fail(
                p, f"gave up after {p.attempts} attempts: {error}", fail_order=True
            )
        # As a delay from the database's clock: claims compare next_attempt_at with its now().
        done = await self._pool.fetchval(
            f"UPDATE payments SET {_RETRY}, last_error = $3, updated_at = now(),"
            f" next_attempt_at = now() + make_interval(secs => $4) WHERE {_FENCE} RETURNING id",
            p.id,
            p.attempts,
            error[:500],
            step.at - now,
        )
        log.info(
            "payment will be retried",
            extra={"payment": p.id, "attempts": p.attempts, "error": error, "in_s": step.at - now},
        )
        return "retry" if done is not None else "lost"


def _describe(response: httpx.Response) -> str:
    try:
        code = response.json()["error"]["code"]
    except Exception:
        code = None
    return f"{response.status_code} {code}" if code else str(response.status_code)
