"""``waitroom serve --workers N``: each worker listens on its own socket (SO_REUSEPORT), so
new connections split evenly between the workers, not by which one accepted first."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import msgspec
import pytest

from stress.checkout import _connections_of, _socket_inodes
from tests.harness import free_port
from tests.metrics_support import process, wait_http, waitroom_argv
from waitroom.core.listeners import reuseport_socket
from waitroom.core.settings import Settings, settings_env


def _children(pid: int) -> list[int]:
    """The worker processes of the supervisor ``pid`` (its children that hold sockets)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def test_each_worker_listens_on_its_own_socket_and_takes_a_fair_share_of_connections(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    served = msgspec.structs.replace(settings, port=port, admission_loop=False)
    env = {**settings_env(served), "TMPDIR": str(tmp_path)}
    log = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with process(waitroom_argv("serve", "--workers", "2"), log, env=env) as proc:
        wait_http(f"{base}/readyz", proc, log)
        workers = [p for p in _children(proc.pid) if _listening(p, port)]
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:  # the second one starting
            time.sleep(0.2)
            workers = [p for p in _children(proc.pid) if _listening(p, port)]
        assert len(workers) == 2, (workers, log.read_text()[-2000:])
        # Two listening sockets, one in each worker (not one socket both accept from).
        listeners = [_listeners(pid, port) for pid in workers]
        assert all(len(held) == 1 for held in listeners), listeners
        assert listeners[0] != listeners[1], listeners
        # 80 keep-alive connections, opened back to back while both workers are idle: with
        # one shared socket, whichever worker's loop woke first took a burst of them.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]
        try:
            time.sleep(0.5)  # every connection accepted
            inodes = _socket_inodes(port)
            shares = sorted(_connections_of(pid, inodes) for pid in workers)
            assert sum(shares) == 80, shares
            # By the kernel's hash of the addresses: binomial(80, 1/2), 40 +- 4.5; 20 is more
            # than four deviations away.
            assert shares[0] >= 20, shares
        finally:
            for client in clients:
                client.close()
    assert proc.returncode == 0, log.read_text()[-2000:]


def _listeners(pid: int, port: int) -> set[str]:
    """The inodes of the sockets listening on ``port`` that ``pid`` holds."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                listening.add(fields[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = str(fd.readlink())
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in listening:
            held.add(link[8:-1])
    return held


def _listening(pid: int, port: int) -> bool:
    return bool(_listeners(pid, port))


def test_a_reuseport_socket_shares_its_port_only_with_its_group() -> None:
    first = reuseport_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        second = reuseport_socket("127.0.0.1", port)  # a worker's own listener
        second.close()
        plain = socket.socket()
        try:
            with pytest.raises(OSError):
                plain.bind(("127.0.0.1", port))  # anyone else: the port is taken
        finally:
            plain.close()
    finally:
        first.close()
