"""Several ``waitroom serve`` nodes behind a real HAProxy, as real processes.

:func:`running_nodes` starts, for the block:

- a fresh, migrated PostgreSQL database next to the configured one and a fresh Redis key
  prefix on the Redis URL given (single or a cluster's ``redis+cluster://``), both removed
  afterwards (:mod:`stress.common`);
- the mock payment provider, N ``waitroom serve --workers 1`` nodes on free ports (two
  each: HTTP, and the queue WebSockets' ``WAITROOM_WS_PORT``) and one
  ``waitroom workers``, all with the same settings and secrets: one run directory (so the
  development pass-signing key and the visitor and challenge secrets generated there are
  the same for every node), one operators' token, and ``WAITROOM_TRUSTED_PROXIES`` naming
  127.0.0.1, HAProxy's address as the nodes see it;
- HAProxy (Debian's package, installed with apt-get when it is missing and we are root)
  with a copy of ``deploy/haproxy.cfg`` rendered for these ports (:func:`render_haproxy`).

:class:`Nodes` gives the load balancer's URL, each node's URL and process, and kills,
stops (SIGTERM) or restarts a node by its pid. Every process is ours and is signalled by its
pid only; each logs to a file in the run directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from stress.common import free_port, fresh_database, fresh_prefix
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import Settings, settings_env

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"
#: The backend of deploy/haproxy.cfg that takes the queue WebSockets (the nodes' WS ports).
WS_BACKEND = "waitroom_ws"
#: HAProxy's ``maxconn`` in the rendered copy: two files per connection, well under the
#: open-files limit a process of ours may have.
TEST_MAXCONN = 4000
#: The response header naming the node that answered (set by deploy/haproxy.cfg).
NODE_HEADER = "X-Waitroom-Node"


def haproxy_binary() -> str:
    """HAProxy's path, installing Debian's package first when it is missing and we may
    (as tests/test_proxy.py does)."""
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
    )
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "haproxy"], check=True, capture_output=True, env=env
        )
        return "/usr/sbin/haproxy"
    raise RuntimeError("HAProxy is needed: install it with 'sudo apt-get install -y haproxy'")


def render_haproxy(
    template: str,
    *,
    bind: str,
    servers: Sequence[tuple[str, str]],
    maxconn: int = TEST_MAXCONN,
    ws_servers: Mapping[str, str] | None = None,
    agent_ports: Mapping[str, int] | None = None,
) -> str:
    """``template`` (deploy/haproxy.cfg) listening on ``bind`` with ``servers`` (name,
    host:port) in every backend, in place of the servers written there; in the WebSockets'
    backend (:data:`WS_BACKEND`) a server's address is its entry of ``ws_servers`` (its
    WebSocket port, ``serve --ws-port``) when it has one. A server's ``agent-port`` is its
    entry of ``agent_ports`` (``serve --agent-port``); a server without one has no agent
    check.

    Each backend's first ``server`` line is the model of its new ones (its options, and a
    ``track`` naming the new server of the tracked backend); its other ``server`` lines go.
    """
    ws_servers = ws_servers or {}
    agent_ports = agent_ports or {}
    out: list[str] = []
    section = ""
    rendered: set[str] = set()
    for line in template.splitlines():
        words = line.split()
        if words and not line[0].isspace():
            section = " ".join(words[:2])
        if words and words[0] == "maxconn" and section == "global":
            out.append(re.sub(r"maxconn\s+\d+", f"maxconn {maxconn}", line))
        elif words and words[0] == "bind" and section.startswith("frontend"):
            out.append(f"{line[: len(line) - len(line.lstrip())]}bind {bind}")
        elif words and words[0] == "server" and section.startswith("backend"):
            if section in rendered:
                continue
            rendered.add(section)
            indent = line[: len(line) - len(line.lstrip())]
            model_name, options = words[1], words[3:]
            for name, address in servers:
                opts = [
                    re.sub(rf"/{re.escape(model_name)}$", f"/{name}", o)
                    if i > 0 and options[i - 1] == "track"
                    # The owner-affinity cookie's value is the node's name (WAITROOM_NODE_NAME).
                    else name
                    if i > 0 and options[i - 1] == "cookie"
                    else o
                    for i, o in enumerate(options)
                ]
                if "agent-port" in opts:
                    at = opts.index("agent-port")
                    if name in agent_ports:
                        opts[at + 1] = str(agent_ports[name])
                    else:
                        opts = _without_agent(opts)
                if section == f"backend {WS_BACKEND}":
                    address = ws_servers.get(name, address)
                out.append(f"{indent}server {name} {address} {' '.join(opts)}".rstrip())
        else:
            out.append(line)
    if not rendered:
        raise ValueError("the HAProxy template has no backend with server lines")
    return "\n".join(out) + "\n"


def _without_agent(options: list[str]) -> list[str]:
    """A server line's options without its agent check (``agent-*`` and their values)."""
    kept: list[str] = []
    skip = False
    for option in options:
        if skip:
            skip = False
        elif option == "agent-check":
            pass
        elif option.startswith("agent-"):
            skip = True  # every other agent-* option takes a value
        else:
            kept.append(option)
    return kept


