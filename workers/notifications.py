"""E-mail notifications, the pure part: which e-mail, its dedup key, and the message itself.

Four kinds, each created once per thing it announces (its *dedup key*, UNIQUE in the
``notifications`` table; :func:`dedup_key`):

- ``order_confirmed`` (``order_confirmed:<order>``): the order is paid and its tickets issued;
  written in the payment's own transaction (:func:`workers.payments.pay_order`). Carries one
  QR code per ticket (a PNG drawn by ``segno``, inline, referenced from the HTML by ``cid:``)
  and the event as an ``.ics`` attachment (RFC 5545) a phone's calendar or wallet opens;
- ``payment_failed`` (``payment_failed:<payment>``): an attempt failed and the order with it
  (a decline, a lapsed hold); not when the outcome is in doubt (the reconciler decides);
- ``refund_processed`` (``refund_processed:<refund>``): from the outbox topic
  ``order.refunded``;
- ``event_reminder`` (``event_reminder:<order>``): a paid order whose event starts within
  ``WAITROOM_EMAIL_REMINDER_BEFORE_S``; created by the mailer's periodic job.

:func:`build_message` makes the :class:`email.message.EmailMessage` (a plain-text part and an
HTML alternative, from the template files under ``workers/templates/email``: ``KIND.txt``,
whose first line is ``Subject: ...``, and ``KIND.html``; values are HTML-escaped in the HTML).
The Message-ID is :func:`message_id` of the dedup key: the same for every attempt, so a
message sent twice (see :mod:`workers.mailer` for when that can happen) is recognisably one.

Also here: :class:`Pacer`, the mailer's rate limit (a token bucket taking ``now``), and the
ICS writer (:func:`calendar_entry`).
"""

from __future__ import annotations

import hashlib
import html
import io
import string
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from functools import cache
from importlib import resources
from typing import Any, Final, Literal

import msgspec
import segno

Kind = Literal["order_confirmed", "payment_failed", "refund_processed", "event_reminder"]
ORDER_CONFIRMED: Final = "order_confirmed"
PAYMENT_FAILED: Final = "payment_failed"
REFUND_PROCESSED: Final = "refund_processed"
EVENT_REMINDER: Final = "event_reminder"
KINDS: Final[tuple[Kind, ...]] = (ORDER_CONFIRMED, PAYMENT_FAILED, REFUND_PROCESSED, EVENT_REMINDER)

#: Outbox topic of a completed refund; payload :class:`OrderRefunded`.
ORDER_REFUNDED_TOPIC: Final = "order.refunded"

#: States of a notification row (see the migration 0014_email.sql).
State = Literal["pending", "sending", "sent", "skipped", "dead"]

#: ``PRODID`` of our calendar entries.
PRODID = "-//waitroom//tickets//EN"


class OrderRefunded(msgspec.Struct, frozen=True):
    """Payload of the outbox topic ``order.refunded`` (written when a refund completes)."""

    order_id: str
    refund_id: str
    amount_minor: int
    currency: str


class EventView(msgspec.Struct, frozen=True):
    """What an e-mail says of the event."""

    id: str
    name: str
    venue: str
    starts_at: datetime | None


class TicketView(msgspec.Struct, frozen=True):
    """One ticket as an e-mail shows it: its code and its signed form (the QR code's text)."""

    code: str
    ticket_type: str
    token: str


class OrderView(msgspec.Struct, frozen=True):
    """What an e-mail says of the order."""

    id: str
    amount_minor: int
    currency: str
    event: EventView
    tickets: tuple[TicketView, ...] = ()


class Notice(msgspec.Struct, frozen=True):
    """One notification to send: a row of ``notifications`` with what its e-mail shows."""

    kind: Kind
    recipient: str
    message_id: str
    order: OrderView
    #: Kind-specific values: ``reason`` (payment_failed); ``refund_id``, ``amount_minor``,
    #: ``currency`` (refund_processed).
    detail: dict[str, Any] = {}


def dedup_key(kind: Kind, ref: str) -> str:
    """The notification's unique key: one ``kind`` e-mail per ``ref`` (an order, a payment...)."""
    return f"{kind}:{ref}"


def message_id(key: str, domain: str) -> str:
    """The stable Message-ID of the notification ``key``, sent by ``domain``.

    The mailer computes the same in SQL when it first claims a row (``sha256`` of the key).
    """
    return f"<{hashlib.sha256(key.encode()).hexdigest()}@{domain}>"


def sender_domain(sender: str) -> str:
    """The domain of the ``From`` address (``Name <user@domain>`` or ``user@domain``)."""
    address = _address(sender)
    return address.domain or "localhost"


def _address(text: str) -> Address:
    # The header registry's parser: refuses CR/LF and anything that is not one address.
    message = EmailMessage()
    message["To"] = text
    addresses = message["To"].addresses
    if len(addresses) != 1 or not addresses[0].username:
        raise ValueError(f"not one e-mail address: {text!r}")
    address: Address = addresses[0]
    return address


