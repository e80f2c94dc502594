"""What HAProxy itself answers, with the repository's ``deploy/haproxy.cfg``: waitroom's error
body (and ``Retry-After`` where trying again is the fix), never an HTML page.

No node behind it is up (503), a node accepts and never answers (504). The config is
rendered as ``stress.nodes`` renders it for the nodes' tests, with a short ``timeout server``
so that the 504 comes within the test's time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec

from stress.nodes import HAPROXY_CONFIG, render_haproxy
from tests.harness import free_port
from tests.test_proxy import haproxy_running
from waitroom.core.errors import ErrorBody


@contextmanager
def balancer(tmp_path: Path, servers: list[tuple[str, str]]) -> Iterator[int]:
    """HAProxy with deploy/haproxy.cfg in front of ``servers``, for the block; its port."""
    port = free_port()
    config = render_haproxy(HAPROXY_CONFIG.read_text(), bind=f"127.0.0.1:{port}", servers=servers)
    with haproxy_running(
        tmp_path, re.sub(r"timeout server \d+s", "timeout server 1s", config), port
    ):
        yield port


def error_of(response: httpx.Response) -> ErrorBody:
    assert response.headers["content-type"] == "application/json"
    return msgspec.json.decode(response.content, type=ErrorBody)


def test_with_no_node_up_fans_get_the_error_body_and_a_retry_after(tmp_path: Path) -> None:
    nobody = [(f"node{i}", f"127.0.0.1:{free_port()}") for i in (1, 2)]
    with balancer(tmp_path, nobody) as port:
        response = httpx.get(f"http://127.0.0.1:{port}/v1/events/e1/queue/me", timeout=20)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    body = error_of(response)
    assert body.error.code == "no_server_available"
    assert body.error.details == {"retry_after_s": 2}
    assert "try again" in body.error.message


def test_a_node_that_never_answers_gives_a_504_in_the_error_body(
    tmp_path: Path, silent_port: int
) -> None:
    with balancer(tmp_path, [("node1", f"127.0.0.1:{silent_port}")]) as port:
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/events/e1/reservations", json={}, timeout=20
        )
    assert response.status_code == 504
    assert response.headers["retry-after"] == "2"
    assert error_of(response).error.code == "gateway_timeout"
