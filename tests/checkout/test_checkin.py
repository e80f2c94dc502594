"""Tickets at the door: a fan buys through the real API, the door checks the ticket in once.

Over real HTTP, PostgreSQL and Redis, with the mock payment provider and the payment workers.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
import segno
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tests.admission.support import create_event, join
from tests.checkout.test_checkout import Fan
from tests.harness import ADMIN_TOKEN, ServerThread, cleanup, fresh_settings, run_cli
from tests.queue_support import fan_headers
from tests.test_errors import assert_error
from waitroom.core.settings import Settings
from waitroom.tickets_api import qr_svg

STAFF_TOKEN = "staff-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, provider: ServerThread
) -> Iterator[Settings]:
    """The checkout stack's settings plus a door staff's token (``staff:north``)."""
    value = fresh_settings(
        tmp_path_factory.mktemp("checkin-run"),
        admission_loop=True,
        payment_url=provider.url,
        staff_tokens=(f"north:{STAFF_TOKEN}",),
    )
    value = msgspec.structs.replace(value, payment_timeout_s=1.0)
    try:
        yield value
    finally:
        cleanup(value)


class Bought(msgspec.Struct):
    event_id: str
    fan: Any
    tickets: list[dict[str, Any]]


@pytest.fixture(scope="module")
def bought(server: ServerThread, workers: Any) -> Iterator[Bought]:
    """One fan's paid order of four tickets, bought through the API."""
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        httpx.Client(
            base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as admin,
    ):
        event_id = create_event(admin, rate=50, quantity=10, prefix="door")
        fan = Fan(client, event_id)
        fan.wait_for_pass()
        reserved = fan.reserve(quantity=4)
        assert reserved.status_code == 201, reserved.text
        hold = reserved.json()
        assert fan.confirm(hold["id"]).status_code == 202
        paid = fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
        yield Bought(event_id, fan, paid["tickets"])


