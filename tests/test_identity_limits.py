"""Identity limits: caps on places per address and subnet, polls charged to the address, and
one place per host-site user, against real Redis (join.lua) and a real server.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis.asyncio import Redis

from admission import leader
from admission.leader import Candidate
from tests.harness import ADMIN_TOKEN, ServerThread, running, sync_redis
from tests.queue_support import create_event, fan_headers, fresh_room_keys, make_room, new_ip
from tests.test_errors import assert_error
from waitroom.core.keys import EventKeys, Keys
from waitroom.core.settings import Settings
from waitroom.line import challenge, scripts
from waitroom.line.ratelimit import ADDRESS_REQUESTS, Limit
from waitroom.line.scripts import JoinGate

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WIDE = Limit(rate=1000.0, burst=1000)
NOW = 1_800_000_000.0
HOUR = 3600.0


@pytest.fixture
async def ek(settings: Settings, redis: Redis) -> AsyncIterator[EventKeys]:
    keys = fresh_room_keys(settings)
    await make_room(redis, keys)
    yield keys


def gate(ip: str, *, address_cap: int = 3, subnet_cap: int = 5) -> JoinGate:
    address, subnet = challenge.networks(ip)
    return JoinGate(
        address=address,
        subnet=subnet,
        address_cap=address_cap,
        subnet_cap=subnet_cap,
        capped_retry_ms=30_000,
    )


async def join(
    redis: Redis,
    ek: EventKeys,
    ip: str,
    now: float = NOW,
    fan: str | None = None,
    **caps: int,
) -> scripts.JoinReply:
    reply = await scripts.join(
        redis,
        ek,
        fan or "v_" + secrets.token_hex(16),
        now=now,
        ip=ip,
        ip_limit=WIDE,
        fan_limit=None,
        gate=gate(ip, **caps),
    )
    assert reply is not None
    return reply


async def live(redis: Redis, ek: EventKeys, ip: str) -> tuple[int, int]:
    """The live places of ``ip``'s address and subnet."""
    address, subnet = challenge.networks(ip)
    counts = await redis.hmget(ek.live, [address, subnet])
    return int(counts[0] or 0), int(counts[1] or 0)


# --- the caps in join.lua ------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_address_at_its_cap_waits_until_one_of_its_places_is_no_longer_live(
    redis: Redis, ek: EventKeys
) -> None:
    ip = "192.0.2.10"
    fans = [f"v_cap{i}" for i in range(4)]
    outcomes = [(await join(redis, ek, ip, fan=fan)).outcome for fan in fans]
    assert outcomes == ["joined"] * 3 + ["capped"]
    capped = await join(redis, ek, ip, now=NOW + 3600)
    # Time alone frees nothing: the three fans are still waiting.
    assert (capped.outcome, capped.state) == ("capped", "address")
    assert capped.limit.retry_after_ms == 30_000
    assert await live(redis, ek, ip) == (3, 3)
    # Its neighbours in the /24 were not stopped by the address's cap.
    assert (await join(redis, ek, "192.0.2.11")).outcome == "joined"
    # One fan leaves: its place is free for the next fan of the address.
    assert await scripts.leave(redis, ek, fans[0]) == "left"
    assert await live(redis, ek, ip) == (2, 3)
    assert (await join(redis, ek, ip, fan=fans[3])).outcome == "joined"
    assert await live(redis, ek, ip) == (3, 4)


@pytest.mark.anyio
async def test_places_dropped_as_abandoned_or_admitted_stop_counting(
    redis: Redis, ek: EventKeys
) -> None:
    ip = "192.0.2.20"
    await redis.hset(ek.meta, "grace_s", 60)
    for i in range(3):
        await join(redis, ek, ip, fan=f"v_old{i}")
    assert await live(redis, ek, ip) == (3, 3)
    # Silent past the grace period: the sweep drops the three, and the address is free.
    assert await scripts.sweep(redis, ek, now=NOW + 120, limit=100) == (3, False)
    assert await live(redis, ek, ip) == (0, 0)
    assert await redis.exists(ek.live) == 0  # counters at zero are removed, not kept
    # Admitted: the fan keeps its pass (and its entry in `fans`), not a live place.
    fans = [f"v_new{i}" for i in range(3)]
    for fan in fans:
        await join(redis, ek, ip, now=NOW + 200, fan=fan)
    await leader.acquire(redis, ek, "tok")
    candidates = [
        Candidate(fan, f"pass-of-{fan}", f"jti-{fan}", int(NOW) + 900, i + 1)
        for i, fan in enumerate(fans[:2])
    ]
    reply = await leader.admit(redis, ek, "tok", candidates, limit=2, cutoff=None)
    assert reply.admitted == 2
    assert await live(redis, ek, ip) == (1, 1)
    again = await join(redis, ek, ip, now=NOW + 201, fan=fans[0])
    assert (again.state, again.queue_pass) == ("admitted", "pass-of-v_new0")
    # An admitted fan who "leaves" keeps its pass and frees nothing twice.
    assert await scripts.leave(redis, ek, fans[0]) == "admitted"
    assert await live(redis, ek, ip) == (1, 1)
    assert await scripts.leave(redis, ek, fans[2]) == "left"
    assert await redis.exists(ek.live) == 0


