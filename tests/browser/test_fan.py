"""The fan's side in headless Chromium, on a desktop and on a 375 px phone (issue 15, 12-15):
a paused line, progress and a steady estimated wait, leaving the line, and the checkout's
declined payment, paid order and unknown event.

Like tests/checkout, the module runs the whole stack in a database of its own: a server with
admission loops, the payment workers and the mock payment provider. Fans stay in line because
a test pauses the sale or lets its cap on active shoppers stop it, never by a fake.
"""

from __future__ import annotations

import itertools
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.admission.support import join, me, wait_for
from tests.browser_support import (
    Screen,
    assert_fits,
    browser_context,
    visible_text,
)
from tests.harness import ServerThread
from tests.queue_support import fan_headers

pytestmark = pytest.mark.browser

#: What the waiting page says when the line stands still (waiting.js, STALLED_TEXT).
STALL_REASON = "the sale is limiting how many fans shop at once"
#: A wait as the page words it: a range or a rough figure, never seconds.
WAIT_TEXT = re.compile(
    r"^(less than a minute|up to \d+ minutes?|about \d+ minutes?|\d+\u2013\d+ minutes"
    r"|unknown while the line is not moving)$"
)


def create_sale(
    admin: httpx.Client, *, rate: float = 50.0, max_active: int = 1000, quantity: int = 20
) -> str:
    """An on-sale event; its fans are never dropped as abandoned while a test runs."""
    event_id = f"bf-{uuid.uuid4().hex[:10]}"
    response = admin.post(
        "/v1/admin/events",
        json={
            "id": event_id,
            "name": "The Midnight Echoes",
            "venue": "Paradiso, Amsterdam",
            "ticket_types": [
                {"name": "Standing", "quantity": quantity, "price_minor": 4500, "currency": "EUR"}
            ],
            "room": {"rate_per_second": rate, "max_active": max_active, "abandon_grace_s": 900},
        },
    )
    assert response.status_code == 201, response.text
    return event_id


def set_admission(admin: httpx.Client, event_id: str, **fields: Any) -> None:
    response = admin.patch(f"/v1/admin/events/{event_id}/admission", json=fields)
    assert response.status_code == 200, response.text


def line_stats(admin: httpx.Client, event_id: str) -> dict[str, Any]:
    """The live side of the sale (fans waiting, admitted...), as operators see it."""
    response = admin.get(f"/v1/admin/events/{event_id}/stats")
    assert response.status_code == 200, response.text
    live: dict[str, Any] = response.json()["extra"]["admission"]
    return live


def waiting(admin: httpx.Client, event_id: str) -> int:
    count: int = line_stats(admin, event_id)["fans_waiting"]
    return count


def admitted(admin: httpx.Client, event_id: str) -> int:
    count: int = line_stats(admin, event_id)["admitted_total"]
    return count


# --- 12: a paused line ------------------------------------------------------------------------


def assert_paused_page(page: Page) -> None:
    expect(page.locator("#notice-title")).to_have_text("The line is paused", timeout=5_000)
    expect(page.locator("#position")).to_have_text("You are number 1 in line")  # place kept
    expect(page.locator("#ahead")).to_have_text("No one")
    expect(page.locator("#eta")).to_have_text("None while the line is paused")
    expect(page.locator("#progress-text")).to_have_text("The line is paused: you keep your place.")
    text = visible_text(page)
    for misleading in ("you are next", "% of the way", "less than a minute", "estimating"):
        assert misleading not in text, (misleading, text)


def test_a_paused_line_says_so_and_gives_no_estimated_wait(
    page: Page, client: httpx.Client, admin: httpx.Client, screen: Screen, tmp_path: Path
) -> None:
    # Two shoppers fill the cap, so the fan stays first in line with a known admission rate.
    event_id = create_sale(admin, rate=5, max_active=2)
    for _ in range(2):
        join(client, event_id)
    wait_for(lambda: admitted(admin, event_id) == 2, every=0.25)
    page.goto(f"/events/{event_id}")
    expect(page.locator("#position")).to_have_text("You are number 1 in line")
    expect(page.locator("#ahead")).to_have_text("No one: you are next")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    set_admission(admin, event_id, paused=True)
    assert_paused_page(page)
    assert_fits(page)
    page.screenshot(path=tmp_path / f"paused-{screen.name}.png", full_page=True)

    # Opened while paused: the join answers "paused", and the page says the same.
    page.reload()
    assert_paused_page(page)

    set_admission(admin, event_id, paused=False)
    expect(page.locator("#notice")).to_be_hidden(timeout=5_000)
    expect(page.locator("#ahead")).to_have_text("No one: you are next")
    expect(page.locator("#eta")).to_have_text(WAIT_TEXT)
    expect(page.locator("#progress-text")).to_have_text("0% of the way to the front")


