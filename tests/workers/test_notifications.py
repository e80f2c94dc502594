"""The e-mails themselves (pure): parts, inline QR codes, the calendar entry, the rate limit."""

from __future__ import annotations

import email
import email.policy
import html
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from waitroom.checkout_api import ConfirmRequest
from waitroom.core.errors import SettingsError
from waitroom.core.settings import load_settings
from workers.mailer import SmtpTarget, smtp_target
from workers.notifications import (
    EVENT_REMINDER,
    KINDS,
    ORDER_CONFIRMED,
    PAYMENT_FAILED,
    REFUND_PROCESSED,
    EventView,
    Kind,
    Notice,
    OrderView,
    Pacer,
    TicketView,
    build_message,
    calendar_entry,
    fan_reason,
    message_id,
    money,
    qr_png,
    valid_address,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SENDER = "Waitroom Tickets <tickets@waitroom.test>"
NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
STARTS = datetime(2026, 12, 24, 19, 30, tzinfo=UTC)


def order(
    tickets: int = 2, *, name: str = "Winter Gala", starts: datetime | None = STARTS
) -> OrderView:
    return OrderView(
        id="3f0c8a4e-0000-4000-8000-000000000001",
        amount_minor=4500,
        currency="EUR",
        event=EventView("gala", name, "Main Hall, Door 3; upstairs", starts),
        tickets=tuple(
            TicketView(f"CODE{i:02d}abcdefghijklmnop", "ga", f"header.claims{i}.signature")
            for i in range(tickets)
        ),
    )


def notice(kind: Kind, view: OrderView | None = None, **detail: object) -> Notice:
    return Notice(
        kind=kind,
        recipient="fan@example.com",
        message_id=message_id(f"{kind}:1", "waitroom.test"),
        order=view or order(),
        detail=dict(detail),
    )


def reparse(message: EmailMessage) -> EmailMessage:
    """The message as a receiver sees it: its bytes parsed again."""
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def leaves(message: EmailMessage) -> dict[str, list[EmailMessage]]:
    found: dict[str, list[EmailMessage]] = {}
    for part in message.walk():
        if not part.is_multipart():
            assert isinstance(part, EmailMessage)
            found.setdefault(part.get_content_type(), []).append(part)
    return found


def unfold(ics: str) -> list[str]:
    return ics.replace("\r\n ", "").split("\r\n")


def test_a_confirmation_has_text_and_html_one_inline_qr_per_ticket_and_the_event_as_ics() -> None:
    view = order(3)
    message = reparse(build_message(notice(ORDER_CONFIRMED, view), sender=SENDER, now=NOW))
    assert message["Subject"] == "Your tickets for Winter Gala"
    assert message["To"] == "fan@example.com" and message["From"] == SENDER
    assert message["Message-ID"] == message_id("order_confirmed:1", "waitroom.test")
    assert message.get_content_type() == "multipart/mixed"
    found = leaves(message)
    (text,) = found["text/plain"]
    (page,) = found["text/html"]
    assert "CODE00abcdefghijklmnop" in text.get_content() and "45.00 EUR" in text.get_content()
    body = page.get_content()
    pngs = found["image/png"]
    assert len(pngs) == 3
    for ticket, png in zip(view.tickets, pngs, strict=True):
        data = png.get_content()
        assert data.startswith(PNG_SIGNATURE)
        # The QR code is the ticket's signed form: the same text draws the very same PNG.
        assert data == qr_png(ticket.token)
        cid = png["Content-ID"].strip("<>")
        assert f'src="cid:{cid}"' in body
        assert png.get_content_disposition() == "inline"
    (calendar,) = found["text/calendar"]
    assert calendar.get_filename() == "event.ics"
    lines = unfold(calendar.get_content())
    assert "DTSTART:20261224T193000Z" in lines
    assert lines[0] == "BEGIN:VCALENDAR" and lines[-2] == "END:VCALENDAR"


def test_the_html_part_escapes_what_the_text_part_shows_as_it_is() -> None:
    name = '<script>alert("x")</script> & Friends'
    message = reparse(
        build_message(notice(ORDER_CONFIRMED, order(1, name=name)), sender=SENDER, now=NOW)
    )
    found = leaves(message)
    assert name in found["text/plain"][0].get_content()
    body = found["text/html"][0].get_content()
    assert "<script>" not in body and html.escape(name) in body


def test_a_line_break_in_a_value_stays_out_of_the_headers() -> None:
    name = "Gala\r\nBcc: everyone@example.com"
    message = reparse(
        build_message(notice(ORDER_CONFIRMED, order(1, name=name)), sender=SENDER, now=NOW)
    )
    assert message["Subject"] == "Your tickets for Gala Bcc: everyone@example.com"
    assert message["Bcc"] is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_text_and_html_with_its_own_subject(kind: Kind) -> None:
    made = notice(
        kind, reason="409 charge_declined", refund_id="rf_1", amount_minor=1500, currency="EUR"
    )
    message = reparse(build_message(made, sender=SENDER, now=NOW))
    found = leaves(message)
    assert len(found["text/plain"]) == 1 and len(found["text/html"]) == 1
    assert "Winter Gala" in str(message["Subject"])
    text = found["text/plain"][0].get_content()
    assert "$" not in text  # every placeholder filled
    if kind == PAYMENT_FAILED:
        assert "your card was declined" in text and "charge_declined" not in text
        assert "image/png" not in found and "text/calendar" not in found
    if kind == REFUND_PROCESSED:
        assert "15.00 EUR" in text and "rf_1" in text
    if kind == EVENT_REMINDER:
        assert len(found["image/png"]) == 2 and len(found["text/calendar"]) == 1


def test_an_event_without_a_start_time_has_no_calendar_entry() -> None:
    message = build_message(notice(ORDER_CONFIRMED, order(1, starts=None)), sender=SENDER, now=NOW)
    assert "text/calendar" not in leaves(message)
    assert calendar_entry(order(1, starts=None), NOW, "waitroom.test") is None


def test_the_same_notification_builds_the_same_message_id_and_content_ids() -> None:
    first = build_message(notice(ORDER_CONFIRMED), sender=SENDER, now=NOW)
    again = build_message(notice(ORDER_CONFIRMED), sender=SENDER, now=NOW + timedelta(hours=1))
    assert first["Message-ID"] == again["Message-ID"]
    cids = [p["Content-ID"] for p in first.walk() if p.get_content_type() == "image/png"]
    assert cids == [p["Content-ID"] for p in again.walk() if p.get_content_type() == "image/png"]
    assert message_id("a:1", "x.test") != message_id("a:2", "x.test")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=300), st.text(max_size=200))
