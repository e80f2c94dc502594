"""Operators: named tokens, failed logins throttled per address and logged, and an audit log
that says who, from where and in which request (over real HTTP, real Redis and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from tests.harness import ADMIN_TOKEN, ServerThread, async_redis, running
from tests.test_errors import assert_error
from waitroom.admin_auth import FAILURES_SCRIPT, OperatorTokens
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings

ALICE = "alice-" + secrets.token_hex(16)
BOB = "bob-" + secrets.token_hex(16)


def _event(event_id: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "name": "Audited",
        "ticket_types": [{"name": "ga", "quantity": 5, "price_minor": 100, "currency": "EUR"}],
    }


@pytest.fixture(scope="module")
def operators_server(settings: Settings) -> Iterator[ServerThread]:
    """A server with three operators and a bucket of 3 failed logins per address."""
    named = msgspec.structs.replace(
        settings, admin_tokens=(f"alice:{ALICE}", f"bob:{BOB}"), admin_auth_failures=3
    )
    with running(named) as srv:
        yield srv


@pytest.fixture
def http(operators_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=operators_server.url, timeout=10) as client:
        yield client


def _as(token: str, address: str, **extra: str) -> dict[str, str]:
    # The test settings trust 127.0.0.1 as a proxy: X-Forwarded-For picks the client address.
    return {"Authorization": f"Bearer {token}", "X-Forwarded-For": address, **extra}


def _audit_rows(settings: Settings, event_id: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            rows = await conn.fetch(
                "SELECT actor, action, host(client_address) AS address, request_id"
                " FROM audit_log WHERE event_id = $1 ORDER BY id",
                event_id,
            )
        finally:
            await conn.close()
        return [dict(r) for r in rows]

    return asyncio.run(fetch())


def test_each_operator_has_a_token_and_the_audit_says_who_from_where_and_which_request(
    http: httpx.Client, settings: Settings
) -> None:
    created = http.post(
        "/v1/admin/events",
        json=_event("audit-alice"),
        headers=_as(ALICE, "198.51.100.7", **{"X-Request-ID": "req-alice-1"}),
    )
    assert created.status_code == 201, created.text
    patched = http.patch(
        "/v1/admin/events/audit-alice/admission",
        json={"paused": True},
        headers=_as(BOB, "2001:db8::5", **{"X-Request-ID": "req-bob-1"}),
    )
    assert patched.status_code == 200, patched.text
    legacy = http.get("/v1/admin/events", headers=_as(ADMIN_TOKEN, "198.51.100.8"))
    assert legacy.status_code == 200
    assert _audit_rows(settings, "audit-alice") == [
        {
            "actor": "admin:alice",
            "action": "event.create",
            "address": "198.51.100.7",
            "request_id": "req-alice-1",
        },
        {
            "actor": "admin:bob",
            "action": "admission.update",
            # The full address: the audit records, it does not limit (no /64 folding).
            "address": "2001:db8::5",
            "request_id": "req-bob-1",
        },
    ]


def test_changes_from_the_legacy_token_are_the_operator_admin(
    http: httpx.Client, settings: Settings
) -> None:
    response = http.post(
        "/v1/admin/events", json=_event("audit-legacy"), headers=_as(ADMIN_TOKEN, "198.51.100.9")
    )
    assert response.status_code == 201
    (row,) = _audit_rows(settings, "audit-legacy")
    assert row["actor"] == "admin:admin"
    assert row["address"] == "198.51.100.9"
    assert row["request_id"] == response.headers["X-Request-ID"]


def test_failed_logins_are_throttled_per_address_even_for_the_right_token(
    http: httpx.Client,
) -> None:
    attacker, operator = "192.0.2.50", "192.0.2.51"
    for _ in range(3):
        assert_error(
            http.get("/v1/admin/events", headers=_as("guess", attacker)), 401, "admin_token_invalid"
        )
    refused = http.get("/v1/admin/events", headers=_as("guess", attacker))
    error = assert_error(refused, 429, "admin_auth_throttled")
    # 3 failures refill over 5 minutes: the next one in about 100 s.
    assert 90 <= int(refused.headers["Retry-After"]) <= 100
    assert error["details"]["retry_after_s"] == int(refused.headers["Retry-After"])
    # The right token from the throttled address is refused too: else guessing would go on.
    assert_error(
        http.get("/v1/admin/events", headers=_as(ALICE, attacker)), 429, "admin_auth_throttled"
    )
    # Other addresses are not locked out, and their successes cost nothing.
    for _ in range(5):
        assert http.get("/v1/admin/events", headers=_as(ALICE, operator)).status_code == 200
    assert_error(http.get("/v1/admin/events", headers=_as("x", operator)), 401)


def test_ipv6_failures_count_per_slash_64(http: httpx.Client) -> None:
    for host in range(3):
        address = f"2001:db8:77:1::{host + 1}"
        assert http.get("/v1/admin/events", headers=_as("guess", address)).status_code == 401
    other_host_same_64 = _as(ALICE, "2001:db8:77:1:ffff::1")
    assert_error(
        http.get("/v1/admin/events", headers=other_host_same_64), 429, "admin_auth_throttled"
    )


def test_each_failure_is_logged_with_address_and_request_id_but_never_the_token(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    guess = "guessed-token-" + secrets.token_hex(8)
    with caplog.at_level(logging.WARNING, logger="waitroom.admin"):
        response = http.get(
            "/v1/admin/events",
            headers=_as(guess, "192.0.2.60", **{"X-Request-ID": "req-guess-1"}),
        )
    assert response.status_code == 401
    failures = [r for r in caplog.records if r.getMessage() == "admin authentication failed"]
    assert len(failures) == 1
    record = failures[0]
    assert record.__dict__["client"] == "192.0.2.60"
    assert record.__dict__["request_id"] == "req-guess-1"
    assert record.__dict__["reason"] == "bad_token"
    assert guess not in json.dumps({k: str(v) for k, v in record.__dict__.items()})


def test_operator_tokens_match_whole_tokens_only() -> None:
    tokens = OperatorTokens({"alice": ALICE, "bob": BOB})
    assert tokens.match(ALICE) == "alice"
    assert tokens.match(BOB) == "bob"
    assert tokens.match(ALICE[:-1]) is None
    assert tokens.match(ALICE + "x") is None
    assert tokens.match("") is None
    assert not OperatorTokens({})


def test_failures_lua_charges_failures_only_and_refuses_everything_when_empty(
    settings: Settings,
) -> None:
    async def run() -> list[list[int]]:
        redis = async_redis(settings.redis_url)
        key = Keys(settings.redis_prefix).admin_auth_failures("lua-" + secrets.token_hex(4))
        t0 = 1_800_000_000_000
        replies = []
        try:
            for now_ms, failed in [
                (t0, 0),  # a success on a fresh bucket: allowed, writes nothing
                (t0, 1),
                (t0, 1),  # the second failure empties a bucket of 2
                (t0 + 100, 0),  # empty: even a success is refused, for 900 ms more
                (t0 + 1000, 1),  # one token back after 1 s at 1/s
                (t0 + 1000, 1),
            ]:
                allowed, retry_ms = await FAILURES_SCRIPT(redis, [key], [1.0, 2, now_ms, failed])
                replies.append([int(allowed), int(retry_ms)])
            replies.append([int(await redis.exists(key)), 0])
        finally:
            await redis.aclose()
        return replies

    assert asyncio.run(run()) == [[1, 0], [1, 0], [1, 0], [0, 900], [1, 0], [0, 1000], [1, 0]]
