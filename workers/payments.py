"""The payment worker pool: charge at the provider, confirm through the inventory, issue tickets.

A payment attempt is a ``payments`` row (see :mod:`inventory.orders`); its state machine is::

    pending ──claim──▶ processing ──▶ succeeded   (order paid, tickets issued)
       ▲                  │       └─▶ failed ──reconciled──▶ succeeded
       └─ retry, hand-back,┘
          heartbeat lost

Workers (any number, in any number of processes) claim due rows with ``FOR UPDATE SKIP
LOCKED``; claiming bumps ``attempts``, which doubles as the claim's fencing token: every later
write of that claim is ``WHERE state = 'processing' AND attempts = <claimed>``, so a worker
that stalled (its row went back to pending and someone else claimed it) can no longer write.

Heartbeats and takeover: while a pool runs attempts, one task of the pool refreshes the
``updated_at`` of all its claims every ``heartbeat_timeout_s / 4`` (one statement for all of
them, fenced by ``attempts`` like every other write, so it can never revive a claim that was
taken over), however long a provider call or an inventory retry takes. A ``processing`` row
not refreshed for ``heartbeat_timeout_s`` (``WAITROOM_PAYMENT_HEARTBEAT_TIMEOUT_S``, 4 s)
belonged to a worker that died, hangs, or lost PostgreSQL: :meth:`PaymentPool.recover_stale`,
run by every pool once per heartbeat interval, hands it back to ``pending``, due now, and the
next claim takes it over within a few seconds. A stalled worker that comes back is fenced off;
repeating its steps is safe (below), so a takeover of a worker that was merely slow costs a
repeated, idempotent request and nothing else.

One attempt, and why it is safe to repeat any prefix of it:

1. Charge ``POST /v1/charges`` with ``Idempotency-Key: payments.charge_key``. Every retry of
   the row reuses the key, so the provider charges it at most once; a timeout or 5xx is
   retried with exponential backoff and full jitter (:func:`backoff`) up to ``max_attempts``.
2. Confirm the hold through the event's inventory actor with ``payment_ref = charge id`` and
   the idempotency key ``charge:{charge id}``: a repeat returns the first answer.
3. ``Confirmed``: one PostgreSQL transaction (:func:`pay_order`) marks the order paid, the
   payment succeeded, issues the tickets, and writes the outbox message ``tickets.issued``
   and the task ``pass.spent``, guarded by the order's row lock (an order already paid gets
   nothing more). The outbox consumer (:mod:`workers.outbox`) then marks the pass spent and
   frees its admission slot in Redis, retrying until Redis answers: nothing depends on Redis
   being up at the moment of the commit, and nothing is dropped if it is not.
4. Refused because the hold lapsed, was cancelled, or was paid by another attempt: the charge
   is refunded (idempotent per charge) and the attempt fails.

Once a charge exists the attempt never gives up on a transient error (inventory or refund
unavailable): it retries until the inventory answers for good, because a charge must end as
tickets or as a refund.

What one attempt cannot know: an attempt that gives up after transient errors of the charge
itself (every request timed out, or answered 5xx) does not know whether the provider charged;
a charge may have gone through and only its answer been lost. It fails with ``reconcile =
'due'`` (after ``reconcile_delay_s``, when no request under its key can still be in flight),
and :mod:`workers.reconcile` asks the provider for the charge by its key and completes the
order or refunds the charge: the ``failed`` to ``succeeded`` move above is that completion.
Every step lands in the order's history (``order_events``, :func:`inventory.orders.record_event`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from typing import Any, Literal

import asyncpg
import httpx
import msgspec
from prometheus_client import Counter, Histogram

from inventory.hosting import InventoryHost
from inventory.ledger import (
    ALREADY_CONFIRMED,
    HOLD_CANCELLED,
    Confirm,
    Confirmed,
    Refused,
)
from inventory.orders import (
    PAYMENT_FAILED,
    PAYMENT_SUCCEEDED,
    PAYMENTS_CHANNEL,
    RESERVATIONS_CHANNEL,
    event_detail,
    event_insert,
    record_event,
)
from inventory.store import Conn
from waitroom.core import randomness, tracing
from waitroom.core.db import HINT_AFTER_COMMIT, hint
from waitroom.core.errors import Unavailable, WaitroomError
from workers.mailer import create_notification, notification_insert
from workers.notifications import ORDER_CONFIRMED, dedup_key
from workers.notifications import PAYMENT_FAILED as PAYMENT_FAILED_EMAIL
from workers.outbox import PASS_SPENT, PassSpent

log = logging.getLogger("waitroom.payments")

PaymentState = Literal["pending", "processing", "succeeded", "failed"]

#: The moves a payment may make; succeeded is final, and failed only moves on when the
#: reconciler finds that the provider did charge and completes the order with that charge.
TRANSITIONS: dict[PaymentState, frozenset[PaymentState]] = {
    "pending": frozenset({"processing"}),
    "processing": frozenset({"pending", "succeeded", "failed"}),
    "succeeded": frozenset(),
    "failed": frozenset({"succeeded"}),
}

MAX_ATTEMPTS = 5
BASE_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: A ``processing`` row not heartbeated for this long is taken over (the setting's default).
HEARTBEAT_TIMEOUT_S = 4.0
#: Heartbeats per timeout: a claim survives this many missed heartbeats but one.
HEARTBEATS_PER_TIMEOUT = 4
#: How long after an ambiguous failure the reconciler may ask the provider (the default of
#: ``WAITROOM_PAYMENT_RECONCILE_DELAY_S``).
RECONCILE_DELAY_S = 60.0
#: Bytes of randomness per ticket code: 144 bits, 24 URL-safe characters.
TICKET_CODE_BYTES = 18


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


# --- metrics -------------------------------------------------------------------------------

PAYMENT_ATTEMPTS = Counter(
    "waitroom_payment_attempts_total",
    "Payment attempts this process finished, by outcome: succeeded, declined (the card),"
    " failed (the hold lapsed, a refusal, a charge in doubt), refunded, retry (backing off),"
    " lost (the process could not record the outcome; another takes the payment over).",
    ["outcome"],
)
PROVIDER_LATENCY = Histogram(
    "waitroom_payment_provider_request_duration_seconds",
    "Requests to the payment provider by operation (charge, lookup, refund), answered or not.",
    ["operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
PROVIDER_ERRORS = Counter(
    "waitroom_payment_provider_errors_total",
    "Requests to the payment provider that failed in a way worth retrying, by operation and"
    " kind (timeout, unreachable, server_error for a 5xx, throttled for a 429, unreadable).",
    ["operation", "kind"],
)
_OPERATIONS = {
    ("POST", "/v1/charges"): "charge",
    ("GET", "/v1/charges"): "lookup",
    ("POST", "/v1/refunds"): "refund",
}


def _operation(method: str, path: str) -> str:
    return _OPERATIONS.get((method, path), "other")


# Every child made at zero: rates over them read 0, not "no data", before the first one.
for _outcome in ("succeeded", "declined", "failed", "refunded", "retry", "lost"):
    PAYMENT_ATTEMPTS.labels(_outcome)
for _op in _OPERATIONS.values():
    PROVIDER_LATENCY.labels(_op)
    for _kind in ("timeout", "unreachable", "server_error", "throttled", "unreadable"):
        PROVIDER_ERRORS.labels(_op, _kind)


# --- the provider --------------------------------------------------------------------------


class ProviderCharge(msgspec.Struct, frozen=True):
    """The part of the provider's charge the workers read."""

    id: str
    status: Literal["succeeded", "declined"]
    refunded: bool = False


