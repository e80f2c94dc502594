"""The seat map page in headless Chromium, on a desktop and on a 375x740 phone (issue 17,
item 4): every seat drawn with its accessible name, picking seats with the keyboard alone,
held and sold seats that cannot be picked, a published change shown live, zoom, and the
bodies the hold buttons send.

The server, PostgreSQL and Redis are real; held and sold seats are made by writing holds
directly, and live changes by the very function the inventory actor calls after a commit.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from playwright.sync_api import Page, Request, Route, expect

from tests.admission.support import join, me, wait_for
from tests.browser_support import DESKTOP, Screen, assert_fits
from tests.inventory.seating import write_seat_holds
from tests.test_venue_api import seat_map
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import Settings
from waitroom.line.seatnews import publish_seat_changes

pytestmark = pytest.mark.browser

T = TypeVar("T")
#: The phone of the issue: 375 px wide, 740 px tall, touch.
PHONE = Screen("phone", 375, 740, mobile=True)


@pytest.fixture(params=(DESKTOP, PHONE), ids=lambda screen: screen.name)
def screen(request: pytest.FixtureRequest) -> Screen:
    """Each test once per screen (this module's phone is the issue's 375x740)."""
    value: Screen = request.param
    return value


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to the end in a thread of its own (Playwright's sync API keeps an event
    loop running in this one)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]
    return result[0]


def hold_seats(settings: Settings, event_id: str, seats: list[str], status: str) -> None:
    """A hold of ``seats`` written straight to PostgreSQL (``status`` 'held' or 'paid')."""

    async def write() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await write_seat_holds(conn, event_id, seats, status)
        finally:
            await conn.close()

    run_async(write)


def publish(settings: Settings, event_id: str, changes: dict[str, str]) -> None:
    """What the inventory actor does after a commit: publish the seats' new states."""

    async def send() -> None:
        redis = redis_from_url(settings.redis_url)  # a single Redis or a cluster
        try:
            await publish_seat_changes(redis, Keys(settings.redis_prefix), event_id, changes)
        finally:
            await redis.aclose()

    run_async(send)


def seated_sale(admin: httpx.Client, settings: Settings) -> str:
    """An on-sale event with 3 rows of 4 seats (rows A-B Stalls at 50 EUR, row C Balcony at
    30 EUR; A4 killed, B2 held back), row A seat 2 held and row C seat 3 sold."""
    event_id = f"sm-{uuid.uuid4().hex[:10]}"
    created = admin.post(
        "/v1/admin/events",
        json={
            "id": event_id,
            "name": "Seated night",
            "venue": "Concertgebouw",
            "ticket_types": [
                {"name": "Stalls", "quantity": 100, "price_minor": 5000, "currency": "EUR"},
                {"name": "Balcony", "quantity": 100, "price_minor": 3000, "currency": "EUR"},
                {"name": "Standing", "quantity": 500, "price_minor": 2000, "currency": "EUR"},
            ],
            "room": {"rate_per_second": 50, "max_active": 1000, "abandon_grace_s": 900},
        },
    )
    assert created.status_code == 201, created.text
    body = seat_map(rows=3, seats=4)
    body["sections"][0]["rows"][1]["seats"][1]["status"] = "held_back"
    put = admin.put(f"/v1/admin/events/{event_id}/seatmap", json=body)
    assert put.status_code == 200, put.text
    hold_seats(settings, event_id, ["main:A:2"], "held")
    hold_seats(settings, event_id, ["main:C:3"], "paid")
    return event_id


def seat(page: Page, name: str) -> Any:
    """The seat whose accessible name starts with ``name`` (exactly one)."""
    return page.get_by_role("gridcell", name=name)


def name_of(row: str, number: int, rest: str) -> str:
    return f"Section Main floor, row {row}, seat {number}, {rest}"


STALLS = "Stalls, €50.00"
BALCONY = "Balcony, €30.00"


def open_map(page: Page, event_id: str) -> None:
    page.goto(f"/events/{event_id}/seats")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.get_by_role("gridcell")).to_have_count(12)


def focus_map_by_keyboard(page: Page) -> None:
    """Tab from the top of the page until a seat has the focus (keyboard only)."""
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement?.getAttribute('role')") == "gridcell":
            return
    raise AssertionError("no seat took the focus after 30 tabs")


def focused_name(page: Page) -> str:
    value: str = page.evaluate("() => document.activeElement.getAttribute('aria-label')")
    return value


