"""The fans' HTTP API of the waiting room, against a real server, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.harness import ADMIN_TOKEN, ServerThread, running, sync_redis
from tests.queue_support import create_event, fan_headers, new_ip
from tests.test_errors import assert_error
from waitroom.core.keys import Keys
from waitroom.core.settings import Settings

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def rds(settings: Settings) -> Iterator[redis.Redis]:
    """A plain Redis client, to play the admission loop's part in the room's data."""
    client = sync_redis(settings.redis_url)
    try:
        yield client
    finally:
        client.close()


def join(
    client: httpx.Client, event_id: str, token: str | None = None, ip: str | None = None
) -> httpx.Response:
    headers = fan_headers(token, ip or new_ip()) if token else {"X-Forwarded-For": ip or new_ip()}
    return client.post(f"/v1/events/{event_id}/queue", headers=headers)


def new_fan(client: httpx.Client, event_id: str) -> tuple[str, dict[str, Any]]:
    """Join as a new visitor (this helper keeps no cookie); its token and body."""
    client.cookies.clear()
    response = client.post(f"/v1/events/{event_id}/queue", headers={"X-Forwarded-For": new_ip()})
    client.cookies.clear()
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body["visitor_token"], body


def me(client: httpx.Client, event_id: str, token: str) -> httpx.Response:
    return client.get(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))


def test_a_new_fan_gets_a_visitor_token_a_cookie_and_a_place(
    server: ServerThread, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    with httpx.Client(base_url=server.url) as browser:
        first = browser.post(f"/v1/events/{event_id}/queue")
        assert first.status_code == 201, first.text
        body = first.json()
        assert set(body) == {
            "event_id",
            "fan_id",
            "status",
            "position",
            "fans_ahead",
            "eta_seconds",
            "queue_pass",
            "visitor_token",
            "place_receipt",
            "returned",  # null unless the fan is on a sold-out sale's waitlist
        }
        assert (body["event_id"], body["status"], body["position"], body["fans_ahead"]) == (
            event_id,
            "waiting",
            1,
            0,
        )
        assert body["eta_seconds"] is None  # nothing admitted yet: unknown, not invented
        assert body["fan_id"].startswith("v_") and body["queue_pass"] is None
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"wr_visitor={body['visitor_token']};")
        for attribute in ("HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=604800"):
            assert attribute in cookie
        assert first.headers["cache-control"] == "no-store"
        assert first.headers["x-ratelimit-limit"] == "40"

        # The browser sends the cookie back: same fan, same place, 200.
        again = browser.post(f"/v1/events/{event_id}/queue", json={})
        assert again.status_code == 200
        assert again.json() | {"visitor_token": body["visitor_token"]} == body
        assert "set-cookie" not in again.headers
        assert again.headers["x-ratelimit-limit"] == "5"  # now the fan's own limit shows
        assert browser.get(f"/v1/events/{event_id}/queue/me").json()["fan_id"] == body["fan_id"]


def test_a_fan_with_a_token_keeps_the_place_across_joins(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    token, _ = new_fan(client, event_id)
    new_fan(client, event_id)
    again = join(client, event_id, token)
    assert again.status_code == 200
    assert (again.json()["position"], again.json()["visitor_token"]) == (1, None)


def test_positions_count_the_fans_ahead_and_fall_as_they_leave(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    fans = [new_fan(client, event_id) for _ in range(4)]
    assert [body["position"] for _, body in fans] == [1, 2, 3, 4]
    last = fans[-1][0]
    assert me(client, event_id, last).json()["position"] == 4
    left = client.delete(f"/v1/events/{event_id}/queue/me", headers=fan_headers(fans[0][0]))
    assert (left.status_code, left.json()) == (200, {"left": True})
    client.delete(f"/v1/events/{event_id}/queue/me", headers=fan_headers(fans[2][0]))
    status = me(client, event_id, last).json()
    assert (status["status"], status["position"], status["fans_ahead"]) == ("waiting", 2, 1)


def test_leaving_twice_and_asking_after_leaving_say_not_in_line(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    token, _ = new_fan(client, event_id)
    path = f"/v1/events/{event_id}/queue/me"
    assert client.delete(path, headers=fan_headers(token)).status_code == 200
    assert_error(client.delete(path, headers=fan_headers(token)), 404, "not_in_line")
    assert_error(client.get(path, headers=fan_headers(token)), 404, "not_in_line")
    # Joining again is a new place at the back.
    assert join(client, event_id, token).status_code == 201


def test_routes_that_need_an_identity_say_so(client: httpx.Client, admin: httpx.Client) -> None:
    event_id = create_event(admin)
    path = f"/v1/events/{event_id}/queue/me"
    with httpx.Client(base_url=str(client.base_url)) as fresh:
        for response in (fresh.get(path), fresh.delete(path)):
            error = assert_error(response, 401, "identity_missing")
            assert error["message"]
            assert response.headers["www-authenticate"].startswith("Bearer")


def _visitor(secret: bytes, **claims: Any) -> str:
    payload = {
        "sub": "v_" + "a" * 32,
        "iat": int(time.time()),
        "exp": int(time.time()) + 60,
        "typ": "visitor",
    }
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        ("Bearer " + _visitor(b"not-our-secret-not-our-secret-not-our-secret"), "identity_invalid"),
        (
            "Bearer "
            + jwt.encode(
                {"sub": "v_" + "a" * 32, "exp": 9999999999, "typ": "visitor"}, "", algorithm="none"
            ),
            "identity_invalid",
        ),
        ("Bearer not.a.token", "identity_invalid"),
        ("Basic dXNlcjpwYXNz", "identity_invalid"),
        ("Bearer", "identity_invalid"),
    ],
    ids=["forged", "alg-none", "garbage", "wrong-scheme", "empty"],
)
def test_bad_identity_tokens_are_401(
    client: httpx.Client, admin: httpx.Client, authorization: str, code: str
) -> None:
    event_id = create_event(admin)
    for method in ("POST", "GET", "DELETE"):
        path = f"/v1/events/{event_id}/queue" + ("" if method == "POST" else "/me")
        response = client.request(method, path, headers={"Authorization": authorization})
        assert_error(response, 401, code)


def test_an_expired_token_is_401_expired_and_a_bad_cookie_is_cleared(
    server: ServerThread, settings: Settings, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    secret = (Path(settings.run_dir) / "visitor-secret").read_bytes().strip()
    expired = _visitor(secret, iat=int(time.time()) - 999, exp=int(time.time()) - 1)
    valid = _visitor(secret)
    with httpx.Client(base_url=server.url) as browser:
        response = browser.post(
            f"/v1/events/{event_id}/queue", headers={"Authorization": f"Bearer {expired}"}
        )
        assert_error(response, 401, "identity_expired")
        browser.cookies.set("wr_visitor", expired)
        response = browser.post(f"/v1/events/{event_id}/queue")
        assert_error(response, 401, "identity_expired")
        assert response.headers["set-cookie"].startswith("wr_visitor=;")
        assert "Max-Age=0" in response.headers["set-cookie"]
        # A valid token we signed ourselves is of course accepted.
        assert join(browser, event_id, valid).status_code == 201


def test_unknown_events_are_404(client: httpx.Client) -> None:
    token = _any_token(client)
    for event_id in ("no-such-event", "Not-An-Id", "x" * 80):
        assert_error(join(client, event_id), 404, "event_not_found")
        assert_error(me(client, event_id, token), 404, "event_not_found")
        response = client.delete(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))
        assert_error(response, 404, "event_not_found")
        assert_error(client.get(f"/v1/events/{event_id}/lottery"), 404, "event_not_found")


def _any_token(client: httpx.Client) -> str:
    # A valid visitor token: identities are not per event, any event issues one.
    with httpx.Client(base_url=str(client.base_url), headers=ADMIN) as admin:
        event_id = create_event(admin)
    token, _ = new_fan(client, event_id)
    return token


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"{}", "application/json", 201),
        (b"{", "application/json", 400),
        (b"not json", "application/json", 400),
        (b"[]", "application/json", 422),
        (b'{"surprise": 1}', "application/json", 422),
        (b"{}", "text/plain", 415),
    ],
)
def test_join_bodies_are_empty_or_an_empty_object(
    client: httpx.Client, admin: httpx.Client, content: bytes, content_type: str, status: int
) -> None:
    event_id = create_event(admin)
    client.cookies.clear()
    response = client.post(
        f"/v1/events/{event_id}/queue",
        content=content,
        headers={"Content-Type": content_type, "X-Forwarded-For": new_ip()},
    )
    client.cookies.clear()
    if status >= 400:
        assert_error(response, status)
    else:
        assert response.status_code == status


def test_a_huge_join_body_is_413(client: httpx.Client, admin: httpx.Client) -> None:
    event_id = create_event(admin)

    def chunks() -> Iterator[bytes]:
        yield b'{"x": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'"}'

    response = client.post(
        f"/v1/events/{event_id}/queue",
        content=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 413, "body_too_large")


def test_bursting_joins_from_one_ip_is_429_with_the_headers(
    server: ServerThread, client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    ip = new_ip()

    async def burst() -> tuple[list[httpx.Response], float]:
        started = time.monotonic()
        # A client per request: no cookie is shared, so each request is a new visitor.
        responses = await asyncio.gather(*(_post(server.url, event_id, ip) for _ in range(70)))
        return list(responses), time.monotonic() - started

    responses, elapsed = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {201, 429}
    # The burst of 40, plus at most what the refill rate (20/s) added meanwhile.
    assert 40 <= statuses.count(201) <= 40 + 20 * elapsed + 1
    response = next(r for r in responses if r.status_code == 429)
    error = assert_error(response, 429, "rate_limited")
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-limit"] == "40"
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert int(response.headers["x-ratelimit-reset"]) >= 1
    assert error["details"]["retry_after_s"] >= 1
    # Another address is not affected.
    assert join(client, event_id).status_code == 201


async def _post(base_url: str, event_id: str, ip: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url) as fan:
        return await fan.post(f"/v1/events/{event_id}/queue", headers={"X-Forwarded-For": ip})


def test_one_fan_retrying_fast_is_429_on_its_own_limit(
    client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    token, _ = new_fan(client, event_id)
    statuses = [join(client, event_id, token).status_code for _ in range(8)]
    assert statuses[:5] == [200] * 5 and statuses[-1] == 429
    last = join(client, event_id, token)
    assert last.headers["x-ratelimit-limit"] == "5"


def test_sold_out_paused_and_admitted_show_in_the_status(
    client: httpx.Client, admin: httpx.Client, rds: redis.Redis, settings: Settings
) -> None:
    event_id = create_event(admin)
    ek = Keys(settings.redis_prefix).event(event_id)
    first, _ = new_fan(client, event_id)
    second, _ = new_fan(client, event_id)

    rds.hset(ek.meta, "paused", "1")
    status = me(client, event_id, second).json()
    assert (status["status"], status["position"]) == ("paused", 2)

    # The admission loop admits the first fan (its documented writes).
    the_pass = jwt.encode({"exp": 1800000000, "sub": "x"}, "k" * 32, algorithm="HS256")
    fan_id = me(client, event_id, first).json()["fan_id"]
    rds.zrem(ek.queue, fan_id)
    rds.hset(ek.admitted, fan_id, the_pass)
    rds.hincrby(ek.meta, "admitted_total", 1)
    admitted = me(client, event_id, first).json()
    assert (admitted["status"], admitted["queue_pass"], admitted["position"]) == (
        "admitted",
        the_pass,
        None,
    )
    rejoined = join(client, event_id, first)
    assert (rejoined.status_code, rejoined.json()["status"]) == (200, "admitted")
    left = client.delete(f"/v1/events/{event_id}/queue/me", headers=fan_headers(first))
    assert_error(left, 409, "already_admitted")

    rds.hset(ek.meta, mapping={"paused": "0", "sold_out": "1"})
    status = me(client, event_id, second).json()
    assert (status["status"], status["position"]) == ("sold_out", 1)
    latecomer = join(client, event_id)
    assert latecomer.status_code == 200
    body = latecomer.json()
    assert (body["status"], body["position"], body["fans_ahead"]) == ("sold_out", None, None)
    assert me(client, event_id, first).json()["status"] == "admitted"


def test_the_wait_is_estimated_once_admissions_are_observed(
    client: httpx.Client, admin: httpx.Client, rds: redis.Redis, settings: Settings
) -> None:
    event_id = create_event(admin)
    ek = Keys(settings.redis_prefix).event(event_id)
    tokens = [new_fan(client, event_id)[0] for _ in range(3)]
    assert me(client, event_id, tokens[2]).json()["eta_seconds"] is None
    time.sleep(0.6)
    rds.hincrby(ek.meta, "admitted_total", 10)  # ~10 admissions in the last ~0.6 s
    eta = me(client, event_id, tokens[2]).json()["eta_seconds"]
    assert eta is not None and 0 <= eta < 5


def test_the_lottery_is_committed_before_and_verifiable_after_the_draw(
    client: httpx.Client, admin: httpx.Client
) -> None:
    fifo = create_event(admin)
    assert_error(client.get(f"/v1/events/{fifo}/lottery"), 404, "no_lottery")

    event_id = create_event(
        admin, mode="lottery", opens_at=datetime.now(UTC) + timedelta(seconds=2)
    )
    before = client.get(f"/v1/events/{event_id}/lottery").json()
    assert (before["seed"], before["drawn"], before["entries"]) == (None, False, [])
    assert len(before["commitment"]) == 64
    fans = [new_fan(client, event_id) for _ in range(6)]
    assert {body["status"] for _, body in fans} == {"prequeue"}
    assert {body["position"] for _, body in fans} == {None}
    status = me(client, event_id, fans[0][0]).json()
    assert (status["status"], status["position"]) == ("prequeue", None)

    time.sleep(2.1)
    deadline = time.monotonic() + 10
    after = client.get(f"/v1/events/{event_id}/lottery").json()
    while not after["drawn"] and time.monotonic() < deadline:
        time.sleep(0.05)
        after = client.get(f"/v1/events/{event_id}/lottery").json()
    assert after["drawn"] and after["commitment"] == before["commitment"]

    # Anyone can check the draw with the recipe of waitroom/line/lottery.py (and README).
    seed = bytes.fromhex(after["seed"])
    assert hashlib.sha256(seed).hexdigest() == after["commitment"]
    pool = hashlib.sha256("".join(sorted(after["entries"])).encode("ascii")).digest()
    mixed = hashlib.sha256(seed + pool).digest()
    key = lambda e: (hashlib.sha256(mixed + e.encode("ascii")).digest(), e)  # noqa: E731
    assert sorted(after["entries"], key=key) == after["entries"]
    assert after["my_entry"] is None and after["scheme"] == 2
    # The list does not tell who entered: no entry is the sha256 of a fan id.
    assert not {hashlib.sha256(b["fan_id"].encode()).hexdigest() for _, b in fans} & set(
        after["entries"]
    )
    # ...and each fan finds their own place: the line follows the published order.
    for token, _ in fans:
        mine = client.get(f"/v1/events/{event_id}/lottery", headers=fan_headers(token))
        assert mine.headers["cache-control"] == "private, no-store"
        place = after["entries"].index(mine.json()["my_entry"]) + 1
        assert me(client, event_id, token).json()["position"] == place
    late = join(client, event_id)
    assert (late.status_code, late.json()["position"]) == (201, 7)


def test_the_queue_routes_are_in_the_openapi_document(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    join_op = document["paths"]["/v1/events/{event_id}/queue"]["post"]
    assert join_op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"] == (
        "#/components/schemas/QueueStatus"
    )
    assert {"401", "404", "429"} <= set(join_op["responses"])
    assert set(document["paths"]["/v1/events/{event_id}/queue/me"]) == {"get", "delete"}
    assert "/v1/events/{event_id}/lottery" in document["paths"]
    status = document["components"]["schemas"]["QueueStatus"]
    assert set(status["properties"]["status"]["enum"]) == {
        "waiting",
        "prequeue",
        "admitted",
        "sold_out",
        "paused",
        "waitlist",
    }


def test_joins_are_counted_and_timed(client: httpx.Client, admin: httpx.Client) -> None:
    event_id = create_event(admin)
    new_fan(client, event_id)
    join(client, "no-such-event")
    text = client.get("/metrics").text
    assert 'waitroom_joins_total{outcome="created"}' in text
    assert 'waitroom_joins_total{outcome="not_found"}' in text
    assert "waitroom_join_duration_seconds_bucket" in text


# --- host-site users ----------------------------------------------------------------------


def test_with_host_site_users_configured_only_their_tokens_identify_fans(
    settings: Settings, admin: httpx.Client
) -> None:
    private = Ed25519PrivateKey.generate()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    users = msgspec.structs.replace(
        settings,
        user_jwt_public_key=public_pem,
        user_jwt_algorithm="EdDSA",
        user_jwt_issuer="https://tickets.example",
        user_jwt_audience="waitroom",
    )
    event_id = create_event(admin)
    claims = {
        "sub": "alice",
        "iss": "https://tickets.example",
        "aud": "waitroom",
        "exp": int(time.time()) + 60,
    }
    token = jwt.encode(claims, private, algorithm="EdDSA")
    with running(users) as server, httpx.Client(base_url=server.url) as client:
        joined = join(client, event_id, token)
        assert joined.status_code == 201, joined.text
        body = joined.json()
        assert (body["fan_id"], body["visitor_token"]) == ("u:alice", None)
        assert "set-cookie" not in joined.headers
        assert_error(join(client, event_id), 401, "identity_missing")
        forged = jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA")
        assert_error(join(client, event_id, forged), 401, "identity_invalid")
        assert me(client, event_id, token).json()["position"] == 1


def test_many_concurrent_joins_get_distinct_dense_places(
    server: ServerThread, admin: httpx.Client
) -> None:
    event_id = create_event(admin)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"/v1/events/{event_id}/queue", headers={"X-Forwarded-For": new_ip()}
                    )
                    for _ in range(100)
                )
            )
        assert {r.status_code for r in responses} == {201}
        return sorted(r.json()["position"] for r in responses)

    assert asyncio.run(burst()) == list(range(1, 101))
