"""What HAProxy itself answers, with the repository's ``deploy/haproxy.cfg``: waitroom's error
body (and ``Retry-After`` where trying again is the fix), never an HTML page.

No node behind it is up (503), a node accepts and never answers (504). The config is rendered as ``stress.nodes`` renders it for the nodes' tests, with a
short ``timeout server`` so that the 504 comes within the test's time.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec
import pytest

from stress.nodes import HAPROXY_CONFIG, haproxy_binary, render_haproxy
from tests.harness import free_port
from tests.test_proxy import wait_port
from waitroom.core.errors import ErrorBody


@contextmanager
def balancer(tmp_path: Path, servers: list[tuple[str, str]]) -> Iterator[int]:
    """HAProxy with deploy/haproxy.cfg in front of ``servers``, for the block; its port."""
    port = free_port()
    config = render_haproxy(HAPROXY_CONFIG.read_text(), bind=f"127.0.0.1:{port}", servers=servers)
    config = re.sub(r"timeout server \d+s", "timeout server 1s", config)
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    log = tmp_path / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(path)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_port(port, proc, log)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def silent_node() -> Iterator[str]:
    """A node that accepts connections and never answers (a stalled process)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


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
    tmp_path: Path, silent_node: str
) -> None:
    with balancer(tmp_path, [("node1", silent_node)]) as port:
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/events/e1/reservations", json={}, timeout=20
        )
    assert response.status_code == 504
    assert response.headers["retry-after"] == "2"
    assert error_of(response).error.code == "gateway_timeout"