@example("back\\nslash, comma; semi\r\nline\rcr", "")
def test_calendar_lines_are_folded_to_75_octets_and_unfold_to_the_escaped_text(
    name: str, venue: str
) -> None:
    view = order(0, name=name)
    view = msgspec.structs.replace(view, event=msgspec.structs.replace(view.event, venue=venue))
    ics = calendar_entry(view, NOW, "waitroom.test")
    assert ics is not None and ics.endswith("\r\n")
    for line in ics.split("\r\n"):
        assert len(line.encode()) <= 75
    (summary,) = [line for line in unfold(ics) if line.startswith("SUMMARY:")]
    text = summary.removeprefix("SUMMARY:")
    unescaped = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], text)
    expected = name.replace("\r\n", "\n")
    assert unescaped == "".join(c for c in expected if c in "\t\n" or (c >= " " and c != "\x7f"))
    assert "\r" not in ics.replace("\r\n", "")


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=0.5, max_value=50),
    st.integers(min_value=1, max_value=5),
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=2), st.booleans()), min_size=1, max_size=60
    ),
)
def test_the_pacer_never_sends_more_than_burst_plus_rate_times_any_window(
    rate: float, burst: int, steps: list[tuple[float, bool]]
) -> None:
    pacer = Pacer(rate, burst)
    now, sends = 0.0, []
    for gap, idle in steps:
        now += gap
        wait = pacer.reserve(now)
        assert wait >= 0
        # The caller waits before sending (or finding nothing to send) and asking again.
        now += wait
        if idle:
            pacer.give_back()
        else:
            sends.append(now)
    sends.sort()
    for i, start in enumerate(sends):
        for j in range(i, len(sends)):
            window = sends[j] - start
            assert j - i + 1 <= burst + rate * window + 1e-6


def test_a_pacer_at_rest_sends_at_once() -> None:
    pacer = Pacer(2.0)
    assert pacer.reserve(10.0) == 0
    assert pacer.reserve(10.0) == pytest.approx(0.5)
    assert pacer.reserve(20.0) == 0
    pacer.give_back()  # nothing was due: the next send goes at once
    assert pacer.reserve(20.0) == 0


def test_fans_are_told_a_reason_never_the_internal_text() -> None:
    assert fan_reason("409 charge_declined") == "your card was declined"
    assert "expired" in fan_reason("hold expired; refunded")
    assert fan_reason("ProviderUnavailable: 10.0.0.7 said 503") == (
        "the payment could not be completed"
    )
    assert money(1050, "EUR") == "10.50 EUR" and money(5, "USD") == "0.05 USD"


def test_addresses_with_line_breaks_or_several_recipients_are_not_addresses() -> None:
    assert valid_address("fan@example.com")
    for bad in ("fan@example.com\r\nBcc: x@y.z", "a@b.c, d@e.f", "no-at-sign", "fan@localhost", ""):
        assert not valid_address(bad), bad


def test_the_confirm_body_takes_an_optional_validated_email() -> None:
    body = msgspec.json.decode(
        b'{"payment_method": "card_ok", "email": "fan+1@example.com"}', type=ConfirmRequest
    )
    assert body.email == "fan+1@example.com"
    assert msgspec.json.decode(b'{"payment_method": "card_ok"}', type=ConfirmRequest).email is None
    for bad in ("fan@example.com\nBcc: x@y.z", "fan@localhost", "a b@example.com", "@example.com"):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(
                msgspec.json.encode({"payment_method": "card_ok", "email": bad}),
                type=ConfirmRequest,
            )


def test_smtp_urls_name_the_server_credentials_and_tls() -> None:
    assert smtp_target("smtp://127.0.0.1:2525") == SmtpTarget("127.0.0.1", 2525)
    assert smtp_target("smtps://u%40x:p%3Aw@mail.example.com") == SmtpTarget(
        "mail.example.com", 465, "u@x", "p:w", use_tls=True
    )
    assert smtp_target("smtp://mail.example.com:587?starttls=1").start_tls is True
    settings_ = load_settings(
        {"WAITROOM_SMTP_URL": "smtp://127.0.0.1:25", "WAITROOM_EMAIL_FROM": SENDER}
    )
    assert settings_.smtp_url == "smtp://127.0.0.1:25" and settings_.email_from == SENDER
    for variable, value in (
        ("WAITROOM_SMTP_URL", "http://mail.example.com"),
        ("WAITROOM_EMAIL_FROM", "nobody"),
        ("WAITROOM_EMAIL_RATE_PER_S", "0"),
    ):
        with pytest.raises(SettingsError, match=variable):
            load_settings({variable: value})
