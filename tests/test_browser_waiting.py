"""The waiting page in headless Chromium: the place in line, live, and what it says when.

The module's server runs without admission loops (tests/conftest.py), so fans stay in line
for as long as a test needs them there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest
from playwright.sync_api import Browser, Page, WebSocketRoute, expect

from tests.admission.support import join
from tests.browser_support import browser_context, chromium
from tests.harness import ADMIN_TOKEN, ServerThread, running, sync_redis
from tests.queue_support import create_event, fan_headers
from waitroom.core.settings import Settings

pytestmark = pytest.mark.browser
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[ServerThread]:
    """The module's server with proof-of-work on, as in production: the page solves it."""
    with running(msgspec.structs.replace(settings, challenge=True)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(server: ServerThread) -> Iterator[Browser]:
    # After the server fixtures and before their teardown: Playwright's sync API keeps an
    # event loop running in this thread, where the harness's asyncio.run() cannot work.
    with chromium() as value:
        yield value


@pytest.fixture
def page(browser: Browser, server: ServerThread) -> Iterator[Page]:
    with browser_context(browser, server.url) as context:
        yield context.new_page()


def leave(client: httpx.Client, event_id: str, token: str) -> None:
    response = client.delete(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))
    assert response.status_code == 200, response.text


def test_the_page_shows_the_place_in_line_and_follows_fans_ahead_leaving(
    page: Page, client: httpx.Client, admin: httpx.Client, tmp_path: Path
) -> None:
    event_id = create_event(admin, prefix="bw")
    ahead = [join(client, event_id) for _ in range(3)]

    page.goto(f"/events/{event_id}")
    expect(page.locator("#event-name")).to_have_text("Queue test")
    expect(page.locator("#ticket-types")).to_contain_text("ga")
    expect(page.locator("#ticket-types")).to_contain_text("€10.00")
    expect(page.locator("#position")).to_have_text("You are number 4 in line")
    expect(page.locator("#ahead")).to_have_text("3 fans")
    expect(page.locator("#eta")).to_have_text("estimating…")  # nobody admitted yet
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#progress")).to_have_attribute("value", "0")
    announcer = page.locator("#announcer[aria-live=polite]")
    expect(announcer).to_contain_text("You are number 4 in line")
    page.screenshot(path=tmp_path / "waiting.png", full_page=True)

    for _, token in ahead[:2]:
        leave(client, event_id, token)
    # The broadcaster ticks every second; the WebSocket carries the new place.
    expect(page.locator("#position")).to_have_text("You are number 2 in line", timeout=5_000)
    expect(page.locator("#ahead")).to_have_text("1 fan")
    expect(page.locator("#progress")).to_have_attribute("value", "50")  # from 4th to 2nd
    # Screen readers hear it too, once the announcer's throttle (5 s near the front) allows.
    expect(announcer).to_contain_text("You are number 2 in line", timeout=8_000)

    leave(client, event_id, ahead[2][1])
    expect(page.locator("#ahead")).to_have_text("No one: you are next", timeout=5_000)
    expect(page.locator("#position")).to_have_text("You are number 1 in line")

    paused = admin.patch(f"/v1/admin/events/{event_id}/admission", json={"paused": True})
    assert paused.status_code == 200, paused.text
    expect(page.locator("#notice-title")).to_have_text("The line is paused", timeout=5_000)
    expect(page.locator("#position")).to_have_text("You are number 1 in line")  # place kept
    expect(page.locator("#eta")).to_have_text("None while the line is paused")
    page.screenshot(path=tmp_path / "waiting-paused.png", full_page=True)
    resumed = admin.patch(f"/v1/admin/events/{event_id}/admission", json={"paused": False})
    assert resumed.status_code == 200, resumed.text
    expect(page.locator("#notice")).to_be_hidden(timeout=5_000)


