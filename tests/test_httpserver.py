"""The HTTP protocol writes a response's head and body in one write, and never holds one back.

The protocol is driven as uvicorn drives it (``connection_made``, then the bytes of a request)
over a transport that records what it is asked to write: the number of writes is the point.
``waitroom serve`` and every test that starts the real server use the same protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import threading
import time
import weakref
from typing import Any

import pytest
import uvloop
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.config import Config
from uvicorn.server import Server, ServerState
from websockets.asyncio.client import connect as ws_connect

from waitroom.core.http import RequestContextMiddleware
from waitroom.core.httpserver import (
    ACCEPTORS,
    PROTOCOL,
    RECEIVED,
    SEND_TEXT_NOW,
    WS_PROTOCOL,
    HttpProtocol,
    WebSocketProtocol,
    listeners,
)

pytestmark = pytest.mark.anyio

LATENCY = "waitroom_http_request_duration_seconds"
QUEUED = "waitroom_http_request_queued_seconds"


class RecordingTransport(asyncio.Transport):
    """A transport that keeps every write and the moment it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol


async def _json(request: Request) -> Response:
    return JSONResponse({"ok": True, "path": request.url.path})


async def _echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def _slow_stream(request: Request) -> Response:
    async def body() -> Any:
        await asyncio.sleep(0.2)
        yield b"late"

    return StreamingResponse(body(), media_type="text/plain")


APP = Starlette(
    routes=[
        Route("/json", _json),
        Route("/echo", _echo, methods=["POST"]),
        Route("/stream", _slow_stream),
    ]
)


def _connect() -> tuple[HttpProtocol, RecordingTransport]:
    config = Config(app=APP, http=HttpProtocol, lifespan="off", log_config=None)
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def _until(condition: Any, seconds: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():  # the transport is written by the loop's callbacks: poll it
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"not met within {seconds} s")
        await asyncio.sleep(0.001)