def test_the_map_draws_every_seat_with_its_name_price_and_state(
    page: Page, admin: httpx.Client, settings: Settings, screen: Screen, tmp_path: Path
) -> None:
    event_id = seated_sale(admin, settings)
    open_map(page, event_id)
    expect(page.locator("#event-name")).to_have_text("Seated night")
    names = {
        name_of("A", 1, f"{STALLS}, wheelchair accessible, available"),
        name_of("A", 2, f"{STALLS}, held by another fan"),
        name_of("A", 3, f"{STALLS}, available"),
        name_of("A", 4, f"{STALLS}, not available"),  # killed
        name_of("B", 1, f"{STALLS}, wheelchair accessible, available"),
        name_of("B", 2, f"{STALLS}, not available"),  # held back: said the same way
        name_of("B", 3, f"{STALLS}, available"),
        name_of("B", 4, f"{STALLS}, available"),
        name_of("C", 1, f"{BALCONY}, wheelchair accessible, available"),
        name_of("C", 2, f"{BALCONY}, available"),
        name_of("C", 3, f"{BALCONY}, sold"),
        name_of("C", 4, f"{BALCONY}, available"),
    }
    drawn = page.locator("#seat-map [role=gridcell]").evaluate_all(
        "cells => cells.map(c => c.getAttribute('aria-label'))"
    )
    assert set(drawn) == names and len(drawn) == 12
    # One circle per seat, at its coordinates; held, sold and unavailable seats carry a mark
    # (not colour alone), free ones none.
    marks = page.locator("#seat-map .seat").evaluate_all(
        "cells => cells.map(c => [c.dataset.id, c.getAttribute('transform'),"
        " c.querySelector('path').getAttribute('d') !== ''])"
    )
    by_id = {m[0]: m for m in marks}
    assert by_id["main:B:3"][1] == "translate(20 10)"
    assert [by_id[s][2] for s in ("main:A:2", "main:C:3", "main:A:4", "main:A:3")] == [
        True,
        True,
        True,
        False,
    ]
    legend = page.locator("#legend")
    expect(legend).to_contain_text("Stalls")
    expect(legend).to_contain_text("€50.00")
    expect(legend).to_contain_text("Balcony")
    expect(legend).to_contain_text("€30.00")
    expect(page.locator("#state-legend")).to_contain_text("sold")
    expect(page.locator("#standing")).to_contain_text("pit")
    assert_fits(page)
    page.screenshot(path=tmp_path / f"seatmap-{screen.name}.png", full_page=True)


def test_a_fan_picks_seats_with_the_keyboard_alone_and_taken_seats_refuse(
    page: Page, admin: httpx.Client, settings: Settings
) -> None:
    event_id = seated_sale(admin, settings)
    open_map(page, event_id)
    focus_map_by_keyboard(page)
    assert focused_name(page) == name_of("A", 1, f"{STALLS}, wheelchair accessible, available")

    page.keyboard.press("ArrowRight")
    assert focused_name(page).startswith(name_of("A", 2, ""))
    page.keyboard.press("Enter")  # held by another fan
    announcer = page.locator("#announcer")
    expect(announcer).to_have_text("row A, seat 2 is held by another fan: it cannot be picked.")
    expect(seat(page, name_of("A", 2, f"{STALLS}, held by another fan"))).to_have_attribute(
        "aria-selected", "false"
    )

    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    expect(announcer).to_have_text("Selected row A, seat 3. 1 seat picked, €50.00 in total.")
    page.keyboard.press("ArrowDown")  # the seat of row B right behind
    assert focused_name(page).startswith(name_of("B", 3, ""))
    page.keyboard.press(" ")
    expect(announcer).to_have_text("Selected row B, seat 3. 2 seats picked, €100.00 in total.")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")  # row C seat 3: sold
    expect(announcer).to_have_text("row C, seat 3 is sold: it cannot be picked.")
    page.keyboard.press("End")
    page.keyboard.press("Enter")
    expect(announcer).to_contain_text("Selected row C, seat 4. 3 seats picked")
    page.keyboard.press("Enter")  # again: put back
    expect(announcer).to_contain_text("Removed row C, seat 4. 2 seats picked")

    for row, number in (("A", 3), ("B", 3)):
        expect(seat(page, name_of(row, number, f"{STALLS}, available"))).to_have_attribute(
            "aria-selected", "true"
        )
    expect(page.locator("#selection li")).to_have_count(2)
    expect(page.locator("#selection-summary")).to_have_text("2 seats picked, €100.00 in total.")
    expect(page.locator("#hold-selected")).to_be_enabled()
    # Sold and held seats never joined the selection, and the clicks do the same as keys.
    seat(page, name_of("C", 4, f"{BALCONY}, available")).click()
    expect(page.locator("#selection li")).to_have_count(3)
    seat(page, name_of("C", 3, f"{BALCONY}, sold")).click(force=True)
    expect(page.locator("#selection li")).to_have_count(3)