def test_reloading_keeps_the_place_and_the_progress(
    page: Page, client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, prefix="bw")
    ahead = [join(client, event_id) for _ in range(2)]
    page.goto(f"/events/{event_id}")
    expect(page.locator("#position")).to_have_text("You are number 3 in line")
    leave(client, event_id, ahead[0][1])
    expect(page.locator("#position")).to_have_text("You are number 2 in line", timeout=5_000)

    page.reload()
    # The same visitor (cookie) keeps the same place; the bar still starts from 3rd.
    expect(page.locator("#position")).to_have_text("You are number 2 in line")
    expect(page.locator("#progress")).to_have_attribute("value", "33")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def test_when_the_websocket_keeps_failing_the_page_polls(
    page: Page, client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, prefix="bw")
    ahead = [join(client, event_id) for _ in range(2)]
    attempts: list[str] = []

    def refuse(ws: WebSocketRoute) -> None:
        attempts.append(ws.url)
        ws.close(code=1011, reason="proxy says no")

    page.route_web_socket(re.compile(r".*/queue/ws.*"), refuse)
    page.goto(f"/events/{event_id}")
    expect(page.locator("#position")).to_have_text("You are number 3 in line")
    expect(page.locator("#connection")).to_have_attribute("data-state", "polling", timeout=8_000)
    expect(page.locator("#connection-text")).to_contain_text("Polling")
    assert len(attempts) >= 3
    # Each attempt brings a new one-time ticket; no token ever travels in the URL.
    tickets = {url.partition("?ticket=")[2] for url in attempts}
    assert len(tickets) == len(attempts) and "" not in tickets
    assert not any("token=" in url for url in attempts)

    leave(client, event_id, ahead[0][1])
    # GET .../queue/me every 2 s.
    expect(page.locator("#position")).to_have_text("You are number 2 in line", timeout=6_000)


def test_a_fourth_tab_of_the_same_fan_takes_over_the_oldest_tabs_live_updates(
    browser: Browser, server: ServerThread, admin: httpx.Client
) -> None:
    event_id = create_event(admin, prefix="bw")
    with browser_context(browser, server.url) as context:
        tabs = []
        for _ in range(4):  # one more than WAITROOM_WS_MAX_PER_FAN
            tab = context.new_page()
            tab.goto(f"/events/{event_id}")
            expect(tab.locator("#connection")).to_have_attribute("data-state", "live")
            tabs.append(tab)
        oldest = tabs[0]
        # Closed with 4409: the oldest tab says so and does not fight back by reconnecting.
        expect(oldest.locator("#notice-title")).to_have_text("Open in another tab")
        expect(oldest.locator("#connection")).to_have_attribute("data-state", "closed")
        for tab in tabs[1:]:
            expect(tab.locator("#connection")).to_have_attribute("data-state", "live")
        oldest.get_by_role("button", name="Watch here").click()
        expect(oldest.locator("#connection")).to_have_attribute("data-state", "live")
        expect(oldest.locator("#notice")).to_be_hidden()
        expect(oldest.locator("#position")).to_have_text("You are number 1 in line")
        # Now the second tab is the oldest, and it yields in turn.
        expect(tabs[1].locator("#notice-title")).to_have_text("Open in another tab")


def test_before_a_lottery_opens_the_page_shows_the_draw_and_its_commitment(
    page: Page, admin: httpx.Client
) -> None:
    opens_at = datetime.now(UTC) + timedelta(hours=1)
    event_id = create_event(admin, mode="lottery", opens_at=opens_at, prefix="bw")
    commitment = admin.get(f"/v1/events/{event_id}/lottery").json()["commitment"]
    page.goto(f"/events/{event_id}")
    expect(page.locator("#lottery")).to_be_visible()
    expect(page.locator("#lottery-opens")).to_contain_text("The draw happens when the sale opens")
    expect(page.locator("#commitment")).to_have_text(commitment)
    expect(page.locator("#line")).to_be_hidden()
    expect(page.locator("#announcer")).to_contain_text("lottery")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def test_an_unknown_event_says_so(page: Page) -> None:
    page.goto("/events/no-such-event-here")
    expect(page.locator("#event-name")).to_have_text("No such event")
    expect(page.locator("#notice-title")).to_be_hidden()  # said once, in the heading
    expect(page.locator("#notice-text")).to_contain_text("There is no event at this address")
    expect(page.locator("#line")).to_be_hidden()
    expect(page.locator("#connection")).to_have_attribute("data-state", "closed")


