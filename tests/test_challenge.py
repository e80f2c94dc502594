"""Proof-of-work on the way in: the difficulty rule, the ALTCHA format, and joins that pay.

The pure parts (difficulty, verification) are checked with hypothesis; the rest against a
real server with ``WAITROOM_CHALLENGE`` on, real Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import json
import math
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.harness import ADMIN_TOKEN, ServerThread, running
from tests.queue_support import create_event, fan_headers, new_ip
from tests.test_errors import assert_error
from waitroom.core.errors import Forbidden, Gone, SettingsError
from waitroom.core.settings import Settings
from waitroom.line import challenge
from waitroom.line.challenge import Challenges, Policy, Pressure, difficulty, networks

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
POLICY = Policy()
SECRET = b"s" * 32
NOW = 1_800_000_000.0


# --- difficulty (pure) ---------------------------------------------------------------------

counts = st.floats(min_value=0, max_value=1e6, allow_nan=False)
rates = st.floats(min_value=0, max_value=1e7, allow_nan=False)
pressures = st.builds(Pressure, counts, counts, counts, rates)


@given(pressures)
def test_difficulty_stays_between_the_base_and_the_ceiling(p: Pressure) -> None:
    assert POLICY.base <= difficulty(p, POLICY) <= POLICY.max_number


@given(pressures, counts, counts, rates)
def test_difficulty_never_falls_when_an_address_a_subnet_or_the_line_gets_busier(
    p: Pressure, more_address: float, more_subnet: float, more_rate: float
) -> None:
    before = difficulty(p, POLICY)
    for busier in (
        Pressure(p.address + more_address, p.subnet, p.crowd, p.join_rate),
        Pressure(p.address, p.subnet + more_subnet, p.crowd, p.join_rate),
        Pressure(p.address, p.subnet, p.crowd, p.join_rate + more_rate),
    ):
        assert difficulty(busier, POLICY) >= before


@given(
    st.floats(0, POLICY.address_free),
    st.floats(0, POLICY.subnet_free),
    counts,
    st.floats(0, POLICY.expected_joins_per_s),
)
def test_a_normal_crowd_pays_the_base(
    address: float, subnet: float, crowd: float, rate: float
) -> None:
    assert difficulty(Pressure(address, max(address, subnet), crowd, rate), POLICY) == POLICY.base


@given(st.floats(min_value=1e3, max_value=1e6))
def test_a_shared_subnet_gets_a_share_of_a_big_crowd_at_the_base_price(crowd: float) -> None:
    allowance = POLICY.share * crowd
    shared = Pressure(
        address=1, subnet=max(POLICY.subnet_free, allowance), crowd=crowd, join_rate=0
    )
    assert difficulty(shared, POLICY) == POLICY.base


def test_a_farm_on_one_subnet_pays_exponentially_for_each_place() -> None:
    work = [difficulty(Pressure(1, n, 100, 0), POLICY) for n in range(1, 20)]
    assert work[:8] == [POLICY.base] * 8
    # Doubling twice per challenge beyond the allowance: 4x each.
    assert work[9] == 4 * work[8] and work[8] == 4 * POLICY.base
    assert sum(work) > 1_000 * POLICY.base


def test_a_line_growing_faster_than_expected_raises_everyones_price_within_bounds() -> None:
    expected = POLICY.expected_joins_per_s
    assert difficulty(Pressure(1, 1, 10, 4 * expected), POLICY) == 4 * POLICY.base
    assert difficulty(Pressure(1, 1, 10, 1e9), POLICY) == 8 * POLICY.base


def test_networks_fold_ipv4_to_a_24_and_ipv6_to_a_48() -> None:
    assert networks("203.0.113.77") == ("a:203.0.113.77", "n:203.0.113.0/24")
    assert networks("2001:db8:1:2::/64") == ("a:2001:db8:1:2::/64", "n:2001:db8:1::/48")
    assert networks("testclient") == ("a:testclient", "n:testclient")


# --- issue and verify (pure) ---------------------------------------------------------------

CHALLENGES = Challenges(SECRET)


def issued(event: str = "e1", subject: str = "203.0.113.7", now: float = NOW) -> dict[str, Any]:
    body = CHALLENGES.issue(event, subject, 2_000, now)
    return msgspec.structs.asdict(body)


def decode(solution: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.b64decode(solution))
    return data


def encode(data: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


def test_a_solved_challenge_verifies_and_names_its_hash_and_remaining_life() -> None:
    body = issued()
    verified = CHALLENGES.verify(challenge.solve(body), "e1", "203.0.113.7", NOW + 20)
    assert verified.id == body["challenge"]
    assert verified.ttl_ms == (challenge.TTL_S - 20) * 1000
    assert "e=e1" in body["salt"] and "a=203.0.113.7" in body["salt"]


def test_a_wrong_number_or_a_forged_signature_is_invalid() -> None:
    good = decode(challenge.solve(issued()))
    for bad in (
        {**good, "number": good["number"] + 1},
        {**good, "signature": "00" * 32},
        {**good, "salt": good["salt"].replace("e=e1", "e=e2")},
        {**good, "algorithm": "SHA-1"},
    ):
        with pytest.raises(Forbidden) as caught:
            CHALLENGES.verify(encode(bad), "e1", "203.0.113.7", NOW)
        assert caught.value.code == "challenge_invalid"
    with pytest.raises(Forbidden):
        Challenges(b"t" * 32).verify(encode(good), "e1", "203.0.113.7", NOW)


def test_an_old_solution_has_expired_and_others_are_bound_to_their_event_and_address() -> None:
    solution = challenge.solve(issued())
    with pytest.raises(Gone) as expired:
        CHALLENGES.verify(solution, "e1", "203.0.113.7", NOW + challenge.TTL_S)
    assert expired.value.code == "challenge_expired"
    with pytest.raises(Forbidden) as event:
        CHALLENGES.verify(solution, "e2", "203.0.113.7", NOW)
    assert event.value.code == "challenge_wrong_event"
    with pytest.raises(Forbidden) as address:
        CHALLENGES.verify(solution, "e1", "203.0.113.8", NOW)
    assert address.value.code == "challenge_wrong_address"


@given(st.text(max_size=3000) | st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode()))
def test_any_garbage_is_a_clear_refusal(garbage: str) -> None:
    with pytest.raises((Forbidden, Gone)):
        CHALLENGES.verify(garbage, "e1", "203.0.113.7", NOW)


@given(
    st.dictionaries(
        st.sampled_from(["algorithm", "challenge", "number", "salt", "signature"]),
        st.one_of(st.text(max_size=50), st.integers(), st.none(), st.floats()),
    )
)
def test_any_payload_shape_is_a_clear_refusal(data: dict[str, Any]) -> None:
    with pytest.raises((Forbidden, Gone)):
        CHALLENGES.verify(encode(data), "e1", "203.0.113.7", NOW)


# --- over HTTP -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pow_server(settings: Settings) -> Iterator[ServerThread]:
    """A server that wants a solved challenge for every new place."""
    with running(msgspec.structs.replace(settings, challenge=True)) as srv:
        yield srv


@pytest.fixture
def fan(pow_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pow_server.url) as client:
        yield client


@pytest.fixture
def admin(pow_server: ServerThread) -> Iterator[httpx.Client]:
    """The operators' API of the same server (its cache of known events sees its own)."""
    with httpx.Client(base_url=pow_server.url, headers=ADMIN) as client:
        yield client