def test_a_published_change_updates_the_map_live_and_takes_the_seat_out_of_the_picks(
    page: Page, admin: httpx.Client, settings: Settings, screen: Screen, tmp_path: Path
) -> None:
    event_id = seated_sale(admin, settings)
    open_map(page, event_id)
    seat(page, name_of("A", 3, f"{STALLS}, available")).click()
    seat(page, name_of("B", 3, f"{STALLS}, available")).click()
    expect(page.locator("#selection li")).to_have_count(2)

    hold_seats(settings, event_id, ["main:A:3"], "paid")
    publish(settings, event_id, {"main:A:3": "sold", "main:A:2": "free"})
    expect(seat(page, name_of("A", 3, f"{STALLS}, sold"))).to_have_attribute(
        "aria-selected", "false"
    )
    expect(seat(page, name_of("A", 2, f"{STALLS}, available"))).to_be_visible()
    expect(page.locator("#message-title")).to_have_text("A seat you picked was just taken")
    expect(page.locator("#message-text")).to_contain_text("row A, seat 3")
    expect(page.locator("#selection li")).to_have_count(1)
    expect(page.locator("#selection-summary")).to_have_text("1 seat picked, €50.00 in total.")
    page.screenshot(path=tmp_path / f"seatmap-live-{screen.name}.png", full_page=True)

    # A change to a seat nobody here picked is said politely.
    publish(settings, event_id, {"main:C:1": "held"})
    expect(seat(page, name_of("C", 1, f"{BALCONY}, wheelchair accessible, held"))).to_be_visible()
    expect(page.locator("#announcer")).to_have_text("1 seat was just taken.")


def view_box(page: Page) -> list[float]:
    raw: str = page.locator("#seat-map").get_attribute("viewBox") or ""
    return [float(part) for part in raw.split()]


def test_zoom_buttons_and_the_wheel_change_the_view(
    page: Page, admin: httpx.Client, settings: Settings, screen: Screen
) -> None:
    event_id = seated_sale(admin, settings)
    open_map(page, event_id)
    whole = view_box(page)
    expect(page.locator("#zoom-out")).to_be_disabled()  # the whole map is in view
    page.get_by_role("button", name="Zoom in").click()
    closer = view_box(page)
    assert closer[2] == pytest.approx(whole[2] / 1.5) and closer[3] < whole[3]
    page.get_by_role("button", name="Zoom in").click()
    assert view_box(page)[2] == pytest.approx(whole[2] / 2.25)
    page.get_by_role("button", name="Zoom out").click()
    assert view_box(page)[2] == pytest.approx(closer[2])
    page.get_by_role("button", name="Whole map").click()
    assert view_box(page) == pytest.approx(whole)
    if not screen.mobile:
        page.locator("#seat-map").hover()
        page.mouse.wheel(0, -200)
        expect(page.locator("#zoom-out")).to_be_enabled()
        assert view_box(page)[2] < whole[2]
    else:
        # A keyboard user zooms too, around the focused seat; the page still fits the phone.
        seat(page, name_of("B", 3, f"{STALLS}, available")).focus()
        page.keyboard.press("+")
        assert view_box(page)[2] == pytest.approx(whole[2] / 1.5)
    assert_fits(page)


def admitted_pass(client: httpx.Client, event_id: str) -> dict[str, Any]:
    """A real queue pass: a fan joins and is admitted by the admission loop."""
    _, token = join(client, event_id)
    status = wait_for(
        lambda: (body := me(client, event_id, token))["status"] == "admitted" and body,
        timeout=15,
    )
    return {"pass": status["queue_pass"], "expires_at": None}


@pytest.fixture
def sent(page: Page) -> Iterator[list[tuple[dict[str, Any], dict[str, str]]]]:
    """The reservation requests the page sends (body and headers), passed on unchanged."""
    seen: list[tuple[dict[str, Any], dict[str, str]]] = []

    def inspect(route: Route, request: Request) -> None:
        seen.append((json.loads(request.post_data or "null"), request.headers))
        route.continue_()

    page.route("**/v1/events/*/reservations", inspect)
    yield seen


