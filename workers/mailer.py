"""The mailer: sends the ``notifications`` rows over SMTP, each once (see the guarantee below).

Rows are created by :func:`create_notification`, in the transaction of the change they
announce (an order paid, a payment failed: :mod:`workers.payments`), by the outbox handler of
``order.refunded`` (:func:`refund_handler`) or by the mailer's reminder job
(:meth:`Mailer.remind_once`). What each e-mail says is :mod:`workers.notifications`.

One row at a time, :meth:`Mailer.send_one`:

1. waits for the rate limit (``WAITROOM_EMAIL_RATE_PER_S`` per mailer process);
2. claims the oldest due row (``pending``, or ``sending`` whose lease ran out) with
   ``FOR UPDATE SKIP LOCKED``, in its own committed statement: ``sending``, one more
   ``attempts`` (the claim's fencing token), a lease of :func:`lease_for` the send timeout,
   and its Message-ID fixed at the first claim (:func:`workers.notifications.message_id`);
3. reads the order, event and tickets, builds the message, and sends it (``aiosmtplib``,
   one connection kept open while there is work), all bounded by ``WAITROOM_EMAIL_TIMEOUT_S``;
4. marks it ``sent`` (fenced by the claim). A refusal or an error puts it back to
   ``pending`` with a full-jitter backoff; a permanent refusal (5xx), an address that is no
   address, or any other failure that is not an outage on the :data:`MAX_ATTEMPTS`-th claim
   or later make it ``dead`` (``attempts`` counts every claim, outages and claims a crashed
   mailer left included). An unreachable or silent server never makes a row dead; the loop
   backs off while it lasts.

The guarantee (tests/workers/test_email.py kills a real mailer process mid-send): each
notification is created once, and one that is not ``dead`` is delivered at least once. It is
delivered a second time only when an attempt's outcome is lost *after* the SMTP server took
the end of the message data: the mailer dies between the server's reply and step 4's commit,
PostgreSQL cannot be reached for that commit, or the send times out after the server took
the data. That window is one SMTP reply and one ``UPDATE``; nothing else runs inside it. A
mailer killed at any other moment (before or during DATA, while the server has not taken the
message) leaves the row ``sending`` until its lease ends; the next claim sends it, and that is
its only delivery. A second delivery carries the same Message-ID (fixed at the first claim;
the inline images' Content-IDs derive from it), so a receiving system that dedupes by
Message-ID shows one. Exactly once is impossible over SMTP: the server's acceptance and our
commit are two systems' states (RFC 1047, "Duplicate messages and SMTP", describes this very
duplicate). The lease is three send timeouts, so a live mailer's send has ended before another
may claim its row.

:func:`main` (``python -m workers.mailer``) runs a mailer alone; ``waitroom workers`` runs one
whenever ``WAITROOM_SMTP_URL`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
import asyncpg
import msgspec
from prometheus_client import Counter, Gauge

from admission.passes import PassKeys
from inventory.store import Conn
from inventory.tickets import claims_of, sign_ticket
from waitroom.core.db import create_pool
from waitroom.core.logs import configure_logging
from waitroom.core.settings import Settings, load_settings
from workers.notifications import (
    EVENT_REMINDER,
    KINDS,
    ORDER_CONFIRMED,
    REFUND_PROCESSED,
    EventView,
    Kind,
    Notice,
    OrderRefunded,
    OrderView,
    Pacer,
    TicketView,
    build_message,
    dedup_key,
    sender_domain,
    valid_address,
)
from workers.outbox import Handler, OutboxTask

log = logging.getLogger("waitroom.mailer")

#: Claims from which a failure that is not an outage makes a notification ``dead`` (about an
#: hour of backoff at the defaults; every claim counts, outages included).
MAX_ATTEMPTS = 12
BASE_BACKOFF_S = 5.0
MAX_BACKOFF_S = 600.0
#: How long an idle mailer waits before looking for due rows again.
POLL_S = 0.5
#: How often the reminder job and the pending gauges run.
HOUSEKEEPING_EVERY_S = 30.0

EMAILS_SENT = Counter(
    "waitroom_emails_sent_total", "E-mails accepted by the SMTP server, by kind.", ["kind"]
)
EMAIL_FAILURES = Counter(
    "waitroom_email_failures_total",
    "Attempts to send an e-mail that failed (refused, unreachable, timed out), by kind.",
    ["kind"],
)
EMAILS_PENDING = Gauge(
    "waitroom_emails_pending",
    "Notifications waiting to be sent (pending or being sent).",
    multiprocess_mode="livemax",
)
EMAIL_OLDEST_PENDING = Gauge(
    "waitroom_email_oldest_pending_seconds",
    "Age of the oldest notification waiting to be sent (0 when none waits).",
    multiprocess_mode="livemax",
)
for _kind in KINDS:
    EMAILS_SENT.labels(_kind)
    EMAIL_FAILURES.labels(_kind)


# --- creating notifications ------------------------------------------------------------------


def notification_insert(first: int = 1) -> str:
    """The statement creating one notification (see :func:`create_notification`), its
    parameters numbered from ``first``: the dedup key, the kind, the order's id and the
    detail (JSON); it returns the new row's id, none when the key existed. Numbered so that
    a larger statement can carry it (the paid order's, :func:`workers.payments.pay_order`)."""
    key, kind, order, detail = (f"${first + i}" for i in range(4))
    return f"""
INSERT INTO notifications (dedup_key, kind, order_id, event_id, recipient, state, detail)
SELECT {key}, {kind}, o.id, o.event_id, o.email,
       CASE WHEN o.email IS NULL THEN 'skipped' ELSE 'pending' END, {detail}::jsonb
  FROM orders o WHERE o.id = {order}::uuid
ON CONFLICT (dedup_key) DO NOTHING
RETURNING id
"""


_CREATE = notification_insert()


async def create_notification(
    conn: Conn, kind: Kind, order_id: str, ref: str, detail: dict[str, Any] | None = None
) -> bool:
    """Create the ``kind`` notification of ``ref`` for ``order_id``'s buyer; whether it is new.

    Call it inside the transaction of the change it announces: it is created with it or not
    at all, and once (its dedup key). An order without an e-mail address gets a ``skipped``
    row: a record that there was nothing to send.
    """
    created = await conn.fetchval(
        _CREATE,
        dedup_key(kind, ref),
        kind,
        order_id,
        msgspec.json.encode(detail or {}).decode(),
    )
    return created is not None


def refund_handler(pool: asyncpg.Pool[Any]) -> Handler:
    """The outbox handler of ``order.refunded``: create the refund's notification (once)."""

    async def handle(task: OutboxTask) -> None:
        refund = msgspec.json.decode(task.payload, type=OrderRefunded)
        async with pool.acquire() as conn:
            await create_notification(
                conn,
                REFUND_PROCESSED,
                refund.order_id,
                refund.refund_id,
                {
                    "refund_id": refund.refund_id,
                    "amount_minor": refund.amount_minor,
                    "currency": refund.currency,
                },
            )

    return handle


_REMIND = """
INSERT INTO notifications (dedup_key, kind, order_id, event_id, recipient, state)
SELECT 'event_reminder:' || o.id, 'event_reminder', o.id, o.event_id, o.email,
       CASE WHEN o.email IS NULL THEN 'skipped' ELSE 'pending' END
  FROM events e JOIN orders o ON o.event_id = e.id AND o.status = 'paid'
 WHERE e.starts_at > now() AND e.starts_at <= now() + make_interval(secs => $1)
   -- Not for an order whose tickets were all refunded (voided).
   AND EXISTS (SELECT 1 FROM tickets t WHERE t.order_id = o.id AND t.voided_at IS NULL)
ON CONFLICT (dedup_key) DO NOTHING
"""


# --- SMTP ------------------------------------------------------------------------------------


class SmtpTarget(msgspec.Struct, frozen=True):
    """Where and how to send, from ``WAITROOM_SMTP_URL``."""

    hostname: str
    port: int
    username: str | None = None
    password: str | None = None
    #: ``smtps://``: TLS from the first byte (port 465).
    use_tls: bool = False
    #: ``?starttls=1``: upgrade with STARTTLS (required); ``?starttls=0``: never;
    #: absent: when the server offers it.
    start_tls: bool | None = None


def smtp_target(url: str) -> SmtpTarget:
    """``smtp://user:pass@host:port?starttls=1`` or ``smtps://...`` as a :class:`SmtpTarget`."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("expected smtp://[user:pass@]host[:port] or smtps://...")
    use_tls = parts.scheme == "smtps"
    query = parse_qs(parts.query)
    start_tls: bool | None = None
    if "starttls" in query:
        start_tls = query["starttls"][-1].lower() in ("1", "true", "yes", "on")
    return SmtpTarget(
        hostname=parts.hostname,
        port=parts.port or (465 if use_tls else 25),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        use_tls=use_tls,
        start_tls=start_tls,
    )


class PermanentFailure(Exception):
    """This notification cannot be sent, now or later (a 5xx refusal, no valid address)."""


def _permanent(exc: BaseException) -> bool:
    if isinstance(exc, PermanentFailure):
        return True
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code >= 500 for r in exc.recipients)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        # 5xx: the server refuses this message for good; 4xx: try again later. A refused
        # login (535) is the deployment's fault, not the message's: not permanent, retried
        # with backoff like a 4xx (so it too ends dead from the MAX_ATTEMPTS-th claim on).
        return exc.code >= 500 and not isinstance(exc, aiosmtplib.SMTPAuthenticationError)
    return False


def _outage(exc: BaseException) -> bool:
    # Connection refused or lost, or no answer in time: the server's state, not the message's.
    return isinstance(
        exc,
        aiosmtplib.SMTPConnectError
        | aiosmtplib.SMTPServerDisconnected
        | aiosmtplib.SMTPTimeoutError
        | OSError
        | TimeoutError,
    )


def lease_for(timeout_s: float) -> float:
    """The lease of a claimed row: three send timeouts, so no other mailer claims it while a
    live one may still be sending (the send, its reading and its marking take one each)."""
    return 3.0 * timeout_s


def backoff(attempts: int, rng: random.Random, base: float, cap: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones (full jitter)."""
    return rng.random() * min(cap, base * 2.0 ** min(max(attempts, 1) - 1, 32))


#: How one :meth:`Mailer.send_one` went.
SendOutcome = Literal["idle", "sent", "failed", "outage"]


class Claim(msgspec.Struct, frozen=True):
    """A notification claimed for sending; ``attempts`` counts this claim."""

    id: int
    kind: Kind
    order_id: str
    event_id: str
    recipient: str
    detail: str
    attempts: int
    message_id: str


_CLAIM = """
WITH due AS (
    SELECT id FROM notifications
     WHERE state IN ('pending', 'sending') AND next_attempt_at <= now()
     ORDER BY next_attempt_at LIMIT 1
     FOR UPDATE SKIP LOCKED)
UPDATE notifications n
   SET state = 'sending', attempts = n.attempts + 1,
       lease_until = now() + make_interval(secs => $1),
       next_attempt_at = now() + make_interval(secs => $1),
       message_id = coalesce(n.message_id,
           '<' || encode(sha256(convert_to(n.dedup_key, 'UTF8')), 'hex') || '@' || $2 || '>')
  FROM due WHERE n.id = due.id
RETURNING n.id, n.kind, n.order_id::text, n.event_id, n.recipient, n.detail::text,
          n.attempts, n.message_id
"""
# Both fenced by the claim: a mailer whose lease ran out writes nothing over the next claim.
_SENT = """
UPDATE notifications SET state = 'sent', sent_at = now(), lease_until = NULL, last_error = NULL
 WHERE id = $1 AND attempts = $2 AND state = 'sending'
"""
_FAILED = """
UPDATE notifications
   SET state = CASE WHEN $3 THEN 'dead' ELSE 'pending' END, lease_until = NULL,
       next_attempt_at = now() + make_interval(secs => $4), last_error = $5
 WHERE id = $1 AND attempts = $2 AND state = 'sending'
"""
_ORDER = """
SELECT o.id::text, o.amount_minor, o.currency, e.id AS event_id, e.name, e.venue, e.starts_at
  FROM orders o JOIN events e ON e.id = o.event_id WHERE o.id = $1::uuid
"""
_TICKETS = """
SELECT code, ticket_type, issued_at FROM tickets
 WHERE order_id = $1::uuid AND voided_at IS NULL ORDER BY issued_at, code
"""
_PENDING = """
SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age
  FROM notifications WHERE state IN ('pending', 'sending')
"""


class Mailer:
    """Sends due notifications; several may run at once (they claim rows apart)."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        target: SmtpTarget,
        pass_keys: PassKeys,
        *,
        sender: str,
        issuer: str,
        rate_per_s: float = 10.0,
        timeout_s: float = 30.0,
        reminder_before_s: float = 86_400.0,
        max_attempts: int = MAX_ATTEMPTS,
        base_backoff_s: float = BASE_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        poll_s: float = POLL_S,
        housekeeping_every_s: float = HOUSEKEEPING_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._target = target
        self._keys = pass_keys
        self._sender = sender
        self._domain = sender_domain(sender)
        self._issuer = issuer
        self._pacer = Pacer(rate_per_s)
        self._timeout_s = timeout_s
        self._lease_s = lease_for(timeout_s)
        self._reminder_before_s = reminder_before_s
        self._max_attempts = max_attempts
        self._base = base_backoff_s
        self._cap = max_backoff_s
        self._poll_s = poll_s
        self._housekeeping_every_s = housekeeping_every_s
        self._clock = clock
        self._rng = random.Random()
        self._smtp: aiosmtplib.SMTP | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, pool: asyncpg.Pool[Any], pass_keys: PassKeys, **options: Any
    ) -> Mailer:
        """A mailer of ``settings`` (``WAITROOM_SMTP_URL`` must be set)."""
        if settings.smtp_url is None:
            raise ValueError("WAITROOM_SMTP_URL is not set")
        return cls(
            pool,
            smtp_target(settings.smtp_url),
            pass_keys,
            sender=settings.email_from,
            issuer=settings.pass_issuer,
            rate_per_s=settings.email_rate_per_s,
            timeout_s=settings.email_timeout_s,
            reminder_before_s=settings.email_reminder_before_s,
            **options,
        )

    # --- one notification ------------------------------------------------------------------

    async def send_one(self) -> SendOutcome:
        """Wait for the rate limit, claim one due row and send it; how that went.

        ``idle``: nothing was due; ``sent``; ``failed``: refused (retried later, or dead);
        ``outage``: the server could not be reached or timed out (retried later).
        """
        wait = self._pacer.reserve(self._clock())
        if wait > 0:
            await asyncio.sleep(wait)
        record = await self._pool.fetchrow(_CLAIM, self._lease_s, self._domain)
        if record is None:
            self._pacer.give_back()  # an idle look costs the rate nothing
            return "idle"
        claim = Claim(**dict(record))
        try:
            async with asyncio.timeout(self._timeout_s):
                message = await self._message(claim)
                await self._send(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._close()
            await self._failed(claim, exc)
            return "outage" if _outage(exc) else "failed"
        # The duplicate window (see the module's docstring) is from the server's reply to
        # here: nothing but this UPDATE runs in it.
        await self._pool.execute(_SENT, claim.id, claim.attempts)
        EMAILS_SENT.labels(claim.kind).inc()
        log.info(
            "e-mail sent",
            extra={"notification": claim.id, "kind": claim.kind, "attempts": claim.attempts},
        )
        return "sent"

    async def _message(self, claim: Claim) -> EmailMessage:
        if not valid_address(claim.recipient):
            raise PermanentFailure(f"not a valid e-mail address: {claim.recipient!r}")
        async with self._pool.acquire() as conn:
            order = await conn.fetchrow(_ORDER, claim.order_id)
            tickets = []
            if claim.kind in (ORDER_CONFIRMED, EVENT_REMINDER):
                tickets = await conn.fetch(_TICKETS, claim.order_id)
        if order is None:
            raise PermanentFailure(f"order {claim.order_id} is gone")
        view = OrderView(
            id=order["id"],
            amount_minor=order["amount_minor"],
            currency=order["currency"],
            event=EventView(order["event_id"], order["name"], order["venue"], order["starts_at"]),
            tickets=tuple(
                TicketView(
                    t["code"],
                    t["ticket_type"],
                    sign_ticket(
                        self._keys,
                        claims_of(
                            issuer=self._issuer,
                            code=t["code"],
                            event_id=order["event_id"],
                            ticket_type=t["ticket_type"],
                            order_id=order["id"],
                            issued_at=t["issued_at"],
                        ),
                    ),
                )
                for t in tickets
            ),
        )
        notice = Notice(
            kind=claim.kind,
            recipient=claim.recipient,
            message_id=claim.message_id,
            order=view,
            detail=msgspec.json.decode(claim.detail),
        )
        return build_message(notice, sender=self._sender, now=datetime.now(UTC))

    async def _send(self, message: EmailMessage) -> None:
        if self._smtp is None or not self._smtp.is_connected:
            t = self._target
            smtp = aiosmtplib.SMTP(
                hostname=t.hostname,
                port=t.port,
                username=t.username,
                password=t.password,
                use_tls=t.use_tls,
                start_tls=t.start_tls,
                timeout=self._timeout_s,
            )
            await smtp.connect()
            self._smtp = smtp
        await self._smtp.send_message(message)

    async def _close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await smtp.quit()
            smtp.close()

    async def _failed(self, claim: Claim, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:1000]
        # An unreachable server is nobody's message's fault: it never makes one dead.
        dead = _permanent(exc) or (claim.attempts >= self._max_attempts and not _outage(exc))
        delay = 0.0 if dead else backoff(claim.attempts, self._rng, self._base, self._cap)
        EMAIL_FAILURES.labels(claim.kind).inc()
        try:
            await self._pool.execute(_FAILED, claim.id, claim.attempts, dead, delay, error)
        except Exception as db_exc:  # the lease brings the row back
            log.warning("could not record an e-mail failure", extra={"error": repr(db_exc)})
        log.log(
            logging.ERROR if dead else logging.WARNING,
            "e-mail dead" if dead else "e-mail failed; will retry",
            extra={
                "notification": claim.id,
                "kind": claim.kind,
                "attempts": claim.attempts,
                "error": error,
                "retry_in_s": None if dead else round(delay, 3),
            },
        )

    # --- housekeeping ----------------------------------------------------------------------

    async def remind_once(self) -> int:
        """Create the reminders of events starting soon (once per paid order); how many."""
        status = await self._pool.execute(_REMIND, float(self._reminder_before_s))
        return int(status.split()[-1])

    async def sample_once(self) -> None:
        """Set the pending gauges."""
        row = await self._pool.fetchrow(_PENDING)
        assert row is not None
        EMAILS_PENDING.set(row["n"])
        EMAIL_OLDEST_PENDING.set(row["age"])

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set; the send in progress finishes (sent or failed) first."""
        next_housekeeping = 0.0
        failures = outages = 0
        try:
            while not stop.is_set():
                try:
                    if self._clock() >= next_housekeeping:
                        next_housekeeping = self._clock() + self._housekeeping_every_s
                        created = await self.remind_once()
                        if created:
                            log.info("event reminders created", extra={"count": created})
                        await self.sample_once()
                    # Shielded: a shutdown must not cut a send between the server's
                    # acceptance and the row's marking (the duplicate window).
                    outcome = await asyncio.shield(self.send_one())
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # PostgreSQL unreachable: back off
                    failures += 1
                    log.warning("mailer failed", extra={"error": repr(exc), "failures": failures})
                    await _wait(stop, min(5.0, 0.1 * 2**failures))
                    continue
                if outcome == "idle":
                    await self._close()  # idle: no connection held open at the server
                    await _wait(stop, self._poll_s)
                elif outcome == "outage":
                    # The server is down: wait before the next row rather than spend every
                    # row's attempt on it (each one is retried on its own backoff too).
                    outages += 1
                    await _wait(stop, min(self._cap, self._poll_s * 2 ** min(outages, 16)))
                else:
                    outages = 0
        finally:
            await self._close()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run_mailer(settings: Settings, stop: asyncio.Event) -> None:
    """A mailer on its own PostgreSQL pool until ``stop`` (``python -m workers.mailer``)."""
    pool = await create_pool(settings)
    try:
        mailer = Mailer.from_settings(settings, pool, PassKeys.from_settings(settings))
        await mailer.run(stop)
    finally:
        await pool.close()


def main() -> None:
    """Run one mailer with the environment's settings until SIGTERM or SIGINT."""
    settings = load_settings()
    configure_logging(settings.log_level)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_mailer(settings, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