@pytest.mark.anyio
async def test_a_subnet_at_its_cap_is_refused_whichever_of_its_addresses_asks(
    redis: Redis, ek: EventKeys
) -> None:
    for i in range(5):
        assert (await join(redis, ek, f"198.51.100.{i}")).outcome == "joined"
    refused = await join(redis, ek, "198.51.100.200")
    assert (refused.outcome, refused.state) == ("capped", "subnet")
    assert (await join(redis, ek, "198.51.101.1")).outcome == "joined"  # another /24


@pytest.mark.anyio
async def test_ipv6_counts_a_64_as_one_address_and_a_48_as_its_subnet(
    redis: Redis, ek: EventKeys
) -> None:
    for i in range(5):
        assert (await join(redis, ek, f"2001:db8:7:{i}::/64")).outcome == "joined"
    refused = await join(redis, ek, "2001:db8:7:ff::/64")
    assert (refused.outcome, refused.state) == ("capped", "subnet")
    assert (await join(redis, ek, "2001:db8:8::/64")).outcome == "joined"


@pytest.mark.anyio
async def test_a_fan_already_in_line_is_never_capped_nor_counted_again(
    redis: Redis, ek: EventKeys
) -> None:
    fan = "v_" + secrets.token_hex(16)
    ip = "192.0.2.50"
    replies = [
        await scripts.join(
            redis,
            ek,
            fan,
            now=NOW,
            ip=ip,
            ip_limit=WIDE,
            fan_limit=None,
            gate=gate(ip, address_cap=1),
        )
        for _ in range(2)
    ]
    first, again = replies
    assert first is not None and again is not None
    assert (first.outcome, first.created, again.outcome, again.created) == (
        "joined",
        True,
        "joined",
        False,
    )


# --- the address's request bucket (polls, WebSocket handshakes, challenges) ----------------


@pytest.mark.anyio
async def test_charging_an_address_takes_from_one_bucket_per_event(
    settings: Settings, redis: Redis
) -> None:
    ek = Keys(settings.redis_prefix).event("limits-" + secrets.token_hex(4))
    ip = "192.0.2.77"
    decisions = [
        await scripts.charge(redis, ek, ip, now=NOW, limit=ADDRESS_REQUESTS)
        for _ in range(ADDRESS_REQUESTS.burst + 1)
    ]
    assert all(d.allowed for d in decisions[:-1])
    assert not decisions[-1].allowed
    assert decisions[-1].retry_after_ms == pytest.approx(1000 / ADDRESS_REQUESTS.rate, abs=1)
    assert (await scripts.charge(redis, ek, "192.0.2.78", now=NOW, limit=ADDRESS_REQUESTS)).allowed


@pytest.fixture(scope="module")
def pow_server(settings: Settings) -> Iterator[ServerThread]:
    with running(msgspec.structs.replace(settings, challenge=True)) as srv:
        yield srv


@pytest.fixture
def admin(pow_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pow_server.url, headers=ADMIN) as client:
        yield client


@pytest.fixture
def fan(pow_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pow_server.url) as client:
        yield client


def paid_join(client: httpx.Client, event_id: str, ip: str) -> httpx.Response:
    client.cookies.clear()
    headers = {"X-Forwarded-For": ip}
    offer = client.post(f"/v1/events/{event_id}/challenge", headers=headers)
    assert offer.status_code == 200, offer.text
    headers[challenge.HEADER] = challenge.solve(offer.json())
    response = client.post(f"/v1/events/{event_id}/queue", headers=headers)
    client.cookies.clear()
    return response