# --- 13: progress and a steady estimated wait --------------------------------------------------


def test_progress_follows_the_fans_own_advance_and_a_stalled_line_says_why(
    page: Page, client: httpx.Client, admin: httpx.Client, screen: Screen, tmp_path: Path
) -> None:
    event_id = create_sale(admin, rate=4, max_active=4)
    set_admission(admin, event_id, paused=True)
    for _ in range(10):
        join(client, event_id)
    page.goto(f"/events/{event_id}")
    expect(page.locator("#position")).to_have_text("You are number 11 in line")
    expect(page.locator("#progress")).to_have_attribute("value", "0")

    set_admission(admin, event_id, paused=False)
    # Four fans ahead go in (the cap on active shoppers), then nobody more.
    expect(page.locator("#position")).to_have_text("You are number 7 in line", timeout=10_000)
    # 4 of the 11 places from where this fan joined.
    expect(page.locator("#progress")).to_have_attribute("value", "36")
    expect(page.locator("#progress-text")).to_have_text(
        "36% of the way to the front: up 4 places so far"
    )
    expect(page.locator("#eta")).to_have_text(WAIT_TEXT)

    # The line stands still: the page says why instead of showing the same number mutely.
    note = page.locator("#eta-note")
    expect(note).to_contain_text(STALL_REASON, timeout=25_000)
    expect(note).to_be_visible()
    expect(page.locator("#position")).to_have_text("You are number 7 in line")
    expect(page.locator("#eta")).to_have_text(WAIT_TEXT)
    assert_fits(page)
    page.screenshot(path=tmp_path / f"stalled-{screen.name}.png", full_page=True)


ESTIMATE_SCRIPT = """
async () => {
  const { WaitEstimate, formatWaitRange } = await import("/static/common.js");
  const wait = new WaitEstimate();
  const steps = [];
  let t = 0;
  const feed = (figure, truth) => {
    t += 2000;
    const r = wait.update(figure, t);
    steps.push({
      t: t / 1000,
      truth,
      low: r.low,
      high: r.high,
      change: r.change,
      text: formatWaitRange(r.low, r.high),
    });
  };
  // A line moving at one fan a second, 180 fans ahead; the server's figure wobbles ±30 %.
  const wobble = [1.0, 1.3, 0.75, 1.2, 0.8, 1.25, 0.7, 1.1, 0.9, 1.3];
  for (let i = 0; i < 30; i += 1) {
    const truth = 180 - 2 * (i + 1);
    feed(truth * wobble[i % wobble.length], truth);
  }
  // Then admission slows down six-fold (the cap on active shoppers): 120 s become 720 s.
  for (let i = 0; i < 60; i += 1) {
    const truth = 720 - 2 * i;
    feed(truth, truth);
  }
  return {
    steps,
    unknown: wait.update(null, t + 2000),
    texts: [
      [10, 50], [100, 140], [20, 100], [300, 480], [4200, 6000], [null, null],
    ].map(([low, high]) => formatWaitRange(low, high)),
  };
}
"""


def spread(step: dict[str, Any]) -> float:
    """How many times the top of a shown range is its bottom."""
    return float(step["high"]) / float(step["low"])