class ProviderUnavailable(Exception):
    """Worth retrying: the provider timed out, answered 5xx or 429, or was unreachable."""


class ProviderRefused(Exception):
    """Not worth retrying: the provider refused the request itself (4xx)."""


#: How a refund request ended: given back (or nothing was taken: a declined charge), or
#: refused for good (a 4xx; an operator has to look).
RefundResult = Literal["refunded", "refused"]


class ProviderClient:
    """The provider's API as the workers use it; each call is bounded by ``timeout_s`` in all.

    ``http`` is a client whose ``base_url`` is the provider.
    """

    def __init__(self, http: httpx.AsyncClient, timeout_s: float) -> None:
        self.http = http
        self.timeout_s = timeout_s

    async def charge(self, p: Claimed) -> ProviderCharge:
        """``POST /v1/charges`` under the attempt's charge key (charges at most once)."""
        response = await self._send(
            "POST",
            "/v1/charges",
            json={
                "amount_minor": p.amount_minor,
                "currency": p.currency,
                "method": p.method,
                "reference": p.order_id,
            },
            headers={"Idempotency-Key": p.charge_key},
        )
        if response.status_code not in (200, 201):
            raise ProviderRefused(f"provider refused the charge: {describe(response)}")
        return _charge_of(response)

    async def find_charge(self, charge_key: str) -> ProviderCharge | None:
        """The charge made under ``charge_key``, or None if no request under it charged."""
        response = await self._send("GET", "/v1/charges", params={"idempotency_key": charge_key})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ProviderRefused(f"provider refused the lookup: {describe(response)}")
        return _charge_of(response)

    async def refund(self, charge_id: str) -> tuple[RefundResult, str]:
        """Give a whole charge back (at most once per charge); ``(result, provider's answer)``."""
        response = await self._send(
            "POST",
            "/v1/refunds",
            json={"charge_id": charge_id},
            headers={"Idempotency-Key": f"refund:{charge_id}"},
        )
        # 409: the charge was declined after all, nothing to give back.
        if response.status_code in (200, 201, 409):
            return "refunded", describe(response)
        return "refused", describe(response)

    async def _send(self, method: str, path: str, **options: Any) -> httpx.Response:
        """One request within the timeout; 5xx and 429 are transient."""
        operation = _operation(method, path)
        started = time.perf_counter()
        try:
            # A total bound, not httpx's per-read one: a provider that trickles bytes must
            # not hold a worker slot past the attempt's budget either.
            async with asyncio.timeout(self.timeout_s):
                response = await self.http.request(method, path, timeout=self.timeout_s, **options)
        except (TimeoutError, httpx.TimeoutException):
            PROVIDER_ERRORS.labels(operation, "timeout").inc()
            raise ProviderUnavailable(f"provider timed out after {self.timeout_s:g}s") from None
        except httpx.TransportError as exc:
            PROVIDER_ERRORS.labels(operation, "unreachable").inc()
            raise ProviderUnavailable(f"provider unreachable: {type(exc).__name__}") from None
        finally:
            PROVIDER_LATENCY.labels(operation).observe(time.perf_counter() - started)
        if response.status_code >= 500 or response.status_code == 429:
            kind = "throttled" if response.status_code == 429 else "server_error"
            PROVIDER_ERRORS.labels(operation, kind).inc()
            raise ProviderUnavailable(f"provider answered {response.status_code}")
        return response