def test_checkout_without_a_pass_points_back_to_the_line(page: Page, admin: httpx.Client) -> None:
    event_id = create_event(admin, prefix="bw")
    page.goto(f"/events/{event_id}/checkout")
    expect(page.locator("#no-pass")).to_be_visible()
    expect(page.locator("#no-pass a")).to_have_attribute("href", f"/events/{event_id}")
    expect(page.locator("#reserve-section")).to_be_hidden()
    page.locator("#no-pass a").click()
    expect(page.locator("#position")).to_have_text("You are number 1 in line")


def test_an_unknown_event_at_checkout_says_so(page: Page) -> None:
    page.goto("/events/no-such-event-here/checkout")
    expect(page.locator("#event-name")).to_have_text("No such event")
    expect(page.locator("#message-text")).to_contain_text("There is no event at this address")
    expect(page.locator("#no-pass")).to_be_hidden()


def test_a_new_fan_pays_for_the_place_with_proof_of_work_in_the_page(
    page: Page, admin: httpx.Client
) -> None:
    event_id = create_event(admin, prefix="bw")
    page.goto(f"/events/{event_id}")
    expect(page.locator("#position")).to_have_text("You are number 1 in line")
    pow_card = page.locator("#pow")
    expect(pow_card).to_be_hidden()
    # The page solved the server's challenge itself, at the base price.
    expect(pow_card).to_have_attribute("data-maxnumber", "10000")
    assert int(pow_card.get_attribute("data-solved-ms") or "-1") >= 0
    # Reloading keeps the place without paying again.
    page.reload()
    expect(page.locator("#position")).to_have_text("You are number 1 in line")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def test_a_harder_challenge_shows_its_progress_while_the_workers_search(
    settings: Settings, browser: Browser
) -> None:
    hard = msgspec.structs.replace(settings, challenge=True, challenge_base=400_000)
    with (
        running(hard) as server,
        httpx.Client(base_url=server.url, headers=ADMIN) as admin,
        browser_context(browser, server.url) as context,
    ):
        event_id = create_event(admin, prefix="bw")
        page = context.new_page()
        page.goto(f"/events/{event_id}")
        # Whether the number sits early or late in the range, the card shows while searching.
        expect(page.locator("#pow")).to_be_visible()
        expect(page.locator("#pow-heading")).to_have_text("Getting you a place in line")
        expect(page.locator("#position")).to_have_text("You are number 1 in line", timeout=30_000)
        expect(page.locator("#pow")).to_be_hidden()
        expect(page.locator("#pow")).to_have_attribute("data-maxnumber", "400000")


def test_a_fan_whose_line_redis_lost_is_put_back_in_place_by_the_page(
    page: Page, client: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:

    from waitroom.core.keys import Keys

    event_id = create_event(admin, prefix="br")
    ahead = [join(client, event_id) for _ in range(2)]
    page.goto(f"/events/{event_id}")
    expect(page.locator("#position")).to_have_text("You are number 3 in line")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    # Redis restarts empty: every key of the event is gone.
    base = Keys(settings.redis_prefix).event(event_id).base
    with sync_redis(settings.redis_url) as sync:
        sync.delete(*sync.scan_iter(match=f"{base}:*", count=1000))
    # The page hears "not in line", sends the receipt of its join, and is back at its place
    # (the two fans ahead of it have not come back yet), never told it lost its place.
    expect(page.locator("#position")).to_have_text("You are number 1 in line", timeout=10_000)
    expect(page.locator("#notice")).not_to_contain_text("no longer in line")
    del ahead
