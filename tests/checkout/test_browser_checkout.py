"""The whole path in headless Chromium: the waiting page, admission, the checkout page, tickets.

As tests/test_checkout.py: a real server with admission loops, the real payment workers and
the mock payment provider as its own HTTP service, in a database of this module's own.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect

from tests.browser_support import browser_context, chromium
from tests.harness import (
    ADMIN_TOKEN,
    ServerThread,
    WorkersThread,
)

pytestmark = pytest.mark.browser


@pytest.fixture
def admin(server: ServerThread, workers: WorkersThread) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=10, headers=headers) as c:
        yield c


@pytest.fixture(scope="module")
def browser(workers: WorkersThread) -> Iterator[Browser]:
    # After the server fixtures and before their teardown: Playwright's sync API keeps an
    # event loop running in this thread, where the harness's asyncio.run() cannot work.
    with chromium() as value:
        yield value


@pytest.fixture
def page(browser: Browser, server: ServerThread) -> Iterator[Page]:
    with browser_context(browser, server.url) as context:
        yield context.new_page()


def create_show(admin: httpx.Client, **room: Any) -> str:
    """An on-sale event with two ticket types, admitting fans at once."""
    event_id = f"bc-{uuid.uuid4().hex[:10]}"
    response = admin.post(
        "/v1/admin/events",
        json={
            "id": event_id,
            "name": "The Midnight Echoes",
            "venue": "Paradiso, Amsterdam",
            "ticket_types": [
                {"name": "Standing", "quantity": 20, "price_minor": 4500, "currency": "EUR"},
                {
                    "name": "Seated",
                    "quantity": 6,
                    "price_minor": 7950,
                    "currency": "EUR",
                    "per_fan_limit": 3,
                },
            ],
            "room": {"rate_per_second": 50, **room},
        },
    )
    assert response.status_code == 201, response.text
    return event_id


def stats(admin: httpx.Client, event_id: str) -> dict[str, Any]:
    body: dict[str, Any] = admin.get(f"/v1/admin/events/{event_id}/stats").json()
    return body


def through_the_line(page: Page, event_id: str) -> None:
    """Open the waiting page and ride the line into checkout."""
    page.goto(f"/events/{event_id}")
    expect(page.locator("#event-name")).to_have_text("The Midnight Echoes")
    page.wait_for_url(f"**/events/{event_id}/checkout", timeout=15_000)
    expect(page.locator("#event-name")).to_have_text("The Midnight Echoes")
    expect(page.locator("#reserve-section")).to_be_visible()
    stored = page.evaluate(f"sessionStorage.getItem('waitroom:pass:{event_id}')")
    assert stored and '"pass":"ey' in stored


def reserve(page: Page, ticket_type: str, quantity: int) -> None:
    page.get_by_label("Ticket type").select_option(ticket_type)
    page.get_by_label("Quantity").select_option(str(quantity))
    page.get_by_role("button", name="Reserve").click()
    expect(page.locator("#hold-section")).to_be_visible()


def test_a_fan_goes_from_the_waiting_page_to_tickets(
    page: Page, admin: httpx.Client, tmp_path: Path
) -> None:
    event_id = create_show(admin)
    through_the_line(page, event_id)

    # The quantity is bounded by the ticket type's per-fan limit (3 for Seated).
    page.get_by_label("Ticket type").select_option("Seated")
    quantities = page.locator("#quantity option").all_inner_texts()
    assert quantities == ["1", "2", "3"]
    expect(page.locator("#quantity-hint")).to_have_text("Up to 3 tickets per fan.")

    reserve(page, "Seated", 2)
    expect(page.locator("#hold-summary")).to_have_text("2 \u00d7 Seated tickets, €159.00 in total")
    expect(page.locator("#pay")).to_have_text("Pay €159.00")
    countdown = page.locator("#countdown")
    expect(countdown).to_have_text(re.compile(r"^(9|10):\d\d$"))  # the default 600 s hold
    first = countdown.inner_text()
    expect(countdown).not_to_have_text(first, timeout=3_000)  # it counts down, live
    assert stats(admin, event_id)["held"] == 2
    expect(page.locator("#ticket-types")).to_contain_text("4 left")  # 6 Seated, 2 held
    page.screenshot(path=tmp_path / "checkout-hold.png", full_page=True)

    page.get_by_label("card · a test card that is accepted").check()
    page.get_by_role("button", name="Pay €159.00").click()
    tickets = page.locator("#tickets .ticket-code")
    expect(tickets).to_have_count(2, timeout=15_000)
    expect(page.locator("#message-title")).to_have_text("Payment complete")
    expect(page.locator("#hold-section")).to_be_hidden()
    codes = tickets.all_inner_texts()
    assert len(set(codes)) == 2 and all(len(code) >= 16 for code in codes)
    # Each ticket shows its QR code (the signed ticket, loaded with the visitor cookie).
    qr = page.locator("#tickets img.ticket-qr")
    expect(qr).to_have_count(2)
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.ticket-qr')].every((i) => i.naturalWidth > 0)"
    )
    page.screenshot(path=tmp_path / "checkout-paid.png", full_page=True)

    counts = stats(admin, event_id)
    assert (counts["sold"], counts["held"]) == (2, 0)

    # Reloading shows the same tickets again (from the fan's orders).
    page.reload()
    expect(page.locator("#tickets .ticket-code")).to_have_count(2)
    assert sorted(page.locator("#tickets .ticket-code").all_inner_texts()) == sorted(codes)
    expect(page.locator("#reserve-section")).to_be_hidden()  # the pass is spent


def test_a_hold_confirmed_before_its_order_is_paid_is_followed_to_the_tickets(
    page: Page, admin: httpx.Client
) -> None:
    # The event's actor marks the hold paid a moment before the payment worker writes the
    # paid order with its tickets. A page that reads the reservation in between (the
    # confirm's answer, when the workers are quick) must keep following the payment, not
    # announce "Payment complete" with no tickets. The confirm's answer is made to land in
    # that moment, every time.
    event_id = create_show(admin)
    through_the_line(page, event_id)
    reserve(page, "Standing", 2)
    answered: list[dict[str, Any]] = []

    def in_between(route: Route) -> None:
        body = route.fetch().json()
        body.update(status="paid", order_status="awaiting_payment", tickets=[])
        body["payment"]["state"] = "processing"
        answered.append(body)
        route.fulfill(status=202, json=body)

    page.route("**/v1/reservations/*/confirm", in_between)
    page.get_by_role("button", name="Pay €90.00").click()
    expect(page.locator("#tickets .ticket-code")).to_have_count(2, timeout=15_000)
    expect(page.locator("#message-title")).to_have_text("Payment complete")
    assert len(answered) == 1
    assert stats(admin, event_id)["sold"] == 2


def test_a_declined_payment_can_be_retried_from_the_page(page: Page, admin: httpx.Client) -> None:
    event_id = create_show(admin)
    through_the_line(page, event_id)
    reserve(page, "Standing", 1)

    page.locator("input[value=card_declined]").check()
    page.get_by_role("button", name="Pay €45.00").click()
    expect(page.locator("#message-title")).to_have_text("Payment failed", timeout=15_000)
    expect(page.locator("#message-text")).to_contain_text("declined")
    expect(page.locator("#hold-section")).to_be_visible()  # the hold stays
    expect(page.locator("#pay")).to_have_text("Try payment again")
    expect(page.locator("#pay")).to_be_enabled()

    page.locator("input[value=card]").check()
    page.get_by_role("button", name="Try payment again").click()
    expect(page.locator("#tickets .ticket-code")).to_have_count(1, timeout=15_000)
    expect(page.locator("#message-title")).to_have_text("Payment complete")
    assert stats(admin, event_id)["sold"] == 1


def test_cancelling_releases_the_hold_and_the_pass_does_not_reserve_again(
    page: Page, admin: httpx.Client
) -> None:
    event_id = create_show(admin)
    through_the_line(page, event_id)
    reserve(page, "Standing", 4)
    assert stats(admin, event_id)["held"] == 4

    page.get_by_role("button", name="Cancel and release the tickets").click()
    expect(page.locator("#message-title")).to_have_text("Hold released")
    expect(page.locator("#message-text")).to_contain_text("cannot reserve again")
    # One hold cycle per pass: no reserve form to lock the tickets away again.
    expect(page.locator("#reserve-section")).to_be_hidden()
    assert stats(admin, event_id)["held"] == 0

    # Even after a reload (the form is back), the server refuses the pass.
    page.reload()
    expect(page.locator("#reserve-section")).to_be_visible()
    page.get_by_label("Ticket type").select_option("Standing")
    page.get_by_role("button", name="Reserve").click()
    expect(page.locator("#message-title")).to_have_text("Your queue pass cannot be used")
    assert stats(admin, event_id)["held"] == 0


def test_an_expired_hold_puts_the_tickets_back_and_ends_the_pass(
    page: Page, admin: httpx.Client
) -> None:
    event_id = create_show(admin, hold_ttl_s=10)
    through_the_line(page, event_id)
    reserve(page, "Standing", 1)
    started = time.monotonic()
    expect(page.locator("#countdown")).to_have_text(re.compile(r"^0:(0\d|10)$"))
    # The 10 s hold runs out while the fan looks at it.
    expect(page.locator("#message-title")).to_have_text("Your hold expired", timeout=15_000)
    assert time.monotonic() - started >= 5
    expect(page.locator("#message-text")).to_contain_text("cannot reserve again")
    expect(page.locator("#reserve-section")).to_be_hidden()
