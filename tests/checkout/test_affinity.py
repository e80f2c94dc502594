"""Owner affinity (ADR 0017): a named node tells the load balancer where an event's actor is.

A real server named ``node7`` (``WAITROOM_NODE_NAME``), real Redis and PostgreSQL: the answers
that lead to a checkout (the admitted fan's status, a reservation, a refusal, a cancellation)
carry ``Set-Cookie: waitroom_node=node7`` once this node hosts the event's actor, unless the
client sent that cookie already; an unnamed node never sends one. Routing by the cookie
through a real HAProxy is tested in tests/test_nodes.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import redis
from starlette.requests import Request

from inventory.hosting import InventoryHost, node_name_of
from tests.admission.support import create_event, join, me, wait_for
from tests.harness import ServerThread, cleanup, free_port, fresh_settings, running
from tests.queue_support import fan_headers
from waitroom.core.affinity import NODE_COOKIE, add_owner_cookie, cookie_header, owner_cookie
from waitroom.core.errors import SettingsError
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import Settings, load_settings

NODE = "node7"


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, provider: ServerThread
) -> Iterator[Settings]:
    """This module's settings: the checkout module's, with the node named."""
    run_dir: Path = tmp_path_factory.mktemp("affinity-run")
    value = fresh_settings(run_dir, admission_loop=True, payment_url=provider.url)
    value = msgspec.structs.replace(value, node_name=NODE)
    try:
        yield value
    finally:
        cleanup(value)


def _node_cookie(response: httpx.Response) -> SimpleCookie | None:
    """The ``waitroom_node`` cookie the answer sets, if it sets one."""
    for header in response.headers.get_list("set-cookie"):
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(header)
        if NODE_COOKIE in cookie:
            return cookie
    return None


def _admitted_fan(client: httpx.Client, event_id: str) -> tuple[str, str]:
    """A new fan, admitted: (visitor token, queue pass)."""
    _, token = join(client, event_id)

    def admitted() -> str | None:
        body = me(client, event_id, token)
        return body["queue_pass"] if body["status"] == "admitted" else None

    queue_pass: str = wait_for(admitted, timeout=15)
    return token, queue_pass


def _reserve(
    client: httpx.Client, event_id: str, token: str, queue_pass: str, cookie: str | None = None
) -> httpx.Response:
    headers = {
        **fan_headers(token),
        "X-Queue-Pass": queue_pass,
        "Idempotency-Key": uuid.uuid4().hex,
    }
    if cookie is not None:
        headers["Cookie"] = f"{NODE_COOKIE}={cookie}"
    return client.post(
        f"/v1/events/{event_id}/reservations",
        json={"ticket_type": "ga", "quantity": 1},
        headers=headers,
    )


def test_a_reservation_names_the_node_hosting_the_actor(
    admin: httpx.Client, client: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=10)
    token, queue_pass = _admitted_fan(client, event_id)
    client.cookies.clear()
    response = _reserve(client, event_id, token, queue_pass)
    assert response.status_code == 201, response.text
    cookie = _node_cookie(response)
    assert cookie is not None, response.headers
    morsel = cookie[NODE_COOKIE]
    assert morsel.value == NODE
    # Sent back with this event's reservations only: paying and polling stay spread out.
    assert morsel["path"] == f"/v1/events/{event_id}/reservations"
    assert morsel["httponly"] and morsel["samesite"] == "Lax"
    assert int(morsel["max-age"]) > 0
    # A client that sends it already is not told again.
    token2, pass2 = _admitted_fan(client, event_id)
    client.cookies.clear()
    again = _reserve(client, event_id, token2, pass2, cookie=NODE)
    assert again.status_code == 201, again.text
    assert _node_cookie(again) is None
    # One naming another node (stale, or forged) is put right: it is only a hint.
    token3, pass3 = _admitted_fan(client, event_id)
    client.cookies.clear()
    stale = _reserve(client, event_id, token3, pass3, cookie="node1")
    assert stale.status_code == 201, stale.text
    fixed = _node_cookie(stale)
    assert fixed is not None and fixed[NODE_COOKIE].value == NODE


def test_an_admitted_fans_status_and_a_refusal_carry_the_cookie(
    admin: httpx.Client, client: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=1)
    first_token, first_pass = _admitted_fan(client, event_id)
    client.cookies.clear()
    assert _reserve(client, event_id, first_token, first_pass).status_code == 201
    # The actor is hosted here now: the next admitted fan's status names this node...
    _, token = join(client, event_id)
    client.cookies.clear()

    def admitted() -> httpx.Response | None:
        response = client.get(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))
        assert response.status_code == 200, response.text
        return response if response.json()["status"] == "admitted" else None

    status: httpx.Response = wait_for(admitted, timeout=15)
    cookie = _node_cookie(status)
    assert cookie is not None and cookie[NODE_COOKIE].value == NODE
    # ... and so does the refusal of its reservation (the one ticket is held): the retry
    # goes to the owner too.
    client.cookies.clear()
    refused = _reserve(client, event_id, token, status.json()["queue_pass"])
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "tickets_held"
    cookie = _node_cookie(refused)
    assert cookie is not None and cookie[NODE_COOKIE].value == NODE


def test_a_fan_still_waiting_gets_no_cookie(admin: httpx.Client, client: httpx.Client) -> None:
    event_id = create_event(admin, rate=50, paused=True)
    _, token = join(client, event_id)
    response = client.get(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))
    assert response.status_code == 200 and response.json()["status"] == "paused"
    assert _node_cookie(response) is None


def test_an_unnamed_node_sends_no_cookie(
    settings: Settings, admin: httpx.Client, client: httpx.Client
) -> None:
    event_id = create_event(admin, rate=50, quantity=10)
    token, queue_pass = _admitted_fan(client, event_id)
    with (
        running(msgspec.structs.replace(settings, node_name="")) as unnamed,
        httpx.Client(base_url=unnamed.url, timeout=10) as other,
    ):
        response = _reserve(other, event_id, token, queue_pass)
        assert response.status_code == 201, response.text
        assert _node_cookie(response) is None
        status = other.get(f"/v1/events/{event_id}/queue/me", headers=fan_headers(token))
        assert status.status_code == 200, status.text
        assert _node_cookie(status) is None


def test_the_cookie_is_only_sent_when_it_says_something() -> None:
    assert owner_cookie(None, None, "e1", secure=False) is None
    assert owner_cookie("node1", "node1", "e1", secure=False) is None
    assert owner_cookie("node1", "node2", "e1", secure=False) == cookie_header(
        "node2", "e1", secure=False
    )
    assert owner_cookie(None, "node2", "e1", secure=True) == cookie_header(
        "node2", "e1", secure=True
    )
    assert cookie_header("node2", "e1", secure=True).endswith("; Secure")
    assert "Secure" not in cookie_header("node2", "e1", secure=False)
    assert "; Path=/v1/events/e1/reservations;" in cookie_header("node2", "e1", secure=False)


def test_a_node_id_carries_the_balancers_name() -> None:
    assert node_name_of("node1/host:123:abcd") == "node1"
    assert node_name_of("host:123:abcd") is None
    assert node_name_of("/host:123:abcd") is None


@pytest.mark.parametrize("bad", ["node 1", "n/1", "x" * 33, "nöde", "a;b"])
def test_a_node_name_must_be_a_plain_cookie_value(bad: str) -> None:
    with pytest.raises(SettingsError, match="WAITROOM_NODE_NAME"):
        load_settings({"WAITROOM_NODE_NAME": bad})
    assert load_settings({"WAITROOM_NODE_NAME": "api-1_b"}).node_name == "api-1_b"


@pytest.mark.anyio
async def test_without_redis_the_answer_goes_out_without_the_hint(
    pool: asyncpg.Pool[Any],
) -> None:
    """The owner is read from Redis; when Redis cannot answer, the hint is left out rather
    than failing the fan's status or reservation."""
    dead = redis_from_url(f"redis://127.0.0.1:{free_port()}/0")
    host = InventoryHost(pool, dead, Keys("affinity-dead"), node_name="node1")
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    headers: dict[str, str] = {}
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await host.owner_node("evt-nobody")
        await add_owner_cookie(Request(scope), host, "evt-nobody", headers, secure=False)
    finally:
        await dead.aclose()
    assert headers == {}