def test_the_hold_buttons_send_the_picked_seats_or_the_best_available_with_the_pass(
    page: Page,
    admin: httpx.Client,
    client: httpx.Client,
    settings: Settings,
    sent: list[tuple[dict[str, Any], dict[str, str]]],
) -> None:
    event_id = seated_sale(admin, settings)
    queue_pass = admitted_pass(client, event_id)
    page.add_init_script(
        f"sessionStorage.setItem({json.dumps('waitroom:pass:' + event_id)},"
        f" {json.dumps(json.dumps(queue_pass))})"
    )
    # The checkout page sends the fan of a seated event to the map.
    page.goto(f"/events/{event_id}/checkout")
    to_map = page.get_by_role("link", name="Pick your seats on the seat map")
    expect(to_map).to_have_attribute("href", f"/events/{event_id}/seats")
    to_map.click()
    page.wait_for_url(f"**/events/{event_id}/seats")
    expect(page.get_by_role("gridcell")).to_have_count(12)
    expect(page.locator("#no-pass")).to_be_hidden()
    seat(page, name_of("B", 4, f"{STALLS}, available")).click()
    seat(page, name_of("A", 3, f"{STALLS}, available")).click()
    page.get_by_role("button", name="Hold selected seats").click()
    expect(page.locator("#message")).to_be_visible()
    assert len(sent) == 1
    body, headers = sent[0]
    assert body == {"seats": ["main:B:4", "main:A:3"]}
    assert headers["x-queue-pass"] == queue_pass["pass"]
    assert len(headers["idempotency-key"]) == 32

    page.locator("#best-level").select_option("balcony")
    page.locator("#best-count").select_option("3")
    page.get_by_role("button", name="Hold best available").click()
    wait_for(lambda: len(sent) == 2)
    body, headers = sent[1]
    assert body == {"best_available": {"level": "balcony", "count": 3}}
    assert headers["x-queue-pass"] == queue_pass["pass"]
    assert headers["idempotency-key"] != sent[0][1]["idempotency-key"]


def test_without_a_pass_the_map_shows_and_holding_sends_the_fan_to_the_line(
    page: Page, admin: httpx.Client, settings: Settings, sent: list[Any]
) -> None:
    event_id = seated_sale(admin, settings)
    open_map(page, event_id)
    expect(page.locator("#no-pass")).to_be_visible()
    seat(page, name_of("A", 3, f"{STALLS}, available")).click()
    page.get_by_role("button", name="Hold selected seats").click()
    expect(page.locator("#message-title")).to_have_text("You need a queue pass to hold seats")
    expect(page.locator("#message-actions a")).to_have_attribute("href", f"/events/{event_id}")
    assert sent == []


def test_an_event_without_a_seat_map_or_unknown_says_so(page: Page, admin: httpx.Client) -> None:
    page.goto("/events/no-such-evt/seats")
    expect(page.locator("#event-name")).to_have_text("Event not found")
    event_id = f"sm-{uuid.uuid4().hex[:10]}"
    created = admin.post(
        "/v1/admin/events",
        json={
            "id": event_id,
            "name": "Standing only",
            "ticket_types": [
                {"name": "GA", "quantity": 10, "price_minor": 1000, "currency": "EUR"}
            ],
        },
    )
    assert created.status_code == 201, created.text
    page.goto(f"/events/{event_id}/seats")
    expect(page.locator("#message-title")).to_have_text("No seat map for this event")
    expect(page.locator("#map-section")).to_be_hidden()
    expect(page.locator("#message-actions a")).to_have_attribute(
        "href", f"/events/{event_id}/checkout"
    )


def test_a_fan_holds_seats_on_the_map_pays_and_finds_them_on_the_tickets(
    page: Page, admin: httpx.Client, settings: Settings
) -> None:
    # End to end on the real server, actor and payment workers, as a fan: through the line
    # to the checkout, to the map, pick two seats, hold them, pay, and see the seats on the
    # hold, on the tickets and, sold, on the map.
    event_id = seated_sale(admin, settings)
    page.goto(f"/events/{event_id}")
    page.wait_for_url(f"**/events/{event_id}/checkout", timeout=15_000)
    page.get_by_role("link", name="Pick your seats on the seat map").click()
    page.wait_for_url(f"**/events/{event_id}/seats")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#no-pass")).to_be_hidden()
    seat(page, name_of("A", 3, f"{STALLS}, available")).click()
    seat(page, name_of("B", 4, f"{STALLS}, available")).click()
    page.get_by_role("button", name="Hold selected seats").click()
    page.wait_for_url(f"**/events/{event_id}/checkout")
    expect(page.locator("#hold-seats")).to_contain_text("row A, seat 3")
    expect(page.locator("#hold-seats")).to_contain_text("row B, seat 4")

    page.get_by_role("button", name="Pay €100.00").click()
    tickets = page.locator("#tickets .ticket-code")
    expect(tickets).to_have_count(2, timeout=15_000)
    expect(page.locator("#tickets")).to_contain_text("Stalls · main, row A, seat 3")
    expect(page.locator("#tickets")).to_contain_text("Stalls · main, row B, seat 4")

    # The map follows the sale: both seats are sold now (published after the commit).
    open_map(page, event_id)
    expect(seat(page, name_of("A", 3, f"{STALLS}, sold"))).to_have_count(1)
    expect(seat(page, name_of("B", 4, f"{STALLS}, sold"))).to_have_count(1)