@dataclass
class Node:
    """One ``waitroom serve`` node: its name in HAProxy, port and current process."""

    name: str
    port: int
    proc: asyncio.subprocess.Process
    starts: int = 1
    #: The node's second listening port, for the queue WebSockets (``serve --ws-port``).
    ws_port: int | None = None
    #: Where the node answers HAProxy's agent check (``serve --agent-port``).
    agent_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


@dataclass
class Nodes:
    """The running nodes behind HAProxy, and what they share."""

    settings: Settings
    run_dir: Path
    url: str
    provider_url: str
    nodes: list[Node]
    haproxy: asyncio.subprocess.Process
    workers: asyncio.subprocess.Process
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    #: Every load balancer's URL (``url`` is the first): several HAProxy processes in front
    #: of the same nodes, as DNS round-robin over several balancers would spread a crowd,
    #: for more connections than one process may have files.
    urls: list[str] = field(default_factory=list)

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token}"}

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")

    def node(self, name_or_pid: str | int) -> Node:
        """The node named so in HAProxy, or whose process has this pid."""
        for node in self.nodes:
            if name_or_pid in (node.name, node.pid):
                return node
        raise KeyError(name_or_pid)

    async def kill(self, node: Node) -> None:
        """SIGKILL the node's process (by its pid) and reap it."""
        if node.alive:
            os.kill(node.pid, signal.SIGKILL)
        await node.proc.wait()

    async def terminate(self, node: Node, timeout: float = 30.0) -> float:
        """SIGTERM the node's process (by its pid), wait for it to exit; seconds it took."""
        started = time.monotonic()
        if node.alive:
            os.kill(node.pid, signal.SIGTERM)
        await asyncio.wait_for(node.proc.wait(), timeout)
        return time.monotonic() - started

    async def restart(self, node: Node) -> Node:
        """Start the (stopped) node again on its port and wait until it is ready; HAProxy
        takes it back after its ``rise`` checks (:meth:`wait_in_rotation`)."""
        if node.alive:
            raise RuntimeError(f"{node.name} (pid {node.pid}) is still running")
        node.starts += 1
        node.proc = await _start_serve(
            self.settings,
            self.run_dir,
            self.processes,
            node.name,
            node.port,
            node.starts,
            ws_port=node.ws_port,
            agent_port=node.agent_port,
        )
        await _wait_ready(f"{node.url}/readyz", node.proc, self.run_dir)
        return node

    async def wait_in_rotation(
        self, names: Sequence[str] | None = None, timeout: float = 20.0
    ) -> None:
        """Until requests through every HAProxy have been answered by every node in
        ``names`` (default: every live node)."""
        wanted = set(names or [n.name for n in self.nodes if n.alive])
        deadline = time.monotonic() + timeout
        for url in self.urls or [self.url]:
            seen: set[str] = set()
            async with httpx.AsyncClient(base_url=url, timeout=2) as http:
                while not wanted <= seen:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"HAProxy at {url} did not route to {sorted(wanted - seen)}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        response = await http.get("/healthz")
                        seen.add(response.headers.get(NODE_HEADER, ""))
                        continue
                    await asyncio.sleep(0.1)

    async def owner(self, event_id: str) -> Node | None:
        """The node holding the event's inventory lease in Redis (its value names the pid
        of the owning process: ``host:pid:id``), or None when no node of ours does."""
        value = await self.owner_lease(event_id)
        parts = value.split(":") if value else []
        if len(parts) >= 3 and parts[-2].isdigit():
            for node in self.nodes:
                if node.alive and node.pid == int(parts[-2]):
                    return node
        return None

    async def owner_lease(self, event_id: str) -> str | None:
        """The value of the event's inventory owner lease in Redis (None when none holds it)."""
        client = redis_from_url(self.settings.redis_url)
        try:
            raw = await client.get(Keys(self.settings.redis_prefix).event(event_id).owner)
        finally:
            await client.aclose()
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)