async def test_a_response_goes_out_in_one_write_with_its_head_and_body() -> None:
    protocol, transport = _connect()
    for n in range(3):  # keep-alive: each response of the connection, one write each
        protocol.data_received(f"GET /json?n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await _until(lambda n=n: len(transport.writes) > n)
        await asyncio.sleep(0.01)  # a held-back write would show up meanwhile
        assert len(transport.writes) == n + 1
        head, _, body = transport.writes[n].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert body == b'{"ok":true,"path":"/json"}'
    assert not transport.closing


async def test_a_closing_connection_writes_the_answer_before_it_closes() -> None:
    protocol, transport = _connect()
    protocol.data_received(b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await _until(lambda: transport.closing)
    assert transport.events == ["write", "close"]
    assert transport.writes[0].endswith(b'{"ok":true,"path":"/json"}')


async def test_a_head_whose_body_is_late_is_not_held_until_the_body() -> None:
    protocol, transport = _connect()
    protocol.data_received(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    await _until(lambda: len(transport.writes) >= 1)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK")
    assert b"late" not in transport.writes[0]
    await _until(lambda: b"".join(transport.writes).endswith(b"0\r\n\r\n"))
    assert b"late" in b"".join(transport.writes)


async def test_100_continue_is_written_while_the_client_holds_its_body() -> None:
    protocol, transport = _connect()
    protocol.data_received(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await _until(lambda: len(transport.writes) >= 1)
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    protocol.data_received(b"hello")
    await _until(lambda: len(transport.writes) >= 2)
    await asyncio.sleep(0.01)
    assert len(transport.writes) == 2
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK")
    assert transport.writes[1].endswith(b"\r\n\r\nhello")


def test_the_server_is_started_with_this_protocol() -> None:
    config = Config(app=APP, http=PROTOCOL, ws=WS_PROTOCOL)
    config.load()
    assert config.http_protocol_class is HttpProtocol
    assert config.ws_protocol_class is WebSocketProtocol


async def test_a_websocket_lets_go_of_its_handshake_once_answered_and_still_sends() -> None:
    """The handshake's request and response (their headers: kilobytes of every idle fan's
    socket) are not kept for the connection's lifetime."""
    sent = asyncio.Event()
    release = asyncio.Event()

    async def hold(websocket: WebSocket) -> None:
        await websocket.accept()
        await release.wait()
        await websocket.send_text('{"type":"position","position":7}')
        sent.set()
        await websocket.receive()  # until the client goes

    app = Starlette(routes=[WebSocketRoute("/ws", hold)])
    config = Config(app=app, http=HttpProtocol, ws=WebSocketProtocol, lifespan="off")
    config.load()
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    ws = transport.get_protocol()
    assert isinstance(ws, WebSocketProtocol)
    await _until(lambda: any(b"101" in w for w in transport.writes))
    assert ws.request is None and ws.response is None
    release.set()
    await asyncio.wait_for(sent.wait(), 2)
    assert b'{"type":"position","position":7}' in transport.writes[-1]
    ws.connection_lost(None)


async def _ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.close()


async def test_the_http_protocol_a_websocket_upgrade_leaves_behind_is_freed_at_once() -> None:
    """Not left in a cycle with its parser for the collector: every WebSocket a fan opened
    left one, and a cluster node's young collections (thousands of them each) stopped its
    event loop for 0.06-0.35 s."""
    app = Starlette(routes=[WebSocketRoute("/ws", _ws)])
    config = Config(app=app, http=HttpProtocol, lifespan="off", log_config=None)
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    gone = weakref.ref(protocol)
    gc.disable()
    try:
        protocol.data_received(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert transport.get_protocol() is not protocol  # the WebSocket's now
        del protocol
        assert gone() is None
    finally:
        gc.enable()
    await _until(lambda: any(b"101" in w for w in transport.writes))


@pytest.mark.parametrize("deflate", [False, True])
async def test_whole_frames_written_at_once_reach_a_client_as_sent_messages(deflate: bool) -> None:
    """send_text_now's frames, of each length encoding (7 bits, 16, 64), read by a real
    client as the messages sent. Refused (False, the caller then sends through ASGI)
    before the handshake is answered, once the connection closes, and on a connection
    that negotiated compression (waitroom serve turns it off)."""
    texts = ["x" * 10, "é" * 150, "y" * 70_000]  # 10, 300 and 70,000 bytes
    written: list[bool] = []
    before: list[bool] = []
    after: list[bool] = []
    finished = asyncio.Event()

    scopes: list[Any] = []

    async def fast(websocket: WebSocket) -> None:
        scopes.append(websocket.scope)
        send_now = websocket.scope["extensions"][SEND_TEXT_NOW]
        before.append(send_now("too early"))
        await websocket.accept()
        for text in texts:
            written.append(send_now(text))
            if not written[-1]:
                await websocket.send_text(text)
        await websocket.send_text("through asgi")  # the slow path still works after
        await websocket.receive()  # the client's close
        after.append(send_now("too late"))
        finished.set()

    app = Starlette(routes=[WebSocketRoute("/ws", fast)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config(
        app=app,
        ws=WebSocketProtocol,
        ws_per_message_deflate=deflate,
        lifespan="off",
        log_config=None,
    )
    server = Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await _until(lambda: server.started, 10)
        async with ws_connect(f"ws://127.0.0.1:{port}/ws") as client:
            got = [await asyncio.wait_for(client.recv(), 5) for _ in range(4)]
        await asyncio.wait_for(finished.wait(), 5)
    finally:
        server.should_exit = True
        await serving
    assert got == [*texts, "through asgi"]
    assert written == [not deflate] * 3
    assert before == [False] and after == [False]
    # Once the connection is gone its scope no longer refers back to the protocol (a cycle
    # left to the collector for every fan's socket).
    assert scopes and all(SEND_TEXT_NOW not in scope["extensions"] for scope in scopes)


async def test_each_request_notes_when_its_first_byte_was_read() -> None:
    seen: list[float] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope[RECEIVED])
        await JSONResponse({})(scope, receive, send)

    config = Config(app=app, http=HttpProtocol, lifespan="off", log_config=None)
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    before = time.perf_counter()
    protocol.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await _until(lambda: len(transport.writes) == 1)
    assert len(seen) == 1 and before <= seen[0] <= time.perf_counter()


def _observed(name: str, **labels: str) -> float:
    """The sum of what the histogram ``name`` (the series of ``labels``) has observed."""
    return REGISTRY.get_sample_value(f"{name}_sum", labels) or 0.0


async def test_a_request_s_latency_counts_its_wait_before_the_app() -> None:
    """A request left unread by a busy event loop is slow for the fan: the server's own
    figures time it from its first byte, not from when the app got to it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse({})(scope, receive, send)

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    latency_before = _observed(LATENCY, route="unmatched", method="GET")
    queued_before = _observed(QUEUED)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/waited",
        "headers": [],
        RECEIVED: time.perf_counter() - 0.3,
    }
    await RequestContextMiddleware(app)(scope, receive, send)
    assert sent[0]["status"] == 200
    assert _observed(LATENCY, route="unmatched", method="GET") - latency_before >= 0.3
    assert _observed(QUEUED) - queued_before >= 0.3


def test_a_busy_server_takes_in_a_burst_of_connections_at_once() -> None:
    """uvloop accepts one connection per listening descriptor each turn of its loop: a node
    whose turns took 20 ms took 6 s to take in 300 connections (HAProxy's requests waited
    unread in its accept queue). With the listeners' descriptors it takes a fraction of
    that; and closing the servers still closes the socket (a draining node refuses)."""
    connections = 300

    async def main() -> tuple[float, bool]:
        loop = asyncio.get_running_loop()
        made: list[float] = []
        all_made = asyncio.Event()

        class Counting(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(time.perf_counter())
                if len(made) == connections:
                    all_made.set()

        config = Config(app=APP, host="127.0.0.1", port=0, backlog=4096)
        sockets = listeners(config)
        assert len(sockets) == ACCEPTORS
        port = sockets[0].getsockname()[1]
        servers = [await loop.create_server(Counting, sock=s, backlog=4096) for s in sockets]
        stop = False

        def busy() -> None:  # a loaded node: every turn of its loop takes 20 ms
            time.sleep(0.02)
            if not stop:
                loop.call_soon(busy)

        loop.call_soon(busy)
        clients: list[socket.socket] = []

        def connect() -> None:
            for _ in range(connections):
                clients.append(socket.create_connection(("127.0.0.1", port)))

        started = time.perf_counter()
        thread = threading.Thread(target=connect)
        thread.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_made.wait(), 30)
        took = time.perf_counter() - started
        stop = True
        thread.join()
        for server in servers:
            server.close()
            await server.wait_closed()
        for client in clients:
            client.close()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        return took, refused

    took, refused = uvloop.run(main())
    assert took < 2.0  # one listening descriptor: ~6 s
    assert refused
