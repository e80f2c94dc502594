"""The operators' console in headless Chromium, on a desktop and on a 375 px phone (issue 16,
item 5): sign in with the admin token, watch a sale live while fans join, are admitted and buy
through the real API, steer it from the page (pause, resume, rate, max active, revoke) with the
effect checked through the API, and read the audit trail.

Like tests/checkout, the module runs the whole stack in a database of its own: a server with
admission loops, the payment workers and the mock payment provider.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.admission.support import create_event, wait_for
from tests.browser_support import Screen, assert_fits
from tests.checkout.test_checkout import Fan
from tests.harness import ADMIN_TOKEN

pytestmark = pytest.mark.browser


def admission(admin: httpx.Client, event_id: str) -> dict[str, Any]:
    """The sale's live admission figures, through the operators' API."""
    response = admin.get(f"/v1/admin/events/{event_id}/admission")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def jti_of(queue_pass: str) -> str:
    """The ``jti`` claim of a pass (read, not verified: the server does that)."""
    payload = queue_pass.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    jti: str = claims["jti"]
    return jti


def chart_has_ink(page: Page, canvas_id: str) -> bool:
    """Whether anything was drawn on the canvas (a chart without data draws its grid only)."""
    inked: bool = page.evaluate(
        """(id) => {
          const canvas = document.getElementById(id);
          const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
          let painted = 0;
          for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted += 1;
          return painted > canvas.width * 2;
        }""",
        canvas_id,
    )
    return inked


def sign_in(page: Page, event_id: str) -> None:
    page.goto(f"/admin#event={event_id}")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", "not-the-token")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_have_text(
        "This token was refused. Check it and try again."
    )
    expect(page.locator("#app")).to_be_hidden()
    page.fill("#token", ADMIN_TOKEN)
    page.click("#login-button")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()


def test_an_operator_watches_and_steers_a_live_sale_from_the_console(
    page: Page,
    client: httpx.Client,
    admin: httpx.Client,
    screen: Screen,
    tmp_path: Path,
) -> None:
    event_id = create_event(admin, rate=5, max_active=50, quantity=30, paused=True, prefix="con")
    sign_in(page, event_id)
    expect(page.locator("#event-select")).to_have_value(event_id)
    expect(page.locator("#sale-name")).to_have_text("Admission test")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#sale-state")).to_have_attribute("data-state", "paused")
    expect(page.locator("#fig-waiting")).to_have_text("0")
    expect(page.locator("#fig-sold")).to_have_text("0 of 30")
    expect(page.locator("#rate-input")).to_have_value("5")
    expect(page.locator("#max-input")).to_have_value("50")

    # Fans join through the real API: the line grows on the page.
    fans = [Fan(client, event_id) for _ in range(4)]
    expect(page.locator("#fig-waiting")).to_have_text("4", timeout=5_000)
    assert chart_has_ink(page, "chart-line")

    # Resume from the page: the line moves, the fans are admitted.
    page.click("#resume")
    expect(page.locator("#control-result")).to_have_text("Admission resumed.")
    assert admission(admin, event_id)["paused"] is False
    expect(page.locator("#sale-state")).to_have_attribute("data-state", "admitting")
    expect(page.locator("#fig-waiting")).to_have_text("0", timeout=8_000)
    expect(page.locator("#fig-active")).to_have_text("4 of 50", timeout=5_000)

    # Two fans buy, one holds: stock and sales follow.
    buyer, holder = fans[0], fans[1]
    for fan in (buyer, holder):
        fan.wait_for_pass()
    bought = buyer.reserve(quantity=2)
    assert bought.status_code == 201, bought.text
    assert buyer.confirm(bought.json()["id"]).status_code == 202
    held = holder.reserve(quantity=1)
    assert held.status_code == 201, held.text
    expect(page.locator("#fig-sold")).to_have_text("2 of 30", timeout=15_000)
    expect(page.locator("#fig-left")).to_have_text("1 held · 27 left")
    row = page.locator("#stock-body tr")
    expect(row).to_have_count(1)
    expect(row.locator("th")).to_have_text("ga")
    expect(row.locator("td")).to_have_text(["30", "1", "2", "27"])
    assert chart_has_ink(page, "chart-sales")
    assert chart_has_ink(page, "chart-admitted")

    # The rate and the cap, from the page; the API sees them at once, the stream soon after.
    page.fill("#rate-input", "12.5")
    page.click("#rate-form button")
    expect(page.locator("#control-result")).to_have_text("Admission rate set to 12.5/s.")
    assert admission(admin, event_id)["rate_per_second"] == 12.5
    expect(page.locator("#fig-rate-set")).to_contain_text("set to 12.5/s", timeout=5_000)
    page.fill("#max-input", "3")
    page.click("#max-form button")
    expect(page.locator("#control-result")).to_have_text("At most 3 shoppers at once.")
    assert admission(admin, event_id)["max_active"] == 3
    expect(page.locator("#fig-active")).to_contain_text("of 3", timeout=5_000)
    page.fill("#rate-input", "0")
    page.click("#rate-form button")
    expect(page.locator("#control-result")).to_have_attribute("data-kind", "error")
    assert admission(admin, event_id)["rate_per_second"] == 12.5

    # Pause from the page.
    page.click("#pause")
    expect(page.locator("#control-result")).to_have_text(
        "Admission paused: fans keep their places."
    )
    assert admission(admin, event_id)["paused"] is True
    expect(page.locator("#sale-state")).to_have_attribute("data-state", "paused")
    expect(page.locator("#fig-wait")).to_have_text("no estimate while paused")

    # Revoke the holder's pass: checkout refuses it from then on.
    jti = jti_of(holder.queue_pass)
    page.fill("#jti-input", jti)
    page.click("#revoke-form button")
    expect(page.locator("#control-result")).to_have_text(
        f"Pass {jti} of fan {holder.fan_id} revoked."
    )
    refused = holder.reserve(quantity=1)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "pass_revoked"

    # The audit trail names each change, newest first, with who made it.
    entries = page.locator("#audit-list li")
    expect(entries).to_have_count(7)
    expect(entries.first).to_have_attribute("data-action", "pass.revoke")
    expect(entries.first).to_contain_text("pass.revoke by admin:admin")
    expect(entries.first).to_contain_text("revoked: false → true")
    expect(entries.nth(1)).to_contain_text("paused: false → true")
    expect(entries.nth(2)).to_contain_text("max_active: 50 → 3")
    expect(entries.nth(3)).to_contain_text("rate_per_second: 5 → 12.5")
    expect(entries.nth(4)).to_contain_text("paused: true → false")
    expect(entries.nth(5)).to_contain_text("paused: false → true")  # paused when created
    expect(entries.last).to_have_attribute("data-action", "event.create")
    expect(page.locator("#audit-more")).to_be_hidden()

    if screen.mobile:
        assert_fits(page)
        # ...and the stock table shows every column without scrolling sideways.
        table = page.evaluate(
            "() => { const w = document.querySelector('.table-wrap');"
            " return [w.scrollWidth, w.clientWidth]; }"
        )
        assert table[0] <= table[1], f"the stock table is {table[0]} px wide in {table[1]} px"
    page.screenshot(path=tmp_path / f"console-{screen.name}.png", full_page=True)

    # A reload keeps the operator signed in (this tab's sessionStorage) and the sale chosen.
    page.reload()
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#fig-sold")).to_have_text("2 of 30")

    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "idle")
    assert page.evaluate("() => sessionStorage.length") == 0


def test_a_token_the_server_refuses_leads_back_to_sign_in(page: Page, admin: httpx.Client) -> None:
    event_id = create_event(admin, prefix="con")
    page.goto(f"/admin#event={event_id}")
    expect(page.locator("#login")).to_be_visible()
    # A token a server no longer accepts, left in the tab from an earlier session.
    page.evaluate(
        "() => sessionStorage.setItem('waitroom:admin-token', JSON.stringify('stale-token'))"
    )
    page.reload()
    expect(page.locator("#login-error")).to_have_text(
        "This token was refused. Check it and try again."
    )
    wait_for(lambda: page.evaluate("() => sessionStorage.length") == 0, timeout=5)
