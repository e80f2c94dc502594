"""The waitlist of a sold-out sale, in a real server: tickets that come back (a cancelled hold,
expired holds) go to the fans in line strictly in line order, nobody else is admitted, nothing
is oversold; fans are told they are on the waitlist (HTTP and WebSocket, no ETA); the setting
toggles live, and turning it off ends the waitlist with ``sold_out`` as before."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.admission.support import create_event, join, me, wait_for
from tests.admission.test_cli import ok as cli_ok
from tests.admission.test_loop import _event_status, _set_sold_out, order_of
from tests.harness import ServerThread
from tests.queue_support import fan_headers
from waitroom.core.settings import Settings


class Fan:
    """A fan of one event over HTTP: joins at once, reserves and cancels with its pass."""

    def __init__(self, client: httpx.Client, event_id: str) -> None:
        self.client = client
        self.event_id = event_id
        self.fan_id, self.token = join(client, event_id)
        self.queue_pass = ""

    def status(self) -> dict[str, Any]:
        return me(self.client, self.event_id, self.token)

    def wait_for_pass(self) -> str:
        def admitted() -> str | None:
            body = self.status()
            return body["queue_pass"] if body["status"] == "admitted" else None

        self.queue_pass = wait_for(admitted, timeout=15)
        return self.queue_pass

    def headers(self) -> dict[str, str]:
        return {
            **fan_headers(self.token),
            "X-Queue-Pass": self.queue_pass or self.wait_for_pass(),
            "Idempotency-Key": uuid.uuid4().hex,
        }

    def reserve(self, quantity: int = 1) -> httpx.Response:
        return self.client.post(
            f"/v1/events/{self.event_id}/reservations",
            json={"ticket_type": "ga", "quantity": quantity},
            headers=self.headers(),
        )

    def cancel(self, hold_id: str) -> httpx.Response:
        return self.client.delete(f"/v1/reservations/{hold_id}", headers=self.headers())


def live(admin: httpx.Client, event_id: str) -> dict[str, Any]:
    response = admin.get(f"/v1/admin/events/{event_id}/admission")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def held_and_sold(admin: httpx.Client, event_id: str) -> int:
    stats = admin.get(f"/v1/admin/events/{event_id}/stats").json()
    return int(stats["held"]) + int(stats["sold"])


async def next_waitlist_message(ws: Any, returned: int) -> dict[str, Any]:
    """The first ``waitlist`` message saying ``returned`` tickets came back."""
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message["type"] == "waitlist" and message["returned"] == returned:
            return message


def test_freed_tickets_go_to_waitlisted_fans_strictly_in_line_order(
    server: ServerThread, admin: httpx.Client, client: httpx.Client, settings: Settings
) -> None:
    quantity = 4
    event_id = create_event(
        admin,
        rate=100,
        quantity=quantity,
        prefix="wl",
        waitlist=True,
        per_fan_limit=1,
        hold_ttl_s=10,
    )
    assert admin.get(f"/v1/admin/events/{event_id}").json()["room"]["waitlist"] is True
    buyers = [Fan(client, event_id) for _ in range(quantity)]
    holds = []
    for buyer in buyers:
        buyer.wait_for_pass()
        hold = buyer.reserve()
        assert hold.status_code == 201, hold.text
        holds.append(hold.json())
    reserved_at = time.monotonic()
    # Every ticket is on hold: sold out for the fans who come now, who stay on as a waitlist.
    wait_for(lambda: live(admin, event_id)["waitlisted"])
    waiting = [Fan(client, event_id) for _ in range(6)]
    for place, fan in enumerate(waiting, start=1):
        body = fan.status()
        assert body["status"] == "waitlist", body
        assert (body["position"], body["fans_ahead"], body["eta_seconds"], body["returned"]) == (
            place,
            place - 1,
            None,
            0,
        )
    time.sleep(0.5)
    assert live(admin, event_id)["admitted_total"] == quantity  # no pass for stock not there

    url = f"{server.ws_url}/v1/events/{event_id}/queue/ws"

    async def cancel_and_watch() -> tuple[dict[str, Any], dict[str, Any]]:
        auth = {"Authorization": f"Bearer {waiting[2].token}"}
        async with connect(url, additional_headers=auth) as ws:
            first = await next_waitlist_message(ws, 0)
            # One hold cancelled: one ticket back, for the first fan on the waitlist only.
            cancelled = await asyncio.to_thread(buyers[0].cancel, holds[0]["id"])
            assert cancelled.status_code == 200, cancelled.text
            return first, await next_waitlist_message(ws, 1)

    before, after = asyncio.run(cancel_and_watch())
    assert before == {
        "type": "waitlist",
        "position": 3,
        "fans_ahead": 2,
        "returned": 0,
        "eta_seconds": None,
    }
    assert after["returned"] == 1 and after["eta_seconds"] is None
    waiting[0].wait_for_pass()
    time.sleep(0.5)
    assert [f.status()["status"] for f in waiting] == ["admitted"] + ["waitlist"] * 5
    assert waiting[1].status()["returned"] == 1

    # The other three holds expire (10 s after they were made): three tickets back, for the
    # next three fans in line; the first fan's offer still claims the ticket it was offered.
    wait_for(lambda: waiting[3].status()["status"] == "admitted", timeout=25)
    assert time.monotonic() - reserved_at >= 9.5
    time.sleep(0.5)
    assert [f.status()["status"] for f in waiting] == ["admitted"] * 4 + ["waitlist"] * 2
    assert asyncio.run(order_of(settings, event_id)) == [f.fan_id for f in buyers + waiting[:4]]
    assert waiting[4].status()["returned"] == 4
    # Every fan offered a ticket gets one; nothing is oversold, and nobody else goes in.
    for fan in waiting[:4]:
        response = fan.reserve()
        assert response.status_code == 201, response.text
    assert held_and_sold(admin, event_id) == quantity
    time.sleep(0.5)
    assert live(admin, event_id)["admitted_total"] == quantity + 4
    assert [f.status()["status"] for f in waiting[4:]] == ["waitlist"] * 2


def test_without_the_waitlist_a_sold_out_sale_still_sends_its_fans_away(
    admin: httpx.Client, client: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=0.5, prefix="wl")
    assert live(admin, event_id)["waitlist"] is False
    fans = [Fan(client, event_id) for _ in range(3)]
    wait_for(lambda: live(admin, event_id)["admitted_total"] >= 1)
    asyncio.run(_set_sold_out(settings, event_id, "1"))
    wait_for(lambda: fans[-1].status()["status"] == "sold_out")
    wait_for(lambda: live(admin, event_id)["fans_waiting"] == 0)
    late = client.post(f"/v1/events/{event_id}/queue")
    assert late.status_code == 200 and late.json()["status"] == "sold_out", late.text


def test_the_waitlist_toggles_live_and_turning_it_off_ends_it_with_sold_out(
    server: ServerThread, admin: httpx.Client, client: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=0.5, prefix="wl")
    fans = [Fan(client, event_id) for _ in range(3)]
    wait_for(lambda: live(admin, event_id)["admitted_total"] >= 1)
    patched = admin.patch(f"/v1/admin/events/{event_id}/admission", json={"waitlist": True})
    assert patched.status_code == 200 and patched.json()["waitlist"] is True, patched.text
    assert admin.get(f"/v1/admin/events/{event_id}").json()["room"]["waitlist"] is True
    # What the inventory actor publishes once nothing is left and nothing held.
    asyncio.run(_set_sold_out(settings, event_id, "1"))
    wait_for(lambda: live(admin, event_id)["waitlisted"])
    wait_for(lambda: _event_status(settings, event_id) == "sold_out")
    assert fans[-1].status()["status"] == "waitlist"
    time.sleep(0.5)
    assert live(admin, event_id)["fans_waiting"] == 2  # the line is kept
    newcomer = Fan(client, event_id)  # joining a waitlist is allowed: at its back
    assert newcomer.status()["status"] == "waitlist"
    assert newcomer.status()["position"] == 3

    url = f"{server.ws_url}/v1/events/{event_id}/queue/ws"

    async def turned_off() -> tuple[int | None, str | None]:
        auth = {"Authorization": f"Bearer {fans[-1].token}"}
        async with connect(url, additional_headers=auth) as ws:
            assert (await next_waitlist_message(ws, 0))["type"] == "waitlist"
            off = await asyncio.to_thread(
                admin.patch, f"/v1/admin/events/{event_id}/admission", json={"waitlist": False}
            )
            assert off.status_code == 200 and off.json()["waitlist"] is False, off.text
            while (message := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != (
                "sold_out"
            ):
                assert message["type"] == "waitlist"
            await asyncio.wait_for(ws.wait_closed(), 5)
            return ws.close_code, ws.close_reason

    assert asyncio.run(turned_off()) == (1000, "sold out")
    wait_for(lambda: live(admin, event_id)["fans_waiting"] == 0)
    assert newcomer.status()["status"] == "sold_out"
    assert live(admin, event_id)["waitlisted"] is False


def test_the_cli_sets_the_waitlist_at_creation_and_live_and_status_shows_it(
    server: ServerThread, admin: httpx.Client, settings: Settings
) -> None:
    created = json.loads(
        cli_ok(
            settings,
            "event",
            "create",
            "--name",
            "CLI waitlist",
            "--ticket",
            "ga:5:1000:EUR",
            "--waitlist",
            "on",
            "--json",
        )
    )
    event_id = created["id"]
    assert created["room"]["waitlist"] is True
    assert "waitlist          on" in cli_ok(settings, "status", event_id)
    off = json.loads(cli_ok(settings, "admission", "set", event_id, "--waitlist", "off", "--json"))
    assert off["waitlist"] is False
    assert live(admin, event_id)["waitlist"] is False
    assert "waitlist          off" in cli_ok(settings, "status", event_id)
    cli_ok(settings, "admission", "set", event_id, "--waitlist", "on")
    asyncio.run(_set_sold_out(settings, event_id, "1"))
    wait_for(lambda: live(admin, event_id)["waitlisted"])
    status = json.loads(cli_ok(settings, "status", event_id, "--json"))
    assert (status["waitlist"], status["waitlisted"], status["last_fan_wait_s"]) == (
        True,
        True,
        None,
    )
    assert "waitlist  (leader" in cli_ok(settings, "status", event_id)


def test_a_waitlist_deadline_ends_it_and_the_fans_are_told_sold_out(
    admin: httpx.Client, client: httpx.Client, settings: Settings
) -> None:
    until = datetime.now(UTC) + timedelta(seconds=4)
    event_id = create_event(
        admin, rate=0.5, prefix="wl", waitlist=True, waitlist_until=until.isoformat()
    )
    room = admin.get(f"/v1/admin/events/{event_id}").json()["room"]
    assert datetime.fromisoformat(room["waitlist_until"]) == until
    fans = [Fan(client, event_id) for _ in range(3)]
    wait_for(lambda: live(admin, event_id)["admitted_total"] >= 1)
    asyncio.run(_set_sold_out(settings, event_id, "1"))
    wait_for(lambda: fans[-1].status()["status"] == "waitlist")
    assert live(admin, event_id)["waitlist_until"] is not None
    # Past the deadline the waitlist is over: the line closes as without one.
    wait_for(lambda: fans[-1].status()["status"] == "sold_out", timeout=15)
    assert datetime.now(UTC) >= until
    wait_for(lambda: live(admin, event_id)["fans_waiting"] == 0)
    assert live(admin, event_id)["waitlist"] is False
    # A deadline moved later opens a waitlist again, live.
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    patched = admin.patch(f"/v1/admin/events/{event_id}/admission", json={"waitlist_until": later})
    assert patched.status_code == 200, patched.text
    wait_for(lambda: live(admin, event_id)["waitlisted"])
    late = Fan(client, event_id)
    assert late.status()["status"] == "waitlist"
