"""Behind a real reverse proxy (HAProxy from Debian, ``option forwardfor``): forwarded headers
count only when the proxy is trusted, and a client's own X-Forwarded-For never does.

Loopback has a whole /8, so the three parties get addresses of their own: fans connect from
127.0.0.2 and 127.0.0.4, HAProxy forwards from 127.0.0.3, the server listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from stress.nodes import haproxy_binary
from tests.harness import ADMIN_TOKEN, ServerThread, free_port, running
from waitroom.core.http import JSONResponse
from waitroom.core.openapi import Operation
from waitroom.core.settings import Settings
from waitroom.queue_api import client_subject

FAN_A, FAN_B, PROXY = "127.0.0.2", "127.0.0.4", "127.0.0.3"
SPOOFED = "203.0.113.9"


async def whoami(request: Request) -> Response:
    """What the per-address limits count this request as (test-only route)."""
    return JSONResponse({"subject": client_subject(request)})


WHOAMI = Operation("GET", "/test/whoami", whoami, "Client subject", tags=("test",))

_CONFIG = """
global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option forwardfor
frontend fans
    bind 127.0.0.1:{port}
    default_backend app
backend app
    server app 127.0.0.1:{server_port} source {source}
"""


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until HAProxy (``proc``, logging to ``log``) listens on ``port``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}: {log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"haproxy did not listen on {port} within 10 s: {log.read_text()}")


@contextmanager
def haproxy_running(tmp_path: Path, config: str, port: int) -> Iterator[None]:
    """HAProxy with ``config`` (which listens on ``port``) for the block."""
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    log = tmp_path / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(path)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_port(port, proc, log)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def haproxy(tmp_path: Path, server: ServerThread) -> Iterator[str]:
    """HAProxy in front of ``server`` for the block; yields its URL."""
    port = free_port()
    config = _CONFIG.format(port=port, server_port=server.port, source=PROXY)
    with haproxy_running(tmp_path, config, port):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def fan(base_url: str, address: str) -> Iterator[httpx.Client]:
    """An HTTP client connecting from ``address``."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(base_url=base_url, transport=transport, timeout=10) as client:
        yield client


def _subject(client: httpx.Client) -> str:
    response = client.get("/test/whoami", headers={"X-Forwarded-For": SPOOFED})
    assert response.status_code == 200, response.text
    subject: str = response.json()["subject"]
    return subject


def _create_event(client: httpx.Client, event_id: str) -> None:
    body: dict[str, Any] = {
        "id": event_id,
        "name": "Behind the proxy",
        "ticket_types": [{"name": "ga", "quantity": 10, "price_minor": 100, "currency": "EUR"}],
    }
    response = client.post(
        "/v1/admin/events",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Forwarded-For": SPOOFED},
    )
    assert response.status_code == 201, response.text


async def _audited_address(settings: Settings, event_id: str) -> str:
    conn = await asyncpg.connect(settings.database_url)
    try:
        value = await conn.fetchval(
            "SELECT host(client_address) FROM audit_log WHERE event_id = $1", event_id
        )
    finally:
        await conn.close()
    return str(value)


def test_without_trusted_proxies_every_fan_behind_the_proxy_shares_its_address(
    settings: Settings, tmp_path: Path
) -> None:
    untrusting = msgspec.structs.replace(settings, trusted_proxies=())
    with (
        running(untrusting, extra_operations=[WHOAMI]) as server,
        haproxy(tmp_path, server) as url,
        fan(url, FAN_A) as a,
        fan(url, FAN_B) as b,
    ):
        assert _subject(a) == PROXY
        assert _subject(b) == PROXY
        _create_event(a, "proxy-untrusted")
    assert asyncio.run(_audited_address(settings, "proxy-untrusted")) == PROXY


def test_with_the_proxy_trusted_the_real_client_counts_and_its_spoofed_header_does_not(
    settings: Settings, tmp_path: Path
) -> None:
    trusting = msgspec.structs.replace(
        settings, trusted_proxies=(f"{PROXY}/32",), admin_auth_failures=2
    )
    with (
        running(trusting, extra_operations=[WHOAMI]) as server,
        haproxy(tmp_path, server) as url,
        fan(url, FAN_A) as a,
        fan(url, FAN_B) as b,
    ):
        assert _subject(a) == FAN_A
        assert _subject(b) == FAN_B
        _create_event(a, "proxy-trusted")
        # Failed admin logins are throttled per real client: A's failures do not lock B out.
        wrong = {"Authorization": "Bearer wrong", "X-Forwarded-For": FAN_B}
        assert [a.get("/v1/admin/events", headers=wrong).status_code for _ in range(3)] == [
            401,
            401,
            429,
        ]
        assert b.get("/v1/admin/events", headers=wrong).status_code == 401
    assert asyncio.run(_audited_address(settings, "proxy-trusted")) == FAN_A
