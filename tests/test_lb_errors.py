"""What HAProxy itself answers, with the repository's ``deploy/haproxy.cfg``: waitroom's error
body (and ``Retry-After`` where trying again is the fix), never an HTML page.

No node behind it is up (503), a node accepts and never answers (504); a node is given at
most its bound of requests at once, the rest waiting in HAProxy, while payments' long polls
pass (a stand-in node that holds requests counts them). The config is
rendered as ``stress.nodes`` renders it for the nodes' tests, with a short ``timeout server``
so that the 504 comes within the test's time.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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


class _HeldNode:
    """A stand-in for a node behind HAProxy: answers /readyz, and holds every other request
    until released, counting how many it holds at once (by path)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.held = 0
        self.most_held = 0
        self.paths: list[str] = []
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path != "/readyz":
                    with node.lock:
                        node.paths.append(self.path)
                        node.held += 1
                        node.most_held = max(node.most_held, node.held)
                    node.release.wait(30)
                    with node.lock:
                        node.held -= 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_POST(self) -> None:
                self.do_GET()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


#: Each bulkhead's bound in deploy/haproxy.cfg, and the requests that fall under it.
_BULKHEADS = {
    "${WAITROOM_NODE_MAXCONN-32}": ("POST", "/v1/events/e1/queue"),
    "${WAITROOM_NODE_CHECKOUT_MAXCONN-32}": ("POST", "/v1/events/e1/reservations"),
    "${WAITROOM_NODE_PAY_MAXCONN-16}": ("POST", "/v1/reservations/r1/confirm"),
}


def test_a_node_gets_at_most_its_bound_of_each_kind_at_once_and_long_polls_pass(
    tmp_path: Path,
) -> None:
    """Per node, at most 2 (here) of the line's requests, 2 reservations and 2 payments
    started are in flight at once, each bound apart from the others (ADR 0021): a full
    bulkhead holds only its own kind, and a payment's long poll passes all of them."""
    node = _HeldNode()
    port = free_port()
    config = render_haproxy(
        HAPROXY_CONFIG.read_text(),
        bind=f"127.0.0.1:{port}",
        servers=[("node1", f"127.0.0.1:{node.port}")],
    )
    for bound in _BULKHEADS:
        assert f'"{bound}"' in config
        config = config.replace(bound, "2")
    try:
        with haproxy_running(tmp_path, config, port), ThreadPoolExecutor(16) as pool:
            base = f"http://127.0.0.1:{port}"
            writes = [
                pool.submit(httpx.request, method, f"{base}{path}", json={}, timeout=20)
                for method, path in _BULKHEADS.values()
                for _ in range(4)
            ]
            deadline = time.monotonic() + 10
            while len(node.paths) < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # more would have arrived by now, were they let through
            assert node.held == 6, node.paths
            for _, path in _BULKHEADS.values():
                assert node.paths.count(path) == 2, node.paths
            # A payment's long poll is not held behind any bound (the node idles in it).
            poll = pool.submit(httpx.get, f"{base}/v1/reservations/r1?wait=10", timeout=20)
            while len(node.paths) < 7 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert node.paths[-1] == "/v1/reservations/r1?wait=10", node.paths
            node.release.set()
            assert [f.result().status_code for f in [*writes, poll]] == [200] * 13
            assert node.most_held == 7  # two of each kind and the long poll, never more
            assert len(node.paths) == 13
    finally:
        node.close()
