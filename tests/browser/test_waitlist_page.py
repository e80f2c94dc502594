"""The waiting page of a sold-out sale with its waitlist on, in headless Chromium (desktop and a
375 px phone): the fan is told it is on the waitlist, how many tickets came back and how many
fans are ahead, with no estimated wait; a ticket that comes back moves the count and the line.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.admission.support import join, me, wait_for
from tests.browser_support import Screen, assert_fits, visible_text
from tests.queue_support import fan_headers

pytestmark = pytest.mark.browser


def sale_with_a_waitlist(admin: httpx.Client) -> str:
    """An on-sale event of one ticket, one per fan, whose room keeps a waitlist once sold
    out; its fans are never dropped as abandoned while a test runs."""
    event_id = f"bw-{uuid.uuid4().hex[:10]}"
    response = admin.post(
        "/v1/admin/events",
        json={
            "id": event_id,
            "name": "The Midnight Echoes",
            "venue": "Paradiso, Amsterdam",
            "ticket_types": [
                {"name": "Standing", "quantity": 1, "price_minor": 4500, "currency": "EUR"}
            ],
            "room": {
                "rate_per_second": 50,
                "abandon_grace_s": 900,
                "per_fan_limit": 1,
                "waitlist": True,
            },
        },
    )
    assert response.status_code == 201, response.text
    return event_id


def test_a_waitlisted_fan_sees_the_tickets_that_came_back_and_no_estimated_wait(
    page: Page, client: httpx.Client, admin: httpx.Client, screen: Screen, tmp_path: Path
) -> None:
    event_id = sale_with_a_waitlist(admin)
    _, buyer = join(client, event_id)
    queue_pass = wait_for(lambda: me(client, event_id, buyer)["queue_pass"])
    headers = {**fan_headers(buyer), "X-Queue-Pass": queue_pass}
    hold = client.post(
        f"/v1/events/{event_id}/reservations",
        json={"ticket_type": "Standing", "quantity": 1},
        headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert hold.status_code == 201, hold.text  # the only ticket: sold out, for now
    wait_for(lambda: admin.get(f"/v1/admin/events/{event_id}/admission").json()["waitlisted"])
    # Two fans are on the waitlist before this one.
    ahead = [join(client, event_id) for _ in range(2)]
    assert me(client, event_id, ahead[1][1])["status"] == "waitlist"

    page.goto(f"/events/{event_id}")
    expect(page.locator("#notice-title")).to_have_text(
        "Sold out: you are on the waitlist", timeout=10_000
    )
    expect(page.locator("#progress-text")).to_have_text(
        "You are on the waitlist — 0 tickets have come back, 2 fans ahead of you."
    )
    expect(page.locator("#line-heading")).to_have_text("Your place on the waitlist")
    expect(page.locator("#position")).to_have_text("You are number 3 in line")
    expect(page.locator("#eta")).to_have_text("None on the waitlist")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    text = visible_text(page)
    for misleading in ("you are next", "% of the way", "minute", "estimating"):
        assert misleading not in text, (misleading, text)
    assert_fits(page)
    page.screenshot(path=tmp_path / f"waitlist-{screen.name}.png", full_page=True)

    # The ticket comes back: the first fan on the waitlist goes in, this one moves up.
    cancelled = client.delete(
        f"/v1/reservations/{hold.json()['id']}",
        headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert cancelled.status_code == 200, cancelled.text
    expect(page.locator("#progress-text")).to_have_text(
        "You are on the waitlist — 1 ticket has come back, 1 fan ahead of you.", timeout=10_000
    )
    expect(page.locator("#notice-text")).to_contain_text("1 ticket has come back")
    expect(page.locator("#position")).to_have_text("You are number 2 in line")
    assert me(client, event_id, ahead[0][1])["status"] == "admitted"
    assert me(client, event_id, ahead[1][1])["status"] == "waitlist"