def get_challenge(client: httpx.Client, event_id: str, ip: str) -> dict[str, Any]:
    response = client.post(f"/v1/events/{event_id}/challenge", headers={"X-Forwarded-For": ip})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def join(
    client: httpx.Client, event_id: str, ip: str, solution: str | None, token: str | None = None
) -> httpx.Response:
    client.cookies.clear()
    headers = fan_headers(token, ip) if token else {"X-Forwarded-For": ip}
    if solution is not None:
        headers[challenge.HEADER] = solution
    return client.post(f"/v1/events/{event_id}/queue", headers=headers)


def test_a_join_without_a_solution_is_told_how_to_get_one(
    fan: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    error = assert_error(join(fan, event_id, new_ip(), None), 403, "challenge_required")
    assert error["details"] == {
        "challenge_url": f"/v1/events/{event_id}/challenge",
        "method": "POST",
        "header": "X-Challenge-Solution",
        "format": "altcha",
    }


def test_a_solved_challenge_buys_one_place_and_a_replay_is_refused(
    fan: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    ip = new_ip()
    body = get_challenge(fan, event_id, ip)
    assert (body["algorithm"], body["maxnumber"], body["header"]) == (
        "SHA-256",
        POLICY.base,
        challenge.HEADER,
    )
    solution = challenge.solve(body)
    first = join(fan, event_id, ip, solution)
    assert first.status_code == 201, first.text
    assert_error(join(fan, event_id, ip, solution), 403, "challenge_replayed")
    # The fan itself comes back without paying again, and keeps its place.
    token = first.json()["visitor_token"]
    again = join(fan, event_id, ip, None, token)
    assert (again.status_code, again.json()["position"]) == (200, 1)


def test_a_known_fan_who_left_pays_again_for_a_new_place(
    fan: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    ip = new_ip()
    token = join(fan, event_id, ip, challenge.solve(get_challenge(fan, event_id, ip))).json()[
        "visitor_token"
    ]
    left = fan.delete(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token, ip))
    assert left.status_code == 200, left.text
    # Only the join script knows this fan is out of line: it refuses, spending nothing.
    assert_error(join(fan, event_id, ip, None, token), 403, "challenge_required")
    back = join(fan, event_id, ip, challenge.solve(get_challenge(fan, event_id, ip)), token)
    assert (back.status_code, back.json()["position"]) == (201, 1)


def test_concurrent_joins_with_one_solution_get_one_place(
    pow_server: ServerThread, admin: httpx.Client, fan: httpx.Client
) -> None:
    event_id = create_event(admin)
    ip = new_ip()
    solution = challenge.solve(get_challenge(fan, event_id, ip))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=pow_server.url) as client:
            headers = {"X-Forwarded-For": ip, challenge.HEADER: solution}
            responses = await asyncio.gather(
                *(client.post(f"/v1/events/{event_id}/queue", headers=headers) for _ in range(20))
            )
        return sorted(r.status_code for r in responses)

    assert asyncio.run(burst()) == [201] + [403] * 19


def test_a_solution_works_only_for_its_event_and_its_address(
    fan: httpx.Client, admin: httpx.Client
) -> None:
    event_id, other_event = create_event(admin), create_event(admin)
    ip = new_ip()
    solution = challenge.solve(get_challenge(fan, event_id, ip))
    assert_error(join(fan, other_event, ip, solution), 403, "challenge_wrong_event")
    assert_error(join(fan, event_id, new_ip(), solution), 403, "challenge_wrong_address")
    assert join(fan, event_id, ip, solution).status_code == 201


def test_an_expired_or_garbled_solution_is_refused_without_a_5xx(
    fan: httpx.Client, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin)
    ip = new_ip()
    secret = (Path(settings.run_dir) / "challenge-secret").read_bytes().strip()
    old = Challenges(secret).issue(event_id, ip, 1_000, time.time() - 2 * challenge.TTL_S)
    assert_error(join(fan, event_id, ip, challenge.solve(old)), 410, "challenge_expired")
    for garbage in ("", "x" * 5000, "not base64!", base64.b64encode(b"{}").decode()):
        assert_error(join(fan, event_id, ip, garbage), 403, "challenge_invalid")


def test_difficulty_rises_for_a_subnet_that_asks_for_many_and_not_for_its_neighbours(
    fan: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin)
    farm = [f"192.0.2.{i}" for i in range(1, 21)]
    prices = [get_challenge(fan, event_id, ip)["maxnumber"] for ip in farm]
    assert prices[: int(POLICY.subnet_free)] == [POLICY.base] * int(POLICY.subnet_free)
    assert prices[-1] > 1000 * POLICY.base
    assert all(a <= b for a, b in itertools.pairwise(prices))
    assert get_challenge(fan, event_id, "198.18.0.1")["maxnumber"] == POLICY.base
    # One address of a household: four at the base price, then doubling.
    home = "198.18.7.7"
    mine = [get_challenge(fan, event_id, home)["maxnumber"] for _ in range(6)]
    # (The counts decay a little between two requests: a few parts per million.)
    assert mine == pytest.approx([POLICY.base] * 4 + [2 * POLICY.base, 4 * POLICY.base], rel=1e-3)


def test_a_line_that_grows_faster_than_expected_raises_the_price(settings: Settings) -> None:
    surging = msgspec.structs.replace(settings, challenge=True, challenge_expected_joins_per_s=1.0)
    with (
        running(surging) as server,
        httpx.Client(base_url=server.url) as client,
        httpx.Client(base_url=server.url, headers=ADMIN) as admin,
    ):
        event_id = create_event(admin)
        assert get_challenge(client, event_id, new_ip())["maxnumber"] == POLICY.base
        for _ in range(30):
            ip = new_ip()
            assert (
                join(
                    client, event_id, ip, challenge.solve(get_challenge(client, event_id, ip))
                ).status_code
                == 201
            )
        asyncio.run(asyncio.sleep(1.1))
        raised = get_challenge(client, event_id, new_ip())["maxnumber"]
    assert raised > POLICY.base
    assert raised <= 8 * POLICY.base
    assert math.log2(raised / POLICY.base) <= POLICY.max_surge_level


def test_the_challenge_of_an_unknown_event_is_a_404(fan: httpx.Client) -> None:
    response = fan.post("/v1/events/no-such-event-here/challenge")
    assert_error(response, 404, "event_not_found")


def test_the_api_document_describes_the_challenge_and_the_header(fan: httpx.Client) -> None:
    doc = fan.get("/openapi.json").json()
    post = doc["paths"]["/v1/events/{event_id}/challenge"]["post"]
    assert "200" in post["responses"]
    join_op = doc["paths"]["/v1/events/{event_id}/queue"]["post"]
    assert challenge.HEADER in [p["name"] for p in join_op["parameters"]]
    assert {"403", "410", "429"} <= set(join_op["responses"])


def test_the_readmes_python_client_solves_and_joins(
    pow_server: ServerThread, admin: httpx.Client
) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(
        part.split("```", 1)[0]
        for part in readme.split("```python")[1:]
        if challenge.HEADER in part.split("```", 1)[0]
    )
    event_id = create_event(admin)
    code = textwrap.dedent(block).replace("https://queue.example.com", pow_server.url)
    code = code.replace("spring-tour", event_id)
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 -- our own README's example
    assert scope["joined"].status_code == 201, scope["joined"].text


def test_the_challenge_key_is_generated_in_development_and_must_be_configured_in_production(
    tmp_path: Path,
) -> None:
    development = Settings(run_dir=str(tmp_path / "dev"))
    key = challenge.load_challenge_secret(development)
    assert len(key) >= 32
    assert challenge.load_challenge_secret(development) == key  # every process reads one file
    with pytest.raises(SettingsError) as refused:
        challenge.load_challenge_secret(Settings(env="production", run_dir=str(tmp_path / "p")))
    assert refused.value.variable == "WAITROOM_CHALLENGE_SECRET_FILE"
    short = tmp_path / "short"
    short.write_text("too short")
    with pytest.raises(SettingsError, match="at least 32"):
        challenge.load_challenge_secret(Settings(challenge_secret_file=str(short)))


def test_ipv4_subnets_come_from_the_address_text_as_ipaddress_would_give_them() -> None:
    for text in ("0.0.0.0", "255.255.255.255", "10.20.30.40", "192.0.2.1"):
        net = ipaddress.ip_network((text, 24), strict=False)
        assert networks(text) == (f"a:{text}", f"n:{net}")
    # Not canonical dotted quads: not taken for IPv4 addresses.
    assert networks("010.1.1.1") == ("a:010.1.1.1", "n:010.1.1.1")