def valid_address(text: str) -> bool:
    """Whether ``text`` is one usable e-mail address (``user@domain.tld``)."""
    try:
        address = _address(text)
    except (ValueError, IndexError, TypeError):
        return False
    return "." in address.domain and address.addr_spec == text.strip()


# --- rendering -----------------------------------------------------------------------------


@cache
def template(name: str) -> str:
    """The text of ``workers/templates/email/NAME`` (read once)."""
    return (resources.files("workers") / "templates" / "email" / name).read_text("utf-8")


def render(name: str, values: dict[str, str], *, safe: dict[str, str] | None = None) -> str:
    """Template ``name`` with ``values`` (escaped when it is HTML) and ``safe`` (as they are).

    A placeholder without a value raises ``KeyError``: a template and its code must agree.
    """
    is_html = name.endswith(".html")
    mapping = {k: html.escape(v) if is_html else v for k, v in values.items()}
    mapping.update(safe or {})
    return string.Template(template(name)).substitute(mapping)


def money(amount_minor: int, currency: str) -> str:
    """``1250, "EUR"`` -> ``"12.50 EUR"`` (two decimals: every currency we sell in has them)."""
    sign = "-" if amount_minor < 0 else ""
    units, cents = divmod(abs(amount_minor), 100)
    return f"{sign}{units}.{cents:02d} {currency}"


def when(starts_at: datetime | None) -> str:
    """The event's start as the e-mail says it (UTC: the fan's zone is not known here)."""
    if starts_at is None:
        return "(to be announced)"
    return starts_at.astimezone(UTC).strftime("%A %d %B %Y, %H:%M UTC")


#: What a fan is told for a payment worker's reason (internal text); anything else: generic.
_REASONS = (
    ("declined", "your card was declined"),
    ("hold expired", "your reservation expired before the payment completed"),
    ("hold cancelled", "your reservation was cancelled"),
)


def fan_reason(reason: str) -> str:
    """A fan-facing reason for a failed payment, never the internal one (it may name systems)."""
    lowered = reason.lower()
    for needle, text in _REASONS:
        if needle in lowered:
            return text
    return "the payment could not be completed"


def qr_png(token: str) -> bytes:
    """``token`` as a QR code PNG (error correction M, as on the fan's page)."""
    out = io.BytesIO()
    segno.make_qr(token, error="m").save(out, kind="png", scale=5, border=4)
    return out.getvalue()


def _ics_escape(text: str) -> str:
    escaped = (
        text.replace("\\", "\\\\")
        .replace(";", "\\;")
        .replace(",", "\\,")
        .replace("\r\n", "\\n")
        .replace("\n", "\\n")
    )
    # RFC 5545 TEXT has no control characters but HTAB: a stray CR would end the line.
    return "".join(c for c in escaped if c == "\t" or (c >= " " and c != "\x7f"))


def _ics_fold(line: str) -> str:
    # RFC 5545 3.1: lines of at most 75 octets, continued after CRLF and one space, never
    # cutting a UTF-8 sequence.
    out: list[str] = []
    current, size = "", 0
    for char in line:
        width = len(char.encode())
        if size + width > 75:
            out.append(current)
            current, size = " ", 1
        current += char
        size += width
    out.append(current)
    return "\r\n".join(out)


def _ics_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def calendar_entry(order: OrderView, now: datetime, domain: str) -> str | None:
    """The event as an iCalendar object (RFC 5545), or None when it has no start time.

    One ``VEVENT`` whose ``UID`` is the order's (a reminder updates the entry of the
    confirmation instead of adding a second one).
    """
    event = order.event
    if event.starts_at is None:
        return None
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        f"PRODID:{PRODID}",
        "METHOD:PUBLISH",
        "CALSCALE:GREGORIAN",
        "BEGIN:VEVENT",
        f"UID:{order.id}@{domain}",
        f"DTSTAMP:{_ics_time(now)}",
        f"DTSTART:{_ics_time(event.starts_at)}",
        f"SUMMARY:{_ics_escape(event.name)}",
        f"DESCRIPTION:{_ics_escape(f'Order {order.id}: {len(order.tickets)} ticket(s)')}",
    ]
    if event.venue:
        lines.append(f"LOCATION:{_ics_escape(event.venue)}")
    lines += ["END:VEVENT", "END:VCALENDAR"]
    return "".join(_ics_fold(line) + "\r\n" for line in lines)


# --- the message ---------------------------------------------------------------------------