def _charge_of(response: httpx.Response) -> ProviderCharge:
    try:
        return msgspec.json.decode(response.content, type=ProviderCharge)
    except msgspec.DecodeError:
        # Odd, but every request of the workers is safe to repeat.
        request = response.request
        PROVIDER_ERRORS.labels(_operation(request.method, request.url.path), "unreadable").inc()
        raise ProviderUnavailable("provider answered an unreadable charge") from None


def describe(response: httpx.Response) -> str:
    """``"409 charge_declined"``: the status and the error code of a provider's answer."""
    try:
        code = response.json()["error"]["code"]
    except Exception:
        code = None
    return f"{response.status_code} {code}" if code else str(response.status_code)


# --- the inventory's verdict on a charge, and paying an order ---------------------------------


class Paid(msgspec.Struct, frozen=True):
    """The hold is paid with this charge: the order gets its tickets."""


class GiveBack(msgspec.Struct, frozen=True):
    """The hold will never be paid with this charge: refund it. ``fail_order``: the order
    fails too (not when another charge paid it)."""

    reason: str
    fail_order: bool


async def confirm_charge(
    host: InventoryHost,
    pool: asyncpg.Pool[Any],
    *,
    event_id: str,
    hold_id: str,
    fan_id: str,
    charge_id: str,
) -> Paid | GiveBack:
    """Confirm the hold with ``charge_id`` through the event's actor; what to do with the charge.

    Idempotent (the confirm's key is ``charge:{charge_id}``, and a hold already paid with
    this very charge is :class:`Paid` again). Raises :class:`~waitroom.core.errors.Unavailable`
    while the inventory cannot answer: retry, the charge must end as tickets or as a refund.
    """
    command = Confirm(hold_id, fan_id, charge_id, f"charge:{charge_id}")
    try:
        result = await host.ask(event_id, command)
    except Unavailable:
        raise
    except WaitroomError as exc:  # e.g. the event is gone: it will never confirm
        return GiveBack(exc.code, fail_order=True)
    if isinstance(result, Confirmed):
        return Paid()
    if isinstance(result, Refused):
        if result.code == ALREADY_CONFIRMED:
            paid_by = await pool.fetchval("SELECT payment_ref FROM holds WHERE id = $1", hold_id)
            if paid_by == charge_id:  # ours, answered again: finish the job
                return Paid()
            return GiveBack("order already paid", fail_order=False)
        reason = "hold cancelled" if result.code == HOLD_CANCELLED else "hold expired"
        if result.code not in (HOLD_CANCELLED, "hold_expired", "hold_not_found"):
            reason = result.code
        return GiveBack(reason, fail_order=True)
    raise TypeError(f"unexpected answer to Confirm: {result!r}")