async def _wait_ready(
    url: str, proc: asyncio.subprocess.Process, run_dir: Path, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{url}: the process exited with {proc.returncode} ({run_dir})")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} was not ready within {timeout} s (logs in {run_dir})")


async def _spawn(
    env: dict[str, str], run_dir: Path, log_name: str, *argv: str
) -> asyncio.subprocess.Process:
    # Each in a session of its own, as a service manager starts each service: Linux shares
    # the CPU between sessions first (autogroup, on by default) and only then between the
    # processes of one. Left in the benchmark's session, the three nodes, HAProxy, the
    # workers and the fan generators all shared ONE session's share against each Redis node's
    # and PostgreSQL's, and the nodes' turns went to their own load generators.
    with (run_dir / f"{log_name}.log").open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


async def _start_serve(
    settings: Settings,
    run_dir: Path,
    processes: list[asyncio.subprocess.Process],
    name: str,
    port: int,
    start: int,
    *,
    ws_port: int | None = None,
    agent_port: int | None = None,
) -> asyncio.subprocess.Process:
    # Named as in HAProxy, so that a fan's checkout is routed to the actor's node.
    env = settings_env(
        msgspec.structs.replace(
            settings, port=port, node_name=name, ws_port=ws_port, agent_port=agent_port
        )
    )
    proc = await _spawn(
        env, run_dir, f"{name}-{start}", sys.executable, "-m", "waitroom", "serve",
        "--workers", "1",
    )  # fmt: skip
    processes.append(proc)
    return proc