def test_polls_are_charged_to_the_address_and_refused_beyond_its_bucket(
    fan: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin)
    ip = new_ip()
    token = paid_join(fan, event_id, ip).json()["visitor_token"]
    url = f"/v1/events/{event_id}/queue/me"
    bucket = Keys(settings.redis_prefix).event(event_id).bucket("addr", ip)
    rate = ADDRESS_REQUESTS.rate
    with sync_redis(settings.redis_url) as sync:

        def level() -> tuple[float, int]:
            tokens, at = sync.hmget(bucket, "t", "ms")
            assert tokens is not None and at is not None
            return float(tokens), int(at)

        # Each poll takes one token: the level is what the refill alone would give, less one.
        for _ in range(3):
            before, at = level()
            assert fan.get(url, headers=fan_headers(token, ip)).status_code == 200
            after, later = level()
            refilled = min(ADDRESS_REQUESTS.burst, before + (later - at) * rate / 1000)
            assert after == pytest.approx(refilled - 1, abs=1e-3)
        # An address whose bucket is empty (polls, challenges, WebSocket tickets) is refused.
        sync.hset(bucket, mapping={"t": "0", "ms": str(int(time.time() * 1000) + 5_000)})
    refused = fan.get(url, headers=fan_headers(token, ip))
    assert_error(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1
    # Another address polling for the same fan is not held back.
    other = fan.get(url, headers=fan_headers(token, new_ip()))
    assert other.status_code == 200


def test_a_full_address_is_told_to_wait_with_retry_after(
    fan: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin)
    ip = new_ip()
    address, _ = challenge.networks(ip)
    # The address has its whole cap of places waiting in line (as 256 paid joins would).
    live = Keys(settings.redis_prefix).event(event_id).live
    with sync_redis(settings.redis_url) as sync:
        sync.hset(live, address, challenge.CAPS.address)
    error = assert_error(paid_join(fan, event_id, ip), 429, "identity_limit")
    assert error["details"]["scope"] == "address"
    assert error["details"]["cap"] == challenge.CAPS.address
    assert error["details"]["retry_after_s"] == challenge.CAPS.retry_after_s
    assert paid_join(fan, event_id, new_ip()).status_code == 201


# --- host-site users -----------------------------------------------------------------------


def test_one_host_site_user_is_one_fan_with_one_place_whatever_tokens_it_presents(
    settings: Settings,
) -> None:
    private = Ed25519PrivateKey.generate()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    users = msgspec.structs.replace(
        settings, challenge=True, user_jwt_public_key=public_pem, user_jwt_algorithm="EdDSA"
    )

    def token(sub: str, **extra: object) -> str:
        claims = {"sub": sub, "exp": int(time.time()) + 600, **extra}
        return jwt.encode(claims, private, algorithm="EdDSA")

    with (
        running(users) as server,
        httpx.Client(base_url=server.url) as client,
        httpx.Client(base_url=server.url, headers=ADMIN) as admin,
    ):
        event_id = create_event(admin)
        url = f"/v1/events/{event_id}/queue"
        # Users skip the proof-of-work by default (WAITROOM_CHALLENGE_FOR_USERS off).
        first = client.post(url, headers=fan_headers(token("alice"), new_ip()))
        assert first.status_code == 201, first.text
        # New tokens (other iat, jti, addresses) for the same user: the same place.
        for n in range(3):  # (the per-fan join limit allows a burst of 5)
            again = client.post(
                url, headers=fan_headers(token("alice", jti=str(n), iat=n), new_ip())
            )
            assert (again.status_code, again.json()["fan_id"], again.json()["position"]) == (
                200,
                "u:alice",
                1,
            )
        other = client.post(url, headers=fan_headers(token("bob"), new_ip()))
        assert (other.status_code, other.json()["position"]) == (201, 2)

    strict = msgspec.structs.replace(users, challenge_for_users=True)
    with (
        running(strict) as server,
        httpx.Client(base_url=server.url) as client,
        httpx.Client(base_url=server.url, headers=ADMIN) as admin,
    ):
        event_id = create_event(admin)
        refused = client.post(
            f"/v1/events/{event_id}/queue", headers=fan_headers(token("carol"), new_ip())
        )
        assert_error(refused, 403, "challenge_required")