class OrderToPay(msgspec.Struct, frozen=True):
    """What :func:`pay_order` needs of an order, its hold and the payment that pays it."""

    order_id: str
    payment_id: str
    charge_id: str
    hold_id: str
    event_id: str
    fan_id: str
    ticket_type: str
    quantity: int
    pass_jti: str | None


#: The paid order in one statement (one round trip instead of eight, inside the caller's
#: transaction): the order paid, its tickets with their seats, the ``tickets.issued`` message,
#: the ``pass.spent`` task (when the hold had a pass), the history step and the buyer's
#: e-mail. A seated hold's tickets carry its seats, one each in order (schema 17); standing
#: ones, or a hold whose seats do not match its quantity, NULL.
_PAY_ORDER = f"""
WITH paid AS (
    UPDATE orders SET status = 'paid', paid_at = now() WHERE id = $1::uuid
), seats AS (
    SELECT array_agg(seat_id ORDER BY position) AS ids FROM seat_holds WHERE hold_id = $2::uuid
), issued AS (
    INSERT INTO tickets (id, order_id, event_id, ticket_type, fan_id, code, seat_id)
    SELECT t.id, $1::uuid, $3, $4, $5, t.code,
           CASE WHEN cardinality(seats.ids) = cardinality($7::text[]) THEN seats.ids[t.n] END
      FROM seats, unnest($6::uuid[], $7::text[]) WITH ORDINALITY AS t(id, code, n)
    RETURNING 1
), announced AS (
    INSERT INTO outbox (event_id, topic, payload) VALUES ($3, 'tickets.issued', $8::json)
), spent AS (
    INSERT INTO outbox (event_id, topic, payload, handle_after)
    SELECT $3, $9, $10::json, now() WHERE $10::json IS NOT NULL
), history AS (
    {event_insert(11)}
), mail AS (
    {notification_insert(15)}
)
SELECT count(*) FROM issued
"""