@pytest.fixture
def door(server: ServerThread) -> Iterator[httpx.Client]:
    """The door staff's client."""
    headers = {"Authorization": f"Bearer {STAFF_TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=10, headers=headers) as c:
        yield c


def b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_paid_ticket_is_signed_and_verifies_offline_with_the_published_keys(
    bought: Bought, server: ServerThread
) -> None:
    ticket = bought.tickets[0]
    token: str = ticket["token"]
    assert len(token) < 500  # fits a QR code a phone screen shows well
    head, body, signature = token.split(".")
    header = json.loads(b64decode(head))
    assert header["alg"] == "EdDSA" and header["typ"] == "wr-ticket"
    jwks = httpx.get(f"{server.url}/.well-known/jwks.json").json()
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
    # What a door's offline scanner does: the published key, nothing else from us.
    Ed25519PublicKey.from_public_bytes(b64decode(jwk["x"])).verify(
        b64decode(signature), f"{head}.{body}".encode()
    )
    claims = json.loads(b64decode(body))
    assert claims["tkt"] == ticket["code"] and claims["evt"] == bought.event_id
    assert claims["tt"] == "ga" and claims["ord"] and claims["iat"] > 0
    # The orders view carries the same signed tickets (Ed25519 is deterministic).
    orders = bought.fan.client.get("/v1/orders", headers=fan_headers(bought.fan.token)).json()
    by_code = {t["code"]: t["token"] for o in orders for t in o["tickets"]}
    assert by_code[ticket["code"]] == token


def test_the_fan_gets_the_ticket_as_a_qr_code_of_its_signed_form(bought: Bought) -> None:
    ticket = bought.tickets[0]
    fan = bought.fan
    response = fan.client.get(
        f"/v1/tickets/{ticket['code']}/qr.svg", headers=fan_headers(fan.token)
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/svg+xml"
    assert response.content.startswith(b"<svg") and response.content.rstrip().endswith(b"</svg>")
    # segno cannot decode; the same payload encodes to the very same symbol.
    assert response.content == qr_svg(ticket["token"])
    version = segno.make_qr(ticket["token"], error="m").version
    assert isinstance(version, int) and version <= 15, version
    # Nobody else's.
    with httpx.Client(base_url=fan.client.base_url, timeout=10) as other:
        _, stranger = join(other, bought.event_id)
        assert_error(
            other.get(f"/v1/tickets/{ticket['code']}/qr.svg", headers=fan_headers(stranger)),
            404,
            "ticket_not_found",
        )
    assert_error(httpx.get(f"{fan.client.base_url}/v1/tickets/{ticket['code']}/qr.svg"), 401)


def test_a_ticket_checks_in_once_and_a_second_scan_says_when_and_where(
    bought: Bought, door: httpx.Client
) -> None:
    ticket = bought.tickets[0]
    first = door.post(
        "/v1/checkin",
        json={"ticket": ticket["token"], "gate": "north-1", "event_id": bought.event_id},
    )
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["status"], body["code"], body["gate"], body["checked_in_by"]) == (
        "checked_in",
        ticket["code"],
        "north-1",
        "staff:north",
    )
    assert body["verified_by"] == "signature" and body["event_id"] == bought.event_id
    # Again, scanned or typed, at another gate: refused, naming the first use.
    for again in (ticket["token"], ticket["code"]):
        error = assert_error(
            door.post("/v1/checkin", json={"ticket": again, "gate": "south"}),
            409,
            "ticket_already_used",
        )
        details = error["details"]
        assert details["gate"] == "north-1" and details["checked_in_by"] == "staff:north"
        assert details["used_at"][:19] == body["used_at"][:19]


def test_two_doors_scanning_one_ticket_at_once_admit_it_once(
    bought: Bought, door: httpx.Client
) -> None:
    ticket = bought.tickets[1]
    results: list[int] = []
    start = threading.Barrier(8)

    def scan(gate: int) -> None:
        with httpx.Client(base_url=door.base_url, headers=door.headers, timeout=10) as c:
            start.wait()
            results.append(
                c.post(
                    "/v1/checkin", json={"ticket": ticket["token"], "gate": f"g{gate}"}
                ).status_code
            )

    threads = [threading.Thread(target=scan, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] + [409] * 7


def test_a_voided_ticket_is_refused_at_the_door(
    bought: Bought, door: httpx.Client, admin: httpx.Client
) -> None:
    ticket = bought.tickets[2]
    voided = admin.post(f"/v1/admin/tickets/{ticket['code']}/void", json={"reason": "refunded"})
    assert voided.status_code == 200, voided.text
    assert voided.json()["voided_by"] == "admin:admin"
    again = admin.post(f"/v1/admin/tickets/{ticket['code']}/void", json={})
    assert again.status_code == 200 and again.json()["voided_at"] == voided.json()["voided_at"]
    error = assert_error(
        door.post("/v1/checkin", json={"ticket": ticket["token"]}), 409, "ticket_voided"
    )
    assert error["details"]["reason"] == "refunded"
    # Door staff cannot void.
    assert_error(door.post(f"/v1/admin/tickets/{ticket['code']}/void", json={}), 401)
    assert_error(admin.post("/v1/admin/tickets/" + "x" * 24 + "/void", json={}), 404)


def forged(token: str) -> dict[str, str]:
    """Tampered versions of a good signed ticket."""
    head, body, signature = token.split(".")
    header = json.loads(b64decode(head))
    claims = json.loads(b64decode(body))
    other_event = b64(json.dumps({**claims, "evt": "another-event"}).encode())
    none = b64(json.dumps({"alg": "none", "typ": "wr-ticket"}).encode())
    hs = b64(json.dumps({"alg": "HS256", "kid": header["kid"], "typ": "wr-ticket"}).encode())
    stranger = Ed25519PrivateKey.generate()
    signing_input = f"{head}.{body}".encode()
    return {
        "tampered claims": f"{head}.{other_event}.{signature}",
        "alg none": f"{none}.{body}.",
        "alg none with signature": f"{none}.{body}.{signature}",
        "HS256": f"{hs}.{body}.{signature}",
        "another key, our kid": f"{head}.{body}.{b64(stranger.sign(signing_input))}",
        "bit flipped": f"{head}.{body}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}"
        + signature[-1],
        "not base64": f"{head}.{body}.!!!",
        "two dots only": "..",
        "garbage": "not a ticket at all",
    }


def test_forged_tampered_or_foreign_tokens_are_refused_with_a_4xx(
    bought: Bought, door: httpx.Client
) -> None:
    token = bought.tickets[3]["token"]
    for name, bad in forged(token).items():
        response = door.post("/v1/checkin", json={"ticket": bad, "gate": "north-1"})
        assert response.status_code == 403, (name, response.text)
        assert response.json()["error"]["code"] == "ticket_invalid", name
    # A queue pass is no ticket, though the same key signed it.
    assert_error(door.post("/v1/checkin", json={"ticket": bought.fan.queue_pass}), 403)
    # Another event's door, offline (signed) and by code.
    for presented in (token, bought.tickets[3]["code"]):
        error = assert_error(
            door.post("/v1/checkin", json={"ticket": presented, "event_id": "other-event"}),
            403,
            "ticket_wrong_event",
        )
        assert error["details"]["ticket_event_id"] == bought.event_id
    assert_error(door.post("/v1/checkin", json={"ticket": "Z" * 24}), 404, "ticket_not_found")
    assert_error(door.post("/v1/checkin", json={"ticket": "x" * 5000}), 422)
    assert_error(door.post("/v1/checkin", json={"ticket": token, "gate": "<script>"}), 422)
    # Staff only.
    assert_error(httpx.post(f"{door.base_url}/v1/checkin", json={"ticket": token}), 401)
    assert_error(
        httpx.post(
            f"{door.base_url}/v1/checkin",
            json={"ticket": token},
            headers=fan_headers(bought.fan.token),
        ),
        401,
    )
    # None of that used the ticket.
    ok = door.post("/v1/checkin", json={"ticket": token, "event_id": bought.event_id})
    assert ok.status_code == 200, ok.text


def test_the_cli_checks_a_ticket_in_and_refuses_a_second_time(
    bought: Bought, settings: Settings, door: httpx.Client
) -> None:
    fan = bought.fan
    with httpx.Client(
        base_url=door.base_url, timeout=10, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        event_id = create_event(admin, rate=50, quantity=10, prefix="cli")
    buyer = Fan(fan.client, event_id)
    buyer.wait_for_pass()
    hold = buyer.reserve(quantity=1).json()
    assert buyer.confirm(hold["id"]).status_code == 202
    paid = buyer.wait_until(hold["id"], lambda r: r["order_status"] == "paid")
    code = paid["tickets"][0]["code"]

    done = run_cli(settings, "checkin", code, "--gate", "east", "--event", event_id, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["code"] == code and result["gate"] == "east"
    assert result["checked_in_by"].startswith("cli:")

    again = run_cli(settings, "checkin", paid["tickets"][0]["token"])
    assert again.returncode == 1 and again.stdout == ""
    line = again.stderr.strip()
    assert line.startswith("waitroom: ticket_already_used") and "east" in line, line
    assert "\n" not in line
