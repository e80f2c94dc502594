"""The balancer agent (ADR 0022): what a node answers HAProxy's agent check, and what HAProxy
with the repository's ``deploy/haproxy.cfg`` does with it.

The nodes behind HAProxy here are stand-ins that answer every request (the agent is the
component under test, and it is the real one); the selling state comes from a real
:class:`~inventory.hosting.InventoryHost` in ``tests/inventory/test_hosting.py``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop

from stress.nodes import HAPROXY_CONFIG, render_haproxy
from tests.harness import free_port
from tests.test_proxy import haproxy_running
from waitroom.balancer_agent import BalancerAgent, agent_reply, line_weight


def test_a_selling_node_asks_for_its_owner_weight_and_never_for_nothing() -> None:
    assert line_weight(False, 10) == 100
    assert line_weight(True, 10) == 10
    assert line_weight(True, 100) == 100
    # 0 on every server would refuse every fan: a lone node that sells keeps its traffic.
    assert line_weight(True, 0) == 1
    assert agent_reply(10) == b"10%\n"


@pytest.mark.anyio
async def test_the_agent_answers_each_connection_with_the_weight_of_the_moment() -> None:
    weight = [100]
    port = free_port()
    agent = BalancerAgent("127.0.0.1", port, lambda: weight[0])
    await agent.start()
    try:
        for expected in (100, 10, 100):
            weight[0] = expected
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 5) == b"%d%%\n" % expected
            writer.close()
    finally:
        await agent.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


class _Node:
    """A stand-in node: answers every request 200, /readyz included."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                self.do_GET()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def agents(weights: dict[str, list[int]]) -> Iterator[dict[str, int]]:
    """A real BalancerAgent per node, answering ``weights[name][0]``, on a loop of their own
    (uvloop's, as ``waitroom serve`` runs)."""
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ports = {name: free_port() for name in weights}
    started = [
        BalancerAgent("127.0.0.1", ports[name], functools.partial(_first, w))
        for name, w in weights.items()
    ]
    for agent in started:
        asyncio.run_coroutine_threadsafe(agent.start(), loop).result(10)
    try:
        yield ports
    finally:
        for agent in started:
            asyncio.run_coroutine_threadsafe(agent.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _first(values: list[int]) -> int:
    return values[0]


def _answered_by(http: httpx.Client, method: str, path: str, times: int) -> Counter[str]:
    return Counter(http.request(method, path).headers["x-waitroom-node"] for _ in range(times))


def _wait_until(
    http: httpx.Client, path: str, done: Callable[[int], bool], timeout: float = 15.0
) -> None:
    """Until ``done`` holds of node1's part of 20 POSTs to ``path``."""
    deadline = time.monotonic() + timeout
    while not done(_answered_by(http, "POST", path, 20)["node1"]):
        assert time.monotonic() < deadline, "HAProxy never took the agent's weight"
        time.sleep(0.3)


def test_haproxy_sends_the_line_mostly_elsewhere_while_a_node_sells_but_not_its_checkout(
    tmp_path: Path,
) -> None:
    nodes = {"node1": _Node(), "node2": _Node()}
    weights = {"node1": [10], "node2": [100]}
    port = free_port()
    try:
        with agents(weights) as agent_ports:
            config = render_haproxy(
                HAPROXY_CONFIG.read_text(),
                bind=f"127.0.0.1:{port}",
                servers=[(name, f"127.0.0.1:{n.port}") for name, n in nodes.items()],
                agent_ports=agent_ports,
            )
            with (
                haproxy_running(tmp_path, config, port),
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
            ):
                # Both up, and every backend's agent check heard (one a second each).
                for path in ("/v1/events/e1/queue", "/v1/reservations/r1/confirm"):
                    _wait_until(http, path, lambda node1: node1 <= 4)
                # The line (joins, payments started) goes to node1 at a tenth of node2's rate.
                joins = _answered_by(http, "POST", "/v1/events/e1/queue", 110)
                assert joins["node1"] <= 20 and joins["node2"] >= 90, joins
                confirms = _answered_by(http, "POST", "/v1/reservations/r1/confirm", 110)
                assert confirms["node1"] <= 20, confirms
                # Reservations are the selling node's: their backend has no agent check.
                reserves = _answered_by(http, "POST", "/v1/events/e1/reservations", 100)
                assert reserves["node1"] >= 40 and reserves["node2"] >= 40, reserves
                # The sale over, the node asks for its whole share again.
                weights["node1"][0] = 100
                for path in ("/v1/events/e1/queue", "/v1/reservations/r1/confirm"):
                    _wait_until(http, path, lambda node1: node1 >= 8)
    finally:
        for node in nodes.values():
            node.close()