async def pay_order(
    conn: Conn, o: OrderToPay, kind: str = PAYMENT_SUCCEEDED, **history: Any
) -> int:
    """Order paid, tickets issued, outbox messages and history; return the tickets issued.

    Runs inside the caller's transaction, which holds the order's row lock, has checked it
    is not paid yet and has just moved the payment to ``succeeded`` (fenced): so at most once
    per order. The ``pass.spent`` task is written here, in the same transaction: the outbox
    consumer spends the pass in Redis afterwards, however long Redis takes to answer.
    One statement (:data:`_PAY_ORDER`): each round trip of a transaction holding the order's
    row waits for a turn of the payment workers' event loop.
    """
    # Never beginning with "-": a code is typed into the CLI (waitroom checkin CODE).
    codes = [randomness.token_urlsafe(TICKET_CODE_BYTES) for _ in range(o.quantity)]
    issued: int = await conn.fetchval(
        _PAY_ORDER,
        o.order_id,
        o.hold_id,
        o.event_id,
        o.ticket_type,
        o.fan_id,
        [uuid.uuid4() for _ in codes],
        codes,
        msgspec.json.encode(
            {
                "order_id": o.order_id,
                "hold_id": o.hold_id,
                "fan_id": o.fan_id,
                "ticket_type": o.ticket_type,
                "tickets": len(codes),
            }
        ).decode(),
        PASS_SPENT,
        msgspec.json.encode(PassSpent(o.order_id, o.fan_id, o.pass_jti)).decode()
        if o.pass_jti
        else None,
        o.order_id,
        o.payment_id,
        kind,
        event_detail(charge_id=o.charge_id, tickets=len(codes), **history),
        # The buyer's confirmation e-mail (with the tickets), created with the payment or not at all.
        dedup_key(ORDER_CONFIRMED, o.order_id),
        ORDER_CONFIRMED,
        o.order_id,
        "{}",
    )
    return issued


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
    #: The W3C traceparent of the request that asked for this payment (tracing on), or None.
    traceparent: str | None = None

    def to_pay(self, charge_id: str) -> OrderToPay:
        return OrderToPay(
            order_id=self.order_id,
            payment_id=self.id,
            charge_id=charge_id,
            hold_id=self.hold_id,
            event_id=self.event_id,
            fan_id=self.fan_id,
            ticket_type=self.ticket_type,
            quantity=self.quantity,
            pass_jti=self.pass_jti,
        )


#: How one claim of an attempt ended: ``retry`` went back to pending; ``refunded`` failed
#: after its charge was given back; ``lost`` found the row claimed by someone else (its
#: heartbeat lapsed) and wrote nothing.
Outcome = Literal["succeeded", "declined", "failed", "refunded", "retry", "lost"]


_CLAIM = f"""
WITH claimed AS (
    UPDATE payments SET {_START}, attempts = attempts + 1, updated_at = now()
     WHERE id IN (SELECT id FROM payments
                   WHERE state = 'pending' AND next_attempt_at <= now()
                   ORDER BY next_attempt_at LIMIT $1
                   FOR UPDATE SKIP LOCKED)
    RETURNING id, order_id, charge_key, method, attempts, traceparent)
SELECT c.id::text, c.order_id::text, c.charge_key, c.method, c.attempts, c.traceparent,
       o.amount_minor, o.currency, o.status AS order_status, o.hold_id::text, o.event_id,
       o.fan_id, h.ticket_type, h.quantity, h.pass_jti, h.status AS hold_status,
       h.expires_at <= now() AS lapsed
  FROM claimed c JOIN orders o ON o.id = c.order_id JOIN holds h ON h.id = o.hold_id
"""

# Every write of a claim is fenced by (state, attempts): see the module docstring.
_FENCE = "id = $1 AND state = 'processing' AND attempts = $2"

