"""Each worker of ``waitroom serve --workers N`` listens on a socket of its own (SO_REUSEPORT).

uvicorn's supervisor binds one socket and every worker accepts from it: whichever worker's
event loop gets to ``accept()`` first takes the connection (uvloop takes every pending one in
a go), so keep-alive clients split between workers by chance: 39 to 11, 9 to 41, 184 to 16
in the checkout benchmark's rounds. That split decides a sale's checkout rate: the worker that
hosts the event's inventory actor serves its own connections' HTTP besides the actor, and a
reservation it serves itself costs it about three times what one forwarded to it does, so
with most connections on it, it runs out of CPU while the other worker idles (issue 14).

With a listening socket per worker in one SO_REUSEPORT group, the kernel hands each new
connection to a worker by a hash of its addresses: an even split, whatever the workers are
busy with. The supervisor's own socket is bound with SO_REUSEPORT too (it holds the port,
and a port is shared only by sockets that all ask for it) but never listens, so it is given
no connection. A worker that dies loses the connections waiting in its own backlog (the
price of SO_REUSEPORT); uvicorn's supervisor starts another, which listens afresh.

:func:`run_workers` runs uvicorn's own supervisor (signals, restarts, health checks) with
workers whose server swaps the inherited socket for its own before it listens.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import uvicorn
from uvicorn.supervisors import multiprocess

log = logging.getLogger("uvicorn.error")


def reuseport_socket(host: str, port: int, family: int | None = None) -> socket.socket:
    """A TCP socket bound to ``host:port`` in an SO_REUSEPORT group (not listening yet)."""
    if family is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _OwnListenerServer(uvicorn.Server):
    """A worker's server: listens on a socket of its own in the supervisor's port group."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets:
            own = []
            for inherited in sockets:
                host, port = inherited.getsockname()[:2]
                own.append(reuseport_socket(host, port, inherited.family))
                inherited.close()  # this worker never accepts from the supervisor's socket
            sockets = own
        await super().startup(sockets)


class _OwnListenerProcess(multiprocess.Process):
    """uvicorn's worker process, with :class:`_OwnListenerServer` as its server."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = _OwnListenerServer(config=self.config)
        return self._server


def run_workers(config: uvicorn.Config, host: str, port: int) -> None:
    """Serve ``config`` with ``config.workers`` processes, each listening on its own socket."""
    sock = reuseport_socket(host, port)
    sock.set_inheritable(True)
    bound: Any = sock.getsockname()
    log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", bound[0], bound[1])
    # The supervisor makes its workers by this module-level name; ours are uvicorn's with
    # another server. (This process only supervises: nothing else here uses the name.)
    multiprocess.Process = _OwnListenerProcess  # type: ignore[misc]
    try:
        multiprocess.Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
