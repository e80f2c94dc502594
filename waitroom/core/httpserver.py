"""uvicorn's HTTP protocol (httptools), writing each response's head and body in one system call.

uvicorn writes a response's head when the app sends ``http.response.start`` and its body when
it sends ``http.response.body``: two ``transport.write`` calls, and uvloop sends each at once
(it queues a write only behind a full socket buffer), so every small JSON answer cost two
``write()`` system calls. In the checkout profile those two calls were about a tenth of each
worker's CPU. :class:`HttpProtocol` gives each request's cycle a :class:`_Coalescing` writer:
the head is held until the body follows (in the same step of the event loop when the app
sends both, as every non-streaming response does) and both go out in one ``write()``. A head
whose body does not follow at once (a streaming response, a ``100 Continue``) is written at the
next turn of the event loop, so nothing waits on the app; writes keep their order, and a close
writes what is held first.

``waitroom serve`` runs uvicorn with ``http="waitroom.core.httpserver:HttpProtocol"``.
WebSocket upgrades are untouched (the WebSocket protocol is given the real transport), but
the HTTP protocol they leave behind is let go at once: uvicorn's protocol and its httptools
parser refer to each other (the parser calls back the protocol's bound methods), and only
``connection_lost``, which an upgraded connection never sees, breaks that cycle. Every
WebSocket a fan opened left one for the cyclic garbage collector (with its flow control,
its events and, once the WebSocket closed, its transport): in a cluster sale, thousands of
objects a collection, which made each young collection of a node a 0.06-0.35 s pause of its
event loop.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

#: What ``uvicorn.run(http=...)`` is given to use :class:`HttpProtocol`.
PROTOCOL = "waitroom.core.httpserver:HttpProtocol"
#: What ``uvicorn.run(ws=...)`` is given to use :class:`WebSocketProtocol`.
WS_PROTOCOL = "waitroom.core.httpserver:WebSocketProtocol"
#: The key in a WebSocket scope's ``extensions`` of :meth:`WebSocketProtocol.send_text_now`
#: (absent under another server or protocol: callers fall back to ASGI's ``send``).
SEND_TEXT_NOW = "waitroom.send_text_now"

#: Descriptors of the HTTP listening socket each server process polls (see :func:`listeners`):
#: at most this many connections are accepted from it per turn of the event loop.
ACCEPTORS = 8

#: The scope key holding when the request's first byte was read (``time.perf_counter()``):
#: the server's own latency is timed from there, so a request left waiting between the
#: socket and the app (a busy event loop) is not hidden from the server-side figures.
RECEIVED = "waitroom.received"


class _Coalescing:
    """The transport as one request's cycle sees it: a write is held until the next one (or
    the next turn of the loop, or a close) and then written together with it."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
        else:
            self._held = None
            self._transport.write(held + data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose responses go out in one write each, which notes when
    each request began to arrive (:data:`RECEIVED`), and which lets go of its parser once it
    hands its connection over to a WebSocket."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[RECEIVED] = time.perf_counter()  # type: ignore[literal-required]

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The connection is the WebSocket protocol's now; this one is never called again.
        # Without its parser (which refers back to it) it is freed when the call returns,
        # instead of waiting, with everything it holds, for the cyclic collector.
        self.parser = None  # type: ignore[assignment]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        # None or the real transport's cycle only: an upgrade to WebSocket returns early and
        # keeps the previous cycle, which already has its writer.
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = cast(asyncio.Transport, _Coalescing(self.transport, self.loop))


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (websockets' sans-I/O), which lets go of the handshake's
    request and response once the handshake is answered.

    uvicorn keeps both for the connection's lifetime, though it reads them only until it
    sends the answer: each a websockets ``Headers`` (a dict and a list of every header), some
    kilobytes of a fan's idle socket that a sale holds tens of thousands of (DESIGN.md's
    budget is 30 KB a connection, all of it counted). It also offers the app a writer of
    whole text frames at once, :meth:`send_text_now`, in the scope's extensions (ADR 0024).
    """

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # none for a refused handshake
        if scope is not None:
            scope["extensions"][SEND_TEXT_NOW] = self.send_text_now

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # The scope would keep this protocol in a cycle (the scope's bound method of it),
        # freed only by the cyclic collector, whose pauses grow with every socket left so.
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"].pop(SEND_TEXT_NOW, None)

    def start_keepalive(self) -> None:
        # Called once, right after the handshake's answer is written (uvicorn's send of
        # ``websocket.accept``); a refused handshake never gets here.
        self.request = None  # type: ignore[assignment]
        self.response = None  # type: ignore[assignment]
        super().start_keepalive()

    def send_text_now(self, text: str) -> bool:
        """Write ``text`` as one text frame at once, if the connection takes it without a
        wait: open, answered, not closing, its buffer not full. ``False`` otherwise, and the
        caller sends through ASGI's ``send``, which waits for the buffer or raises.

        The live positions are most of what a node writes in a sale (a message a second to
        every waiting fan); through ASGI each is a chain of coroutines (starlette's
        WebSocket, its exception wrapper, uvicorn's send and its flow-control wait) and
        websockets' frame serializer: 7.4 us of Python a message, against ~1 us here.
        """
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or not self.writable.is_set()
            or self.transport.is_closing()
            or self.conn.state is not State.OPEN
            or self.conn.extensions  # none negotiated: per-message deflate is off
        ):
            return False
        # RFC 6455 5.2: FIN and the text opcode, then the length (a server's frames are not
        # masked), then the payload; websockets keeps no state for a whole frame sent.
        data = text.encode()
        size = len(data)
        if size < 126:
            head = bytes((0x81, size))
        elif size < 65_536:
            head = b"\x81\x7e" + size.to_bytes(2, "big")
        else:
            head = b"\x81\x7f" + size.to_bytes(8, "big")
        self.transport.write(head + data)
        return True


def listeners(config: uvicorn.Config, count: int = ACCEPTORS) -> list[socket.socket]:
    """The server's listening socket, bound once, as ``count`` descriptors for uvicorn to
    serve (``Server.run(sockets=...)``; each becomes one asyncio server of the process).

    uvloop's libuv accepts ONE connection each time its event loop polls a listening
    descriptor ready, then goes on with the loop. A node whose loop turns every 20 ms under
    load therefore takes in 50 connections a second, however many wait: in a 10,000-fan
    sale behind HAProxy, hundreds of connections (HAProxy opens one per request in flight
    beyond those it holds) sat in each node's accept queue, their requests unread for
    seconds, while the node timed its own requests at milliseconds. Duplicates of the
    descriptor are polled as separate sources of the same queue, so each turn accepts up to
    ``count``; when fewer wait, the rest of the turn's accept() calls fail with EAGAIN, which
    costs a system call each. Closing the servers closes every descriptor (uvloop owns the
    sockets it is given), so a draining server still refuses new connections at once.
    """
    sock = config.bind_socket()
    extra = [sock.dup() for _ in range(count - 1)]
    for dup in extra:
        dup.set_inheritable(True)  # as bind_socket leaves the first, for worker processes
    return [sock, *extra]