# One statement for all of a pool's claims; returns the ones still this pool's.
_HEARTBEAT = """
UPDATE payments p SET updated_at = now()
  FROM unnest($1::uuid[], $2::integer[]) AS c(id, attempts)
 WHERE p.id = c.id AND p.state = 'processing' AND p.attempts = c.attempts
RETURNING p.id::text
"""


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
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        reconcile_delay_s: float = RECONCILE_DELAY_S,
        poll_s: float = 0.5,
        drain_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        """``http`` is a client whose ``base_url`` is the provider; ``timeout_s`` bounds each call.

        ``heartbeat_timeout_s``: a ``processing`` row not heartbeated for this long is taken
        over (this pool heartbeats its own claims four times as often). ``reconcile_delay_s``:
        how long after an ambiguous failure it becomes due for the reconciler. ``drain_s``: at
        shutdown, how long in-flight attempts may take to finish before they are cancelled
        and handed back to ``pending``.
        """
        self._pool = pool
        self._host = host
        self._provider = ProviderClient(http, timeout_s)
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._base = base_backoff_s
        self._cap = max_backoff_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._heartbeat_s = max(0.02, heartbeat_timeout_s / HEARTBEATS_PER_TIMEOUT)
        self._reconcile_delay_s = reconcile_delay_s
        self._poll_s = poll_s
        self._drain_s = drain_s
        self._rng = rng or random.Random()
        self._inflight: dict[asyncio.Task[Outcome], Claimed] = {}
        #: Claims being processed now (payment id to attempts): what the heartbeat refreshes.
        self._claims: dict[str, int] = {}
        self._wake = asyncio.Event()

    # --- driving -----------------------------------------------------------------------------

    async def run_once(self, limit: int | None = None) -> dict[str, Outcome]:
        """Claim the attempts due now (at most ``limit``), run them all, return their outcomes."""
        claimed = await self.claim(limit or self._concurrency)
        if not claimed:
            return {}
        async with self._heartbeating():
            outcomes = await asyncio.gather(*(self.process(p) for p in claimed))
        return {p.id: o for p, o in zip(claimed, outcomes, strict=True)}

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain (see ``drain_s``); never raises on outages.

        Only as many attempts are claimed as there are free slots, rather than claiming a
        batch and queueing it behind a semaphore: rows left unclaimed stay available to other
        workers. Every heartbeat interval, rows of dead workers are taken back.
        """
        listener = await self._listen()
        stopper = asyncio.create_task(self._wake_when(stop))
        last_recovery = 0.0
        failures = 0
        try:
            async with self._heartbeating():
                try:
                    while not stop.is_set():
                        self._wake.clear()
                        try:
                            if time.monotonic() - last_recovery >= self._heartbeat_s:
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
                            task = asyncio.create_task(
                                self.process(payment), name=f"payment:{payment.id}"
                            )
                            self._inflight[task] = payment
                            task.add_done_callback(self._finished)
                        if not claimed or len(self._inflight) >= self._concurrency:
                            # Woken early by a finished attempt or a notification; at the
                            # latest in time for the next recovery.
                            await self._sleep(stop, min(self._poll_s, self._heartbeat_s))
                finally:
                    # Still heartbeating: attempts finishing during the drain keep their rows.
                    await self._drain()
        finally:
            stopper.cancel()
            if listener is not None:
                await self._unlisten(listener)

    async def claim(self, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` due attempts (``pending`` → ``processing``, attempts + 1)."""
        rows = await self._pool.fetch(_CLAIM, limit)
        return [Claimed(**{**dict(r), "currency": r["currency"].strip()}) for r in rows]

    async def recover_stale(self) -> int:
        """Hand back attempts whose worker stopped heartbeating; return how many."""
        return await recover_stale(self._pool, self._heartbeat_timeout_s)

    @contextlib.asynccontextmanager
    async def _heartbeating(self) -> Any:
        """Heartbeat this pool's claims for as long as the block runs."""
        task = asyncio.create_task(self._heartbeat(), name="payments-heartbeat")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _heartbeat(self) -> None:
        """Every heartbeat interval: refresh all claims in one statement (fenced by attempts)."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            claims = dict(self._claims)
            if not claims:
                continue
            try:
                rows = await self._pool.fetch(_HEARTBEAT, list(claims), list(claims.values()))
            except Exception as exc:  # the claims lapse and are taken over: safe, just slower
                log.warning("payment heartbeat failed", extra={"error": repr(exc)})
                continue
            alive = {r["id"] for r in rows}
            for payment_id, attempts in claims.items():
                if payment_id in alive or self._claims.get(payment_id) != attempts:
                    continue  # refreshed, or finished meanwhile
                # Taken over (or just finished): its writes are fenced off from now on.
                del self._claims[payment_id]
                log.info("payment claim no longer ours", extra={"payment": payment_id})

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
            except Exception as exc:  # it stops heartbeating: taken over in a few seconds
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
        """Run one claimed attempt to its outcome for this claim; never raises (but cancels).

        The claim is heartbeated while this runs, when the pool is driven by :meth:`run` or
        :meth:`run_once`.
        """
        self._claims[payment.id] = payment.attempts
        outcome: Outcome | None = None
        try:
            # Linked to the confirm request's trace: the attempt runs in another process.
            link = tracing.link_from(payment.traceparent or "")
            with tracing.span(
                "payment.attempt",
                links=[link] if link is not None else None,
                payment=payment.id,
                attempt=payment.attempts,
            ) as span:
                outcome = await self._attempt(payment)
                span.set_attribute("outcome", outcome)
            return outcome
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database hiccup mid-attempt: retry it, lose nothing
            log.exception("payment attempt crashed", extra={"payment": payment.id})
            try:
                outcome = await self._retry(
                    payment, f"internal error: {exc!r}"[:200], must_finish=True
                )
            except Exception:  # it stops heartbeating: taken over in a few seconds
                outcome = "lost"
            return outcome
        finally:
            if outcome is not None:
                PAYMENT_ATTEMPTS.labels(outcome).inc()
            if self._claims.get(payment.id) == payment.attempts:
                del self._claims[payment.id]

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
            charge = await self._provider.charge(p)
        except ProviderUnavailable as exc:
            return await self._retry(p, str(exc), must_finish=False)
        except ProviderRefused as exc:
            # A refusal of the request itself charged nothing under this claim; an earlier
            # claim of the same key may have (its answer lost), which only the provider knows.
            return await self._fail(p, str(exc), fail_order=True, ambiguous=p.attempts > 1)
        if charge.status == "declined":
            # The hold is left alone: the fan may try again (a new attempt) until its deadline.
            return await self._fail(p, "declined", fail_order=True, outcome="declined")
        return await self._confirm(p, charge.id)

    async def _confirm(self, p: Claimed, charge_id: str) -> Outcome:
        try:
            verdict = await confirm_charge(
                self._host,
                self._pool,
                event_id=p.event_id,
                hold_id=p.hold_id,
                fan_id=p.fan_id,
                charge_id=charge_id,
            )
        except Unavailable as exc:
            return await self._retry(p, f"inventory unavailable: {exc.code}", must_finish=True)
        if isinstance(verdict, Paid):
            return await self._succeed(p, charge_id)
        return await self._refund_and_fail(
            p, charge_id, verdict.reason, fail_order=verdict.fail_order
        )

    async def _refund_and_fail(
        self, p: Claimed, charge_id: str, reason: str, *, fail_order: bool
    ) -> Outcome:
        try:
            result, answer = await self._provider.refund(charge_id)
        except ProviderUnavailable as exc:
            return await self._retry(p, f"{reason}; refund pending: {exc}", must_finish=True)
        if result == "refused":
            log.error(
                "refund refused; needs an operator",
                extra={"payment": p.id, "charge": charge_id, "answer": answer},
            )
            return await self._fail(
                p, f"{reason}; refund refused: {answer}", fail_order=fail_order, charge_id=charge_id
            )
        return await self._fail(
            p,
            f"{reason}; refunded",
            fail_order=fail_order,
            outcome="refunded",
            charge_id=charge_id,
        )

    # --- writing outcomes ----------------------------------------------------------------------

    async def _succeed(self, p: Claimed, charge_id: str) -> Outcome:
        """Order paid, payment succeeded, tickets issued: all or nothing, at most once per order."""
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(HINT_AFTER_COMMIT)
                outcome, tickets = await self._succeed_in(conn, p, charge_id)
            if outcome != "lost":
                # Once committed: the long polls waiting for the hold answer at once.
                await hint(conn, RESERVATIONS_CHANNEL, p.hold_id)
        if tickets:
            log.info("order paid", extra={"order": p.order_id, "payment": p.id, "tickets": tickets})
        return outcome

    async def _succeed_in(self, conn: Conn, p: Claimed, charge_id: str) -> tuple[Outcome, int]:
        """:meth:`_succeed`'s transaction: its outcome and the tickets it issued."""
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
                await record_event(
                    conn, p.order_id, PAYMENT_SUCCEEDED, payment_id=p.id, charge_id=charge_id
                )
                return "succeeded", 0
            # The order was paid by another payment while this charge went through too:
            # the reconciler checks the charge and gives it back.
            failed = await conn.fetchval(
                f"UPDATE payments SET {_FAIL}, provider_ref = $3,"
                " last_error = 'order already paid', updated_at = now(),"
                " reconcile = 'due', reconcile_after = now()"
                f" WHERE {_FENCE} RETURNING id",
                p.id,
                p.attempts,
                charge_id,
            )
            if failed is None:
                return "lost", 0
            await record_event(
                conn,
                p.order_id,
                PAYMENT_FAILED,
                payment_id=p.id,
                reason="order already paid",
                charge_id=charge_id,
                reconcile=True,
            )
            return "failed", 0
        claimed = await conn.fetchval(
            f"UPDATE payments SET {_SUCCEED}, provider_ref = $3, last_error = NULL,"
            f" updated_at = now() WHERE {_FENCE} RETURNING id",
            p.id,
            p.attempts,
            charge_id,
        )
        if claimed is None:
            # This claim was taken over; the new one reaches the same outcome through
            # the same keys.
            return "lost", 0
        tickets = await pay_order(conn, p.to_pay(charge_id), attempt=p.attempts)
        return "succeeded", tickets

    async def _fail(
        self,
        p: Claimed,
        reason: str,
        *,
        fail_order: bool,
        outcome: Outcome = "failed",
        ambiguous: bool = False,
        charge_id: str | None = None,
    ) -> Outcome:
        """The attempt fails; ``ambiguous``: the provider may have charged without our knowing,
        so the payment is left ``reconcile = 'due'`` for :mod:`workers.reconcile`."""
        async with self._pool.acquire() as conn, conn.transaction():
            done = await conn.fetchval(
                f"UPDATE payments SET {_FAIL}, last_error = $3, updated_at = now(),"
                " provider_ref = coalesce($4, provider_ref),"
                " reconcile = CASE WHEN $5 THEN 'due' ELSE reconcile END,"
                " reconcile_after = CASE WHEN $5 THEN now() + make_interval(secs => $6)"
                "                   ELSE reconcile_after END"
                f" WHERE {_FENCE} RETURNING id",
                p.id,
                p.attempts,
                reason,
                charge_id,
                ambiguous,
                self._reconcile_delay_s,
            )
            if done is None:
                return "lost"
            if fail_order:
                # Only an order still waiting fails: never one another attempt has paid.
                moved = await conn.execute(
                    "UPDATE orders SET status = 'failed'"
                    " WHERE id = $1 AND status = 'awaiting_payment'",
                    p.order_id,
                )
                # The fan is told, once per attempt; not when the charge is in doubt (the
                # reconciler may yet find it paid).
                if moved == "UPDATE 1" and not ambiguous:
                    await create_notification(
                        conn, PAYMENT_FAILED_EMAIL, p.order_id, p.id, {"reason": reason}
                    )
            details: dict[str, Any] = {"reason": reason, "attempts": p.attempts}
            if charge_id is not None:
                details["charge_id"] = charge_id
            if ambiguous:
                details["reconcile"] = True
            await record_event(conn, p.order_id, PAYMENT_FAILED, payment_id=p.id, **details)
        log.info(
            "payment failed",
            extra={"payment": p.id, "order": p.order_id, "reason": reason, "reconcile": ambiguous},
        )
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
            # Only charges give up (once money may have moved, must_finish holds): whether
            # the provider charged is unknown, so the reconciler finds out.
            return await self._fail(
                p,
                f"gave up after {p.attempts} attempts: {error}",
                fail_order=True,
                ambiguous=True,
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


async def recover_stale(pool: asyncpg.Pool[Any], heartbeat_timeout_s: float) -> int:
    """Hand back ``processing`` attempts not heartbeated for ``heartbeat_timeout_s``; how many.

    Their workers died, hang or lost PostgreSQL; the next claim takes them over, and the old
    claims are fenced off by ``attempts``.
    """
    rows = await pool.fetch(
        f"UPDATE payments SET {_RETRY}, next_attempt_at = now(),"
        " last_error = 'worker stopped heartbeating', updated_at = now()"
        " WHERE state = 'processing' AND updated_at < now() - make_interval(secs => $1)"
        " RETURNING id",
        heartbeat_timeout_s,
    )
    if rows:
        log.warning("took over payments of a stalled worker", extra={"count": len(rows)})
    return len(rows)
