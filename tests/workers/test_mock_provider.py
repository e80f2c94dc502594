"""The mock payment provider over real HTTP: idempotent charges, declines, errors, hangs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.harness import ROOT, free_port
from tests.workers.conftest import Control, stats
from workers.mock_provider import build_parser

pytestmark = pytest.mark.anyio


def body(method: str = "card_ok", amount: int = 2500) -> dict[str, Any]:
    return {"amount_minor": amount, "currency": "EUR", "method": method, "reference": "order-1"}


async def charge(http: httpx.AsyncClient, key: str, method: str = "card_ok") -> httpx.Response:
    return await http.post("/v1/charges", json=body(method), headers={"Idempotency-Key": key})


async def test_the_same_idempotency_key_answers_the_same_charge_and_charges_once(
    http: httpx.AsyncClient, control: Control
) -> None:
    key = uuid.uuid4().hex
    first = await charge(http, key)
    again = await charge(http, key)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json() == again.json()
    assert first.json()["status"] == "succeeded" and first.json()["amount_minor"] == 2500
    numbers = await stats(http)
    assert numbers["attempts"][key] == 2
    fetched = await http.get(f"/v1/charges/{first.json()['id']}")
    assert fetched.status_code == 200 and fetched.json()["id"] == first.json()["id"]


async def test_a_charge_needs_an_idempotency_key_and_a_valid_body(
    http: httpx.AsyncClient, control: Control
) -> None:
    missing = await http.post("/v1/charges", json=body())
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "idempotency_key_missing"
    bad = await http.post(
        "/v1/charges", json={**body(), "currency": "euro"}, headers={"Idempotency-Key": "k"}
    )
    assert bad.status_code == 422 and bad.json()["error"]["details"]["field"] == "currency"
    key = uuid.uuid4().hex
    assert (await charge(http, key)).status_code == 201
    reused = await http.post("/v1/charges", json=body(amount=1), headers={"Idempotency-Key": key})
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"


async def test_declines_by_method_and_by_rate(http: httpx.AsyncClient, control: Control) -> None:
    declined = await charge(http, uuid.uuid4().hex, "card_declined")
    assert declined.status_code == 201 and declined.json()["status"] == "declined"
    await control(decline_methods=["card_blocked"])
    assert (await charge(http, uuid.uuid4().hex, "card_blocked")).json()["status"] == "declined"
    await control(decline_rate=1.0)
    assert (await charge(http, uuid.uuid4().hex)).json()["status"] == "declined"


async def test_errors_once_answers_503_first_and_charges_on_the_retry(
    http: httpx.AsyncClient, control: Control
) -> None:
    key = uuid.uuid4().hex
    first = await charge(http, key, "card_errors_once")
    assert first.status_code == 503 and "retry-after" in first.headers
    assert (await charge(http, key, "card_errors_once")).status_code == 201
    await control(error_rate=1.0)
    assert (await charge(http, uuid.uuid4().hex)).status_code == 503


async def test_a_hanging_charge_is_made_but_answers_only_after_the_client_gave_up(
    http: httpx.AsyncClient, control: Control
) -> None:
    key = uuid.uuid4().hex
    with pytest.raises(httpx.ReadTimeout):
        await http.post(
            "/v1/charges",
            json=body("card_hangs_once"),
            headers={"Idempotency-Key": key},
            timeout=0.3,
        )
    retried = await charge(http, key, "card_hangs_once")
    assert retried.status_code == 200  # the charge went through the first time
    numbers = await stats(http)
    assert numbers["attempts"][key] == 2
    assert numbers["captured_by_reference"]["order-1"] >= 1


async def test_hang_rate_makes_any_charge_hang(http: httpx.AsyncClient, control: Control) -> None:
    await control(hang_rate=1.0, hang_s=30)
    with pytest.raises(httpx.ReadTimeout):
        await http.post(
            "/v1/charges",
            json=body(),
            headers={"Idempotency-Key": "h" + uuid.uuid4().hex},
            timeout=0.3,
        )


async def test_a_charge_is_refunded_once(http: httpx.AsyncClient, control: Control) -> None:
    reference = uuid.uuid4().hex
    made = await http.post(
        "/v1/charges",
        json={**body(), "reference": reference},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    charge_id = made.json()["id"]
    assert (await stats(http))["captured_by_reference"][reference] == 1
    refund = await http.post("/v1/refunds", json={"charge_id": charge_id})
    again = await http.post("/v1/refunds", json={"charge_id": charge_id})
    assert refund.status_code == 201 and again.status_code == 200
    assert refund.json() == again.json()
    assert (await http.get(f"/v1/charges/{charge_id}")).json()["refunded"] is True
    assert reference not in (await stats(http))["captured_by_reference"]
    unknown = await http.post("/v1/refunds", json={"charge_id": "ch_nope"})
    assert unknown.status_code == 404
    declined = await charge(http, uuid.uuid4().hex, "card_declined")
    refused = await http.post("/v1/refunds", json={"charge_id": declined.json()["id"]})
    assert refused.status_code == 409


async def test_control_reads_back_and_refuses_bad_values(
    http: httpx.AsyncClient, control: Control
) -> None:
    await control(latency_ms=5, decline_rate=0.25)
    current = (await http.get("/v1/control")).json()
    assert current["latency_ms"] == 5 and current["decline_rate"] == 0.25
    bad = await http.post("/v1/control", json={"error_rate": 2})
    assert bad.status_code == 422
    unknown = await http.post("/v1/control", json={"explode": True})
    assert unknown.status_code == 422


def test_the_command_line_takes_host_and_port() -> None:
    args = build_parser().parse_args(["--host", "0.0.0.0", "--port", "9999"])
    assert (args.host, args.port) == ("0.0.0.0", 9999)


def test_it_runs_as_its_own_process_with_python_dash_m() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.mock_provider",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the provider did not start"
                time.sleep(0.05)
        assert answer.status_code == 200 and answer.json()["charges"] == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode


async def test_a_charge_can_be_looked_up_by_its_idempotency_key(
    http: httpx.AsyncClient, control: Control
) -> None:
    key = uuid.uuid4().hex
    unknown = await http.get("/v1/charges", params={"idempotency_key": key})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "charge_not_found"
    made = (await charge(http, key)).json()
    found = await http.get("/v1/charges", params={"idempotency_key": key})
    assert found.status_code == 200 and found.json() == made
    refund = await http.post("/v1/refunds", json={"charge_id": made["id"]})
    assert refund.status_code == 201
    again = await http.get("/v1/charges", params={"idempotency_key": key})
    assert again.json()["refunded"] is True
    declined_key = uuid.uuid4().hex
    await charge(http, declined_key, "card_declined")
    declined = await http.get("/v1/charges", params={"idempotency_key": declined_key})
    assert declined.status_code == 200 and declined.json()["status"] == "declined"
    # A request refused with 503 before charging leaves nothing to find.
    errored_key = uuid.uuid4().hex
    assert (await charge(http, errored_key, "card_errors_once")).status_code == 503
    gone = await http.get("/v1/charges", params={"idempotency_key": errored_key})
    assert gone.status_code == 404
    missing = await http.get("/v1/charges")
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "idempotency_key_missing"
    numbers = await stats(http)
    assert numbers["lookups"] >= 5
    assert numbers["refunds_by_reference"]["order-1"] >= 1
