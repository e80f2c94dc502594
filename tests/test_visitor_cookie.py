"""The visitor cookie: ``wr_visitor`` in development, ``__Host-wr_visitor`` and Secure when
``WAITROOM_COOKIE_SECURE`` (the default in production), both names read (over real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import msgspec
import pytest

from tests.harness import ADMIN_TOKEN, ServerThread, running
from tests.queue_support import create_event, new_ip
from tests.test_errors import assert_error
from waitroom.core.settings import Settings
from waitroom.line.identity import clear_cookie_header, visitor_cookie_header

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def secure_server(settings: Settings) -> Iterator[ServerThread]:
    with running(msgspec.structs.replace(settings, cookie_secure=True)) as srv:
        yield srv


def _event(server: ServerThread) -> str:
    with httpx.Client(base_url=server.url, headers=ADMIN, timeout=10) as admin:
        return create_event(admin)


def _join(http: httpx.Client, event_id: str) -> httpx.Response:
    response = http.post(f"/v1/events/{event_id}/queue", headers={"X-Forwarded-For": new_ip()})
    assert response.status_code == 201, response.text
    return response


def _attributes(set_cookie: str) -> tuple[str, set[str]]:
    first, *rest = [part.strip() for part in set_cookie.split(";")]
    return first.split("=", 1)[0], {part.split("=", 1)[0].lower() for part in rest}


def test_secure_cookies_are_host_only_and_secure(secure_server: ServerThread) -> None:
    with httpx.Client(base_url=secure_server.url, timeout=10) as http:
        event_id = _event(secure_server)
        response = _join(http, event_id)
    name, attributes = _attributes(response.headers["set-cookie"])
    assert name == "__Host-wr_visitor"
    assert {"secure", "path", "httponly", "samesite", "max-age"} == attributes
    assert "Path=/;" in response.headers["set-cookie"]
    assert "domain" not in attributes


def test_development_cookies_keep_the_plain_name(server: ServerThread, admin: httpx.Client) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        response = _join(http, create_event(admin))
    name, attributes = _attributes(response.headers["set-cookie"])
    assert name == "wr_visitor"
    assert "secure" not in attributes


@pytest.mark.parametrize("cookie_name", ["__Host-wr_visitor", "wr_visitor"])
def test_either_name_identifies_the_fan(secure_server: ServerThread, cookie_name: str) -> None:
    with httpx.Client(base_url=secure_server.url, timeout=10) as http:
        event_id = _event(secure_server)
        token = _join(http, event_id).json()["visitor_token"]
        # Sent by hand: httpx, like a browser, keeps Secure cookies off plain http.
        me = http.get(
            f"/v1/events/{event_id}/queue/me", headers={"Cookie": f"{cookie_name}={token}"}
        )
    assert me.status_code == 200, me.text
    assert me.json()["position"] == 1


def test_a_bad_secure_cookie_is_cleared_under_its_own_name(secure_server: ServerThread) -> None:
    with httpx.Client(base_url=secure_server.url, timeout=10) as http:
        event_id = _event(secure_server)
        response = http.get(
            f"/v1/events/{event_id}/queue/me", headers={"Cookie": "__Host-wr_visitor=forged"}
        )
    assert_error(response, 401, "identity_invalid")
    cleared = response.headers["set-cookie"]
    assert cleared.startswith("__Host-wr_visitor=;") and "Max-Age=0" in cleared
    assert "Secure" in cleared


def test_cookie_headers() -> None:
    assert visitor_cookie_header("t", secure=False).startswith("wr_visitor=t;")
    assert visitor_cookie_header("t", secure=True).startswith("__Host-wr_visitor=t;")
    assert visitor_cookie_header("t", secure=True).endswith("; Secure")
    assert "Secure" not in clear_cookie_header("wr_visitor")
