"""``waitroom serve --ws-port``: the queue WebSockets on a listening socket of their own.

A node behind the load balancer listens twice (deploy/haproxy.cfg sends the queue WebSockets
to the second port) so that a crowd opening WebSockets never holds a join or a reservation
in the same accept queue. Both sockets serve the whole app; the real console script is run,
as an operator would, on the test run's database and Redis prefix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import httpx
import msgspec
import pytest
from websockets.sync.client import connect

from stress.nodes import HAPROXY_CONFIG, WS_BACKEND, render_haproxy
from tests.admission.support import create_event
from tests.harness import ADMIN_TOKEN, free_port, run_cli
from tests.metrics_support import process, wait_http, waitroom_argv
from waitroom.core.httpserver import ACCEPTORS
from waitroom.core.settings import Settings, load_settings, settings_env

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _listening_descriptors(pid: int, port: int) -> int:
    """How many of process ``pid``'s descriptors are its listening socket on ``port``
    (duplicates share the socket's inode)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd) in inodes)


def test_serve_answers_http_and_the_queue_websocket_on_its_websocket_port(
    settings: Settings, tmp_path: Path
) -> None:
    port, ws_port = free_port(), free_port()
    served = msgspec.structs.replace(settings, port=port, ws_port=ws_port, admission_loop=False)
    log = tmp_path / "server.log"
    with process(waitroom_argv("serve"), log, env=settings_env(served)) as proc:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        # Both sockets are polled through several descriptors, so a busy node takes in a
        # crowd's WebSockets as fast as its requests (see waitroom.core.httpserver.listeners).
        assert _listening_descriptors(proc.pid, port) == ACCEPTORS
        assert _listening_descriptors(proc.pid, ws_port) == ACCEPTORS
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            http.headers.update(ADMIN)
            event_id = create_event(http, max_active=1)
        # The second socket is the same app: HTTP answers there too...
        with httpx.Client(base_url=f"http://127.0.0.1:{ws_port}", timeout=10) as http:
            assert http.get("/healthz").status_code == 200
            joined = http.post(f"/v1/events/{event_id}/queue")
            assert joined.status_code == 201, joined.text
            token = joined.json()["visitor_token"]
        # ...and so does the fan's WebSocket, with the fan's place in line.
        url = f"ws://127.0.0.1:{ws_port}/v1/events/{event_id}/queue/ws"
        with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            message = json.loads(ws.recv(timeout=5))
            assert message["type"] == "position" and message["position"] == 1, message
            # Draining closes both sockets' connections (the fan is told to reconnect).
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(Exception) as closed:
                while True:
                    ws.recv(timeout=15)
            assert "1012" in str(closed.value), closed.value
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert proc.wait(20) in (0, -signal.SIGTERM), log.read_text()
        assert "Application shutdown complete" in log.read_text()
        # A crowd's sockets leave no line each: websockets' "connection open" (INFO, through
        # uvicorn's logger) and uvicorn's handshake line (its URL) are dropped.
        assert "connection open" not in log.read_text()
        assert "WebSocket /v1" not in log.read_text()
    assert _refused(port) and _refused(ws_port)


def test_serve_refuses_one_port_for_both_in_one_line(settings: Settings) -> None:
    port = free_port()
    done = run_cli(settings, "serve", "--port", str(port), "--ws-port", str(port))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"waitroom: the WebSocket port must differ from the HTTP port ({port})"
    ]


def test_serve_answers_the_balancers_agent_check_on_its_agent_port(
    settings: Settings, tmp_path: Path
) -> None:
    # ADR 0022: HAProxy reads one line, the weight this node asks for in the line's
    # backends; a node hosting no sale's actor asks for all of its share.
    port, agent_port = free_port(), free_port()
    served = msgspec.structs.replace(settings, port=port, admission_loop=False)
    log = tmp_path / "server.log"
    argv = [*waitroom_argv("serve"), "--agent-port", str(agent_port)]
    with process(argv, log, env=settings_env(served)) as proc:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
        for _ in range(2):  # one answer per connection, then closed
            with socket.create_connection(("127.0.0.1", agent_port), timeout=5) as agent:
                assert agent.makefile("rb").read() == b"100%\n"
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert _refused(agent_port)


def test_serve_refuses_an_agent_port_that_is_one_of_its_own(settings: Settings) -> None:
    port = free_port()
    done = run_cli(settings, "serve", "--port", str(port), "--agent-port", str(port))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"waitroom: the agent port must differ from the server's ports ({port})"
    ]


def test_the_websocket_port_is_a_setting_like_the_others() -> None:
    assert load_settings({"WAITROOM_WS_PORT": "9001"}).ws_port == 9001
    assert load_settings({}).ws_port is None
    with pytest.raises(Exception, match="WAITROOM_WS_PORT"):
        load_settings({"WAITROOM_WS_PORT": "0"})


def test_the_balancer_sends_the_websockets_to_each_nodes_websocket_port() -> None:
    config = render_haproxy(
        HAPROXY_CONFIG.read_text(),
        bind="127.0.0.1:8000",
        servers=[("node1", "127.0.0.1:8101"), ("node2", "127.0.0.1:8102")],
        ws_servers={"node1": "127.0.0.1:9101", "node2": "127.0.0.1:9102"},
    )
    sections: dict[str, list[str]] = {}
    current = ""
    for line in config.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            current = line.strip()
        elif line.strip().startswith("server "):
            sections.setdefault(current, []).append(" ".join(line.split()[1:3]))
    assert sections["backend waitroom"] == ["node1 127.0.0.1:8101", "node2 127.0.0.1:8102"]
    assert sections[f"backend {WS_BACKEND}"] == ["node1 127.0.0.1:9101", "node2 127.0.0.1:9102"]
    # The payments' long polls, reservations and payments started (each a backend of its
    # own, ADR 0021) go to the nodes' HTTP port, as every other request.
    for backend in ("waitroom_wait", "waitroom_checkout", "waitroom_pay"):
        assert sections[f"backend {backend}"] == sections["backend waitroom"]
    # Without WebSocket ports, every backend names the one port (a node without --ws-port).
    plain = render_haproxy(
        HAPROXY_CONFIG.read_text(), bind="127.0.0.1:8000", servers=[("node1", "127.0.0.1:8101")]
    )
    assert plain.count("server node1 127.0.0.1:8101 ") == 5