def test_the_estimated_wait_is_steady_a_range_and_tells_when_it_jumps(
    browser: Browser, server: ServerThread
) -> None:
    with browser_context(browser, server.url) as context:
        page = context.new_page()
        page.goto("/healthz")
        result = page.evaluate(ESTIMATE_SCRIPT)
    steps: list[dict[str, Any]] = result["steps"]
    steady, slowed = steps[:30], steps[30:]

    # A wobbling figure gives a steady text: it follows the wait down, not every wobble.
    texts = [step["text"] for step in steady]
    changes_of_text = sum(1 for a, b in itertools.pairwise(texts) if a != b)
    assert changes_of_text <= 3, texts
    assert all(step["change"] is None for step in steady), steady
    for step in steady[5:]:
        assert step["low"] <= step["truth"] <= step["high"], step
        assert step["high"] > step["low"] * 1.3  # a range, not a falsely precise figure

    # A jump shows gradually, and the page is told at once that (and which way) it moved.
    first = slowed[0]
    assert first["high"] < 300, first  # not "12 minutes" at the first word
    told = [i for i, step in enumerate(slowed) if step["change"] is not None]
    assert told and told[0] <= 5, told  # within ten seconds of the jump
    assert {slowed[i]["change"] for i in told} == {"longer"}
    # While it moves, the range widens: the page is less sure, and shows it.
    assert max(spread(step) for step in slowed[:20]) > 1.2 * spread(steady[-1])
    settled = slowed[45:]
    assert all(step["low"] <= step["truth"] <= step["high"] for step in settled), settled
    assert result["unknown"] is None
    assert result["texts"] == [
        "less than a minute",
        "about 2 minutes",
        "up to 2 minutes",
        "5\u20138 minutes",
        "1 h 10 min \u2013 1 h 40 min",
        "estimating…",
    ]


# --- 14: leaving the line ----------------------------------------------------------------------


def test_a_fan_leaves_the_line_from_the_page_after_confirming(
    page: Page, client: httpx.Client, admin: httpx.Client, screen: Screen, tmp_path: Path
) -> None:
    event_id = create_sale(admin)
    set_admission(admin, event_id, paused=True)  # nobody goes in while the test looks
    for _ in range(2):
        join(client, event_id)
    page.goto(f"/events/{event_id}")
    expect(page.locator("#position")).to_have_text("You are number 3 in line")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    leave = page.get_by_role("button", name="Leave the line")
    leave.click()
    confirm = page.locator("#leave-confirm")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text("You give up your place")
    stay = page.get_by_role("button", name="Stay in line")
    expect(stay).to_be_focused()  # the safe answer is the default
    assert_fits(page)
    page.screenshot(path=tmp_path / f"leave-confirm-{screen.name}.png", full_page=True)
    assert waiting(admin, event_id) == 3  # asking is not leaving

    stay.click()
    expect(confirm).to_be_hidden()
    expect(leave).to_be_focused()
    expect(page.locator("#position")).to_have_text("You are number 3 in line")
    assert waiting(admin, event_id) == 3

    leave.click()
    page.get_by_role("button", name="Yes, leave the line").click()
    expect(page.locator("#notice-title")).to_have_text("You left the line")
    expect(page.locator("#notice-text")).to_contain_text("Joining again puts you at the back")
    expect(page.locator("#line")).to_be_hidden()
    expect(page.locator("#leave")).to_be_hidden()
    expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
    wait_for(lambda: waiting(admin, event_id) == 2, every=0.25)
    assert_fits(page)
    page.screenshot(path=tmp_path / f"left-{screen.name}.png", full_page=True)

    # The server closes the socket of a fan no longer in line at its next tick: the page
    # neither takes the place back with its receipt nor calls the fan "dropped".
    page.wait_for_timeout(2_500)
    expect(page.locator("#notice-title")).to_have_text("You left the line")
    # Reloading shows the same, without quietly taking a new place.
    page.reload()
    expect(page.locator("#notice-title")).to_have_text("You left the line")
    page.wait_for_timeout(1_000)
    assert waiting(admin, event_id) == 2

    page.get_by_role("button", name="Join the line again").click()
    expect(page.locator("#position")).to_have_text("You are number 3 in line")  # at the back
    expect(leave).to_be_visible()
    assert waiting(admin, event_id) == 3


# --- 15: checkout --------------------------------------------------------------------------------


def through_the_line(page: Page, event_id: str) -> None:
    """Open the waiting page and ride the line into checkout."""
    page.goto(f"/events/{event_id}")
    page.wait_for_url(f"**/events/{event_id}/checkout", timeout=15_000)
    expect(page.locator("#reserve-section")).to_be_visible()


#: Counts, at every change of the page, the places that show "Processing your payment…".
WATCH_PROCESSING = """
() => {
  window.processingShownMax = 0;
  const count = () => {
    let shown = 0;
    for (const element of document.querySelectorAll("body *")) {
      if (element.children.length > 0 || element.closest(".visually-hidden")) continue;
      if (!element.textContent.includes("Processing your payment")) continue;
      if (element.checkVisibility()) shown += 1;
    }
    window.processingShownMax = Math.max(window.processingShownMax, shown);
  };
  new MutationObserver(count).observe(document.body, {
    subtree: true, childList: true, characterData: true, attributes: true,
  });
}
"""