async def _stop(
    processes: Sequence[asyncio.subprocess.Process],
    grace_s: float,
    sig: signal.Signals = signal.SIGTERM,
) -> None:
    """Send ``sig`` to each live process of ours (by pid), then SIGKILL what outlives
    ``grace_s``."""
    live = [p for p in processes if p.returncode is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
    if not live:
        return
    _, late = await asyncio.wait([asyncio.create_task(p.wait()) for p in live], timeout=grace_s)
    if late:
        for proc in live:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait(late)


def _prepare(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)


def _write_config(
    template: Path, config: Path, bind: str, members: Sequence[Node], maxconn: int
) -> Path:
    config.write_text(
        render_haproxy(
            template.read_text(),
            bind=bind,
            servers=[(n.name, f"127.0.0.1:{n.port}") for n in members],
            maxconn=maxconn,
            ws_servers={n.name: f"127.0.0.1:{n.ws_port}" for n in members if n.ws_port},
            agent_ports={n.name: n.agent_port for n in members if n.agent_port},
        )
    )
    return config


@asynccontextmanager
async def running_nodes(
    settings: Settings,
    run_dir: Path,
    *,
    count: int = 3,
    redis_url: str | None = None,
    template: Path = HAPROXY_CONFIG,
    balancers: int = 1,
    maxconn: int = TEST_MAXCONN,
) -> AsyncIterator[Nodes]:
    """``count`` nodes, the workers and the mock provider behind HAProxy, on ``redis_url``
    (default: the settings') and a fresh database; see the module's docstring.

    ``balancers`` HAProxy processes, each with ``maxconn`` connections, front the same
    nodes (:attr:`Nodes.urls`).

    ``settings`` gives the database server and every other setting (admission loops,
    challenges, timeouts); the database, the key prefix, the run directory, the ports, the
    operators' token and the trusted proxies are set here.
    """
    _prepare(run_dir)
    base = msgspec.structs.replace(
        settings,
        redis_url=redis_url or settings.redis_url,
        run_dir=str(run_dir),
        admin_token=secrets.token_hex(32),
        admin_tokens=(),
        # HAProxy connects to the nodes from 127.0.0.1 and adds X-Forwarded-For.
        trusted_proxies=("127.0.0.1/32",),
        # The nodes stand for machines of their own: what one forwards to another goes
        # through Redis, as between machines, not over the local socket of one machine.
        local_forwarding=False,
    )
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        provider_port = free_port()
        lb_ports = [free_port() for _ in range(balancers)]
        provider_url = f"http://127.0.0.1:{provider_port}"
        shared = msgspec.structs.replace(
            base, database_url=dsn, redis_prefix=prefix, payment_url=provider_url
        )
        processes: list[asyncio.subprocess.Process] = []
        haproxy: list[asyncio.subprocess.Process] = []
        try:
            env = settings_env(shared)
            provider = await _spawn(
                env, run_dir, "provider", sys.executable, "-m", "workers.mock_provider",
                "--port", str(provider_port),
            )  # fmt: skip
            processes.append(provider)
            await _wait_ready(f"{provider_url}/v1/stats", provider, run_dir)
            members: list[Node] = []
            for i in range(1, count + 1):
                port, ws_port, agent_port = free_port(), free_port(), free_port()
                proc = await _start_serve(
                    shared,
                    run_dir,
                    processes,
                    f"node{i}",
                    port,
                    1,
                    ws_port=ws_port,
                    agent_port=agent_port,
                )
                members.append(Node(f"node{i}", port, proc, ws_port=ws_port, agent_port=agent_port))
            # Started together, they generate the run directory's secrets once between
            # them (waitroom.core.keyfiles links a finished file into place).
            await asyncio.gather(
                *(_wait_ready(f"{n.url}/readyz", n.proc, run_dir) for n in members)
            )
            workers = await _spawn(
                env, run_dir, "workers", sys.executable, "-m", "waitroom", "workers"
            )
            processes.append(workers)
            for i, lb_port in enumerate(lb_ports):
                config = _write_config(
                    template,
                    run_dir / f"haproxy-{i}.cfg",
                    f"127.0.0.1:{lb_port}",
                    members,
                    maxconn,
                )
                haproxy.append(
                    await _spawn(
                        env, run_dir, f"haproxy-{i}", haproxy_binary(), "-db", "-f", str(config)
                    )
                )
            urls = [f"http://127.0.0.1:{port}" for port in lb_ports]
            nodes = Nodes(
                settings=shared,
                run_dir=run_dir,
                url=urls[0],
                urls=urls,
                provider_url=provider_url,
                nodes=members,
                haproxy=haproxy[0],
                workers=workers,
                processes=processes,
            )
            await nodes.wait_in_rotation()
            yield nodes
        finally:
            # The load balancer first (no new requests), then the nodes, the workers and
            # the provider; the database is dropped only once nothing uses it.
            # SIGUSR1: HAProxy's soft stop, which lets the last requests end (and be logged).
            await _stop(haproxy, 5, signal.SIGUSR1)
            await _stop(list(reversed(processes)), 20)
