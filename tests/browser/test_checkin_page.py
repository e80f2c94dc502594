"""The door staff's check-in page in headless Chromium, on a desktop and on a 375 px phone
(issue 18, item 4): sign in with a staff token and a gate, paste a fan's signed ticket (what a
scanner types) or type its code, and read the verdict: valid, already used (when and where),
invalid, wrong event. The fan bought the tickets through the real API."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import msgspec
import pytest
from playwright.sync_api import Page, expect

from tests.admission.support import create_event
from tests.browser_support import Screen, assert_fits
from tests.checkout.test_checkout import Fan
from tests.harness import ServerThread, cleanup, fresh_settings
from waitroom.core.settings import Settings

pytestmark = pytest.mark.browser

STAFF_TOKEN = "door-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, provider: ServerThread
) -> Iterator[Settings]:
    """The browser stack's settings plus a door staff's token (``staff:gatekeeper``)."""
    value = fresh_settings(
        tmp_path_factory.mktemp("checkin-page-run"),
        admission_loop=True,
        payment_url=provider.url,
        staff_tokens=(f"gatekeeper:{STAFF_TOKEN}",),
    )
    value = msgspec.structs.replace(value, payment_timeout_s=1.0)
    try:
        yield value
    finally:
        cleanup(value)


def buy(
    client: httpx.Client, admin: httpx.Client, quantity: int
) -> tuple[str, list[dict[str, str]]]:
    """A fan's paid tickets: (event id, tickets with code and signed token)."""
    event_id = create_event(admin, rate=50, quantity=10, prefix="gate")
    fan = Fan(client, event_id)
    fan.wait_for_pass()
    hold = fan.reserve(quantity=quantity).json()
    assert fan.confirm(hold["id"]).status_code == 202
    paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    return event_id, paid["tickets"]


def scan(page: Page, text: str) -> None:
    page.fill("#ticket", text)
    page.click("#check")


def test_door_staff_check_tickets_in_from_the_page(
    page: Page, client: httpx.Client, admin: httpx.Client, screen: Screen
) -> None:
    event_id, tickets = buy(client, admin, 2)
    page.goto("/checkin")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#scan")).to_be_hidden()
    page.fill("#token", STAFF_TOKEN)
    page.fill("#gate", "north-1")
    page.fill("#event", event_id)
    page.click("#login-button")
    expect(page.locator("#scan")).to_be_visible()
    expect(page.locator("#where")).to_have_text(f"Gate: north-1 · Event: {event_id}")

    result, title, detail = (
        page.locator("#result"),
        page.locator("#result-title"),
        page.locator("#result-detail"),
    )
    # The QR code's text, as a scanner in keyboard mode types it.
    scan(page, tickets[0]["token"])
    expect(title).to_have_text("VALID: WELCOME")
    expect(result).to_have_attribute("data-verdict", "ok")
    expect(detail).to_contain_text(tickets[0]["code"])
    expect(page.locator("#ticket")).to_have_value("")

    # The same ticket again, typed by its code: refused, saying where it was first used.
    scan(page, tickets[0]["code"])
    expect(title).to_have_text("ALREADY USED")
    expect(result).to_have_attribute("data-verdict", "refused")
    expect(detail).to_contain_text("at north-1 by staff:gatekeeper")

    # A tampered ticket.
    head, body, signature = tickets[1]["token"].split(".")
    scan(page, f"{head}.{body}.{signature[::-1]}")
    expect(title).to_have_text("INVALID TICKET")

    # The second ticket, typed.
    scan(page, tickets[1]["code"])
    expect(title).to_have_text("VALID: WELCOME")
    assert_fits(page)

    # Another event's ticket at this door.
    _, others = buy(client, admin, 1)
    scan(page, others[0]["token"])
    expect(title).to_have_text("WRONG EVENT")

    # Signing out forgets the token; a wrong one is told at the first scan.
    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", "not-a-staff-token-" + secrets.token_hex(8))
    page.click("#login-button")
    scan(page, others[0]["code"])
    expect(title).to_have_text("NOT SIGNED IN")
    expect(page.locator("#scan")).to_be_visible()