def _values(notice: Notice) -> dict[str, str]:
    order = notice.order
    values = {
        "event_name": order.event.name,
        "order_id": order.id,
        "amount": money(order.amount_minor, order.currency),
        "starts_at": when(order.event.starts_at),
        "venue": order.event.venue or "(to be announced)",
    }
    if notice.kind == PAYMENT_FAILED:
        values["reason"] = fan_reason(str(notice.detail.get("reason", "")))
    if notice.kind == REFUND_PROCESSED:
        values["refund_id"] = str(notice.detail.get("refund_id", ""))
        values["refund_amount"] = money(
            int(notice.detail.get("amount_minor", 0)),
            str(notice.detail.get("currency", order.currency)),
        )
    return values


def _subject_and_body(kind: Kind, values: dict[str, str], safe: dict[str, str]) -> tuple[str, str]:
    """The subject (the text template's first line) and the text body, rendered apart."""
    first, _, rest = template(f"{kind}.txt").partition("\n")
    if not first.startswith("Subject: "):
        raise ValueError("a text template starts with a 'Subject: ' line")
    subject = string.Template(first.removeprefix("Subject: ")).substitute(values)
    body = string.Template(rest.lstrip("\n")).substitute({**values, **safe})
    # One line whatever the values hold: a line break in a header would start another header.
    return " ".join(subject.split()), body


def build_message(notice: Notice, *, sender: str, now: datetime) -> EmailMessage:
    """The e-mail of ``notice``, from ``sender``, ready to send.

    ``multipart/alternative`` of text and HTML; with tickets (confirmation, reminder) the
    HTML is ``multipart/related`` with one inline PNG per ticket (``Content-ID`` referenced
    as ``cid:`` in the HTML); with the event's start known, the whole is
    ``multipart/mixed`` with ``event.ics`` attached.
    """
    domain = sender_domain(sender)
    values = _values(notice)
    with_tickets = notice.kind in (ORDER_CONFIRMED, EVENT_REMINDER)
    tickets = notice.order.tickets if with_tickets else ()
    # Content-IDs derived from the message and the ticket: the same bytes at every attempt.
    cids = [
        f"{hashlib.sha256(f'{notice.message_id}/{t.code}'.encode()).hexdigest()[:32]}@{domain}"
        for t in tickets
    ]
    safe_text: dict[str, str] = {}
    safe_html: dict[str, str] = {}
    if with_tickets:
        rows = [
            {"ticket_type": t.ticket_type, "code": t.code, "cid": c}
            for t, c in zip(tickets, cids, strict=True)
        ]
        safe_text["tickets"] = "".join(render("ticket.txt", r) for r in rows) or "  (none)\n"
        safe_html["tickets"] = "".join(render("ticket.html", r) for r in rows) or "<p>(none)</p>"
    subject, text = _subject_and_body(notice.kind, values, safe_text)
    body_html = render(f"{notice.kind}.html", values, safe=safe_html)

    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = notice.recipient
    message["Date"] = format_datetime(now.astimezone(UTC))
    message["Message-ID"] = notice.message_id
    # Automated mail: no vacation replies (RFC 3834).
    message["Auto-Submitted"] = "auto-generated"
    message["X-Waitroom-Notification"] = notice.kind
    message.set_content(text)
    message.add_alternative(body_html, subtype="html")
    if tickets:
        parts = message.get_payload()
        assert isinstance(parts, list)
        html_part = parts[1]
        assert isinstance(html_part, EmailMessage)
        for ticket, cid in zip(tickets, cids, strict=True):
            html_part.add_related(
                qr_png(ticket.token),
                maintype="image",
                subtype="png",
                cid=f"<{cid}>",
                filename=f"ticket-{ticket.code}.png",
                disposition="inline",
            )
    if notice.kind in (ORDER_CONFIRMED, EVENT_REMINDER):
        ics = calendar_entry(notice.order, now, domain)
        if ics is not None:
            message.add_attachment(
                ics.encode(),
                maintype="text",
                subtype="calendar",
                filename="event.ics",
                params={"method": "PUBLISH", "charset": "utf-8"},
            )
    return message


# --- the rate limit ------------------------------------------------------------------------


class Pacer:
    """A token bucket of ``burst`` messages refilled at ``rate_per_s``, taking ``now``.

    :meth:`reserve` books the next send and says how long to wait for it; over any window of
    ``T`` seconds at most ``burst + rate_per_s * T`` sends are booked.
    """

    def __init__(self, rate_per_s: float, burst: int = 1) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None

    def reserve(self, now: float) -> float:
        """Book one send; the seconds to wait from ``now`` before making it (0: at once)."""
        if self._at is None:
            self._at = now
        elif now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
            self._at = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return max(0.0, self._at - now)
        # In debt: the send waits until the bucket has refilled the missing token.
        return max(0.0, self._at - now) + (-self._tokens) / self.rate_per_s

    def give_back(self) -> None:
        """Return the last booking's token: it sent nothing (there was nothing to send)."""
        self._tokens = min(float(self.burst), self._tokens + 1.0)