def test_a_declined_payment_is_retried_with_the_normal_card_and_a_paid_order_stays_put(
    page: Page, admin: httpx.Client, screen: Screen, tmp_path: Path
) -> None:
    event_id = create_sale(admin)
    through_the_line(page, event_id)
    page.get_by_label("Ticket type").select_option("Standing")
    page.get_by_label("Quantity").select_option("1")
    page.get_by_role("button", name="Reserve").click()
    expect(page.locator("#hold-section")).to_be_visible()

    page.evaluate(WATCH_PROCESSING)
    page.locator("input[value=card_declined]").check()
    page.get_by_role("button", name="Pay €45.00").click()
    expect(page.locator("#message-title")).to_have_text("Payment failed", timeout=15_000)
    assert page.evaluate("window.processingShownMax") == 1  # said once, not twice
    # The declining test card was a one-off: the normal card is selected again.
    expect(page.locator("input[value=card]")).to_be_checked()
    expect(page.locator("input[value=card_declined]")).not_to_be_checked()
    assert_fits(page)
    page.screenshot(path=tmp_path / f"declined-{screen.name}.png", full_page=True)

    page.get_by_role("button", name="Try payment again").click()  # no other choice made
    expect(page.locator("#tickets .ticket-code")).to_have_count(1, timeout=15_000)
    expect(page.locator("#message-title")).to_have_text("Payment complete")
    # Paid: no way "back to the waiting line", which would only bounce back here.
    back = page.get_by_role("link", name="Back to the waiting line")
    expect(back).to_be_hidden()
    assert "waiting line" not in visible_text(page)
    assert_fits(page)
    page.screenshot(path=tmp_path / f"paid-{screen.name}.png", full_page=True)

    page.reload()
    expect(page.locator("#tickets .ticket-code")).to_have_count(1)
    expect(page.locator("#pass-clock")).to_have_text("Order paid")
    expect(back).to_be_hidden()


def test_tickets_only_held_by_others_are_not_called_sold_out_and_are_asked_for_again(
    page: Page, client: httpx.Client, admin: httpx.Client, screen: Screen, tmp_path: Path
) -> None:
    """Issue 15, 9: while the tickets left are held by fans who may not pay, the page says
    so (not "sold out") and asks again by itself; once they come back, the fan gets them."""
    event_id = create_sale(admin, quantity=2)
    _, token = join(client, event_id)
    wait_for(lambda: me(client, event_id, token)["status"] == "admitted")
    queue_pass = me(client, event_id, token)["queue_pass"]
    headers = {**fan_headers(token), "X-Queue-Pass": queue_pass}
    held = client.post(
        f"/v1/events/{event_id}/reservations",
        json={"ticket_type": "Standing", "quantity": 2},
        headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert held.status_code == 201, held.text

    through_the_line(page, event_id)
    page.get_by_label("Ticket type").select_option("Standing")
    page.get_by_label("Quantity").select_option("1")
    page.get_by_role("button", name="Reserve").click()
    expect(page.locator("#message-title")).to_have_text("All tickets are held right now")
    assert "sold out" not in visible_text(page).lower()
    assert_fits(page)
    page.screenshot(path=tmp_path / f"held-{screen.name}.png", full_page=True)

    # The other fan lets the tickets go: the page's next try gets one, with nothing clicked.
    gone = client.delete(f"/v1/reservations/{held.json()['id']}", headers=headers)
    assert gone.status_code == 200, gone.text
    expect(page.locator("#hold-section")).to_be_visible(timeout=15_000)


@pytest.mark.parametrize("path", ["/events/nope", "/events/nope/checkout"])
def test_an_unknown_event_gets_one_friendly_message(page: Page, path: str) -> None:
    page.goto(path)
    expect(page.locator("#event-name")).to_have_text("No such event")
    friendly = page.locator(".notice p").filter(has_text="There is no event at this address")
    expect(friendly).to_be_visible()
    text = visible_text(page)
    assert text.count("No such event") == 1, text
    assert text.count("There is no event at this address") == 1, text
    assert "no event 'nope'" not in text and "nope" not in text, text
    expect(page.get_by_role("link", name="Back to the waiting line")).to_be_hidden()
    assert_fits(page)
