"""HAProxy's agent check: a node that is a sale's checkout asks for less of the line.

Every reservation of an event goes to the one node hosting the event's inventory actor (the
owner-affinity cookie, ADR 0017), and each waits there for turns of that node's event loop
(the pass check, the actor's answer). When the same node also takes its share of the line
(joins, WebSockets and their position hand-overs, payment starts, long polls), the
reservations wait behind all of it: in the 3-node flash sale the owner answered
reservations in p50 ~300 ms while the crowd arrived and in 5 ms once it had (BENCHMARKS.md,
session 20; ADR 0022).

So each ``serve`` process with ``WAITROOM_AGENT_PORT`` answers HAProxy's agent check
(``agent-check agent-port ...`` on the server lines of the line's backends in
deploy/haproxy.cfg): HAProxy connects every ``agent-inter`` and reads one line, here a weight
in percent of the server's configured one. It is 100% normally, and
``WAITROOM_OWNER_LINE_WEIGHT`` (10% by default) while the process hosts an actor that was
asked for a reservation in the last :data:`SELLING_WITHIN_S` seconds. New line traffic then
goes mostly to the other nodes; the checkout backend has no agent check, so the reservations
still reach the owner. Never 0%: a lone node, or every node an owner, keeps taking traffic
(equal weights share it as before; a 0 on every server would refuse it all).

With ``serve --workers N`` each worker listens on the port (``SO_REUSEPORT``) and answers for
itself, so the node's weight follows the worker the kernel hands each check to. An agent that
cannot be reached changes nothing: HAProxy keeps the last weight, and the health check alone
decides whether a node is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from prometheus_client import Gauge

#: A process is a sale's checkout for this long after its last reservation.
SELLING_WITHIN_S = 5.0
#: The weight of a node that is nobody's checkout, in percent.
FULL_WEIGHT = 100

LINE_WEIGHT = Gauge(
    "waitroom_balancer_line_weight_percent",
    "The weight this process last asked the load balancer for in the line's backends"
    " (percent; lower while it is a sale's checkout).",
    multiprocess_mode="livemin",
)


def line_weight(selling: bool, owner_weight: int) -> int:
    """The weight, in percent, to answer the agent check with."""
    return max(1, min(owner_weight, FULL_WEIGHT)) if selling else FULL_WEIGHT


def agent_reply(weight: int) -> bytes:
    """One answer of the agent protocol: the weight in percent, on a line of its own."""
    return b"%d%%\n" % weight


class _Answer(asyncio.Protocol):
    """Writes the current weight to each new connection and closes it: HAProxy reads one line
    and sends nothing (no ``agent-send``), so nothing is read."""

    def __init__(self, weight: Callable[[], int]) -> None:
        self._weight = weight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport instances, hence no check).
        stream = cast(asyncio.WriteTransport, transport)
        weight = self._weight()
        LINE_WEIGHT.set(weight)
        stream.write(agent_reply(weight))
        stream.close()


class BalancerAgent:
    """The agent-check listener of one process (see the module)."""

    def __init__(self, host: str, port: int, weight: Callable[[], int]) -> None:
        self._host = host
        self._port = port
        self._weight = weight
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen on the agent port (shared with the node's other workers)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Answer(self._weight), self._host, self._port, reuse_port=True
        )

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
