"""One client process of the WebSocket benchmark: join fans over HTTP, hold their WebSockets,
time their position updates.

``python -m stress.wsclient`` is a child of :mod:`stress.websocket`; several run side by side
(one process cannot hold 20,000 sockets under this machine's limit of 20,000 open files,
and the load spreads over both cores). It:

1. raises its open-files limit to the hard limit;
2. joins ``--fans`` new fans through ``POST /v1/events/{id}/queue`` over ``--join-connections``
   keep-alive connections, each fan from its own ``X-Forwarded-For`` address, and keeps the
   visitor token of each; prints ``joined N``;
3. once it reads ``connect``, opens one WebSocket per fan (identity in ``Authorization``,
   as a non-browser client sends it; ``X-Forwarded-For`` the fan's own address, since the
   server caps sockets per client address), ``--connect-concurrency`` handshakes in flight
   at a time; prints ``connected N`` (N counts the handshakes that succeeded);
4. reads ``window T0 T1`` (unix times) from stdin; from then on, for every fan, the time
   between two consecutive ``position`` messages is a gap; the gaps that end inside the
   window, and for each fan the time from its last update to T1, are the measurements;
5. at T1 closes every WebSocket, writes the gaps (``array('d')``, seconds) to ``--out``,
   prints one JSON line (:class:`Report`) and exits.

The WebSocket protocol is the ``websockets`` library's own (its sans-I/O
:class:`~websockets.client.ClientProtocol`: handshake, frame parsing, answering pings,
closing), driven from :class:`asyncio.Protocol` callbacks: no task and no coroutine per
message. Small whole text frames are read without the library's parser, and during the
measurement the process reads in batches (``--nap-ms``, see :func:`nap`): at 20,000
messages a second on a 2-core machine, every microsecond spent here is taken from the server.
A fan that has been admitted (its ``admitted`` message carries the pass) no longer gets
position updates, so it stops counting; a connection that closes before T1 is a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import time
from array import array
from pathlib import Path
from typing import Protocol, cast

import msgspec
import uvloop
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

_POSITION = b'{"type":"position"'
_ADMITTED = b'{"type":"admitted"'


class Report(msgspec.Struct):
    """What one client process saw."""

    fans: int
    joined: int
    join_s: float
    connected: int
    connect_failed: int
    connect_s: float
    #: Connections still open at the end of the window.
    open_at_end: int
    #: Connections that closed (or failed) between being connected and the window's end.
    dropped: int
    close_codes: dict[str, int]
    admitted: int
    #: Messages received inside the window, and of those, position updates.
    messages: int
    positions: int
    max_gap_s: float
    #: Fans (not admitted) that had received no position update since before T0 - 2 s.
    stale_at_start: int
    cpu_s: float


class Listener(Protocol):
    """What a process's WebSockets report to: :class:`_Client` here, the seat map viewers
    of :mod:`stress.seatviewers`."""

    def on_open(self, fan: Fan) -> None:
        """``fan``'s handshake succeeded."""

    def on_message(self, fan: Fan, data: bytes, now: float) -> None:
        """A text message arrived on ``fan`` at ``now`` (unix time)."""

    def on_closed(self, fan: Fan) -> None:
        """``fan``'s connection is gone."""


class Fan(asyncio.Protocol):
    """One fan's WebSocket: the library's protocol state machine fed from socket callbacks.

    ``max_size``: the largest message accepted (None: any; a seat map diff may be large).
    """

    def __init__(
        self, client: Listener, uri: str, headers: dict[str, str], max_size: int | None = 65536
    ) -> None:
        self.client = client
        self.ws = ClientProtocol(parse_uri(uri), max_size=max_size)
        self.headers = headers
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.last = 0.0
        self.admitted = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        request = self.ws.connect()
        request.headers.update(self.headers)
        self.ws.send_request(request)
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        data = self.ws.data_to_send()
        if data:
            self.transport.write(b"".join(data))
            # An empty chunk is the library asking to half-close once the close handshake is
            # through on our side.
            if data[-1] == b"" and self.transport.can_write_eof():
                self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.ws.state is State.OPEN and not self.ws.reader.buffer:
            # Whole small text frames (FIN, no extension bits, unmasked, under 126 bytes:
            # every position the server sends) are read here; the library's parser, a
            # generator, costs several times more per frame. It only ever sees whole frames
            # from where it left off, so its state stays right.
            at, size = 0, len(data)
            while at + 2 <= size and data[at] == 0x81 and data[at + 1] < 126:
                end = at + 2 + data[at + 1]
                if end > size:
                    break
                self.client.on_message(self, data[at + 2 : end], now)
                at = end
            if at == size:
                return
            data = data[at:]
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if not self.handshake.done():
                    self.handshake.set_result(self.ws.handshake_exc is None)
                continue
            assert isinstance(event, Frame)
            if event.opcode is Opcode.TEXT:
                self.client.on_message(self, bytes(event.data), now)
        self._flush()

    def close(self, code: int = 1000) -> None:
        """Say goodbye (a close frame, when open) and drop the connection."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.ws.state is State.OPEN:
            self.ws.send_close(code)
            self._flush()
        self.transport.close()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_result(False)
        if not self.closed:
            self.closed = True
            self.client.on_closed(self)


class _Client:
    """The fans of this process and what they measure."""

    def __init__(self) -> None:
        self.t0 = float("inf")
        self.t1 = float("inf")
        self.measuring = False
        self.gaps = array("d")
        self.messages = 0
        self.positions = 0
        self.admitted = 0
        self.dropped = 0
        self.close_codes: dict[str, int] = {}
        self.open = 0
        self.all_closed = asyncio.Event()

    def on_open(self, fan: Fan) -> None:
        fan.last = time.time()
        self.open += 1

    def on_message(self, fan: Fan, data: bytes, now: float) -> None:
        inside = self.t0 <= now <= self.t1
        if inside:
            self.messages += 1
        if fan.admitted:
            return
        if data.startswith(_POSITION):
            if inside:
                self.positions += 1
                self.gaps.append(now - fan.last)
            fan.last = now
        elif data.startswith(_ADMITTED):
            fan.admitted = True
            self.admitted += 1

    def on_closed(self, fan: Fan) -> None:
        self.open -= 1
        if self.open <= 0:
            self.all_closed.set()
        if self.measuring or time.time() < self.t1:
            self.dropped += 1
            code = str(fan.ws.close_code) if fan.ws.close_code is not None else "none"
            self.close_codes[code] = self.close_codes.get(code, 0) + 1


async def _join(
    port: int, event_id: str, count: int, connections: int, ip_offset: int
) -> list[tuple[str, str]]:
    """Join ``count`` new fans; their visitor tokens and addresses (fewer if joins failed)."""
    tokens: list[tuple[str, str]] = []
    numbers = iter(range(ip_offset, ip_offset + count))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for n in numbers:
                ip = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
                writer.write(
                    f"POST /v1/events/{event_id}/queue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"X-Forwarded-For: {ip}\r\nContent-Length: 0\r\n\r\n".encode()
                )
                head = (await reader.readuntil(b"\r\n\r\n")).lower()
                at = head.find(b"\r\ncontent-length:")
                length = int(head[at + 17 : head.find(b"\r\n", at + 2)])
                body = await reader.readexactly(length)
                if head[9:12] == b"201":
                    token = msgspec.json.decode(body).get("visitor_token")
                    if isinstance(token, str):
                        tokens.append((token, ip))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return tokens


async def connect(
    client: Listener,
    port: int,
    path: str,
    headers: list[dict[str, str]],
    concurrency: int,
    *,
    max_size: int | None = 65536,
) -> tuple[list[Fan], int]:
    """One WebSocket to ``path`` on 127.0.0.1:``port`` per set of ``headers``; the fans whose
    handshake succeeded (each told to ``client.on_open``), and the number that failed."""
    loop = asyncio.get_running_loop()
    semaphore = asyncio.Semaphore(concurrency)
    fans: list[Fan] = []
    failed = 0

    uri = f"ws://127.0.0.1:{port}{path}"

    async def one(fan_headers: dict[str, str]) -> None:
        nonlocal failed
        async with semaphore:
            try:
                _, fan = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Fan(client, uri, fan_headers, max_size), "127.0.0.1", port
                    ),
                    30,
                )
                ok = await asyncio.wait_for(fan.handshake, 30)
            except (OSError, TimeoutError):
                failed += 1
                return
        if ok and fan.ws.state is State.OPEN:
            fans.append(fan)
            client.on_open(fan)
        else:
            failed += 1

    await asyncio.gather(*(one(h) for h in headers))
    return fans, failed


async def nap(until: float, seconds: float, done: asyncio.Event | None = None) -> None:
    """Sleep ``seconds`` between event-loop turns until ``until`` (or ``done`` is set), so
    messages arrive in batches.

    A process that waits in epoll is woken by the kernel for every message, and over
    loopback that wake-up is work done in the SENDER's write: the server would pay for it,
    which it would not for clients on other machines. Sleeping here instead lets each
    socket's messages pile up and be read in one turn, about 1000/``seconds`` wake-ups a
    second in all. Receive times are late by at most ``seconds``, gaps off by as much.
    """
    while time.time() < until and not (done is not None and done.is_set()):
        time.sleep(seconds)  # noqa: ASYNC251 -- blocking on purpose: see above
        await asyncio.sleep(0)


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _main(args: argparse.Namespace) -> tuple[Report, array[float]]:
    loop = asyncio.get_running_loop()
    client = _Client()
    started = time.monotonic()
    tokens = await _join(args.port, args.event, args.fans, args.join_connections, args.ip_offset)
    join_s = time.monotonic() - started
    print(f"joined {len(tokens)}", flush=True)
    # Wait for the parent's word: it weighs the server with every fan joined and none
    # connected yet.
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "connect":
        raise SystemExit(f"wsclient: expected 'connect', got {line!r}")
    started = time.monotonic()
    fans, failed = await connect(
        client,
        args.port,
        f"/v1/events/{args.event}/queue/ws",
        [{"Authorization": f"Bearer {token}", "X-Forwarded-For": ip} for token, ip in tokens],
        args.connect_concurrency,
    )
    connect_s = time.monotonic() - started
    print(f"connected {len(fans)}", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    parts = line.split()
    if len(parts) != 3 or parts[0] != "window":
        raise SystemExit(f"wsclient: expected 'window T0 T1', got {line!r}")
    client.t0, client.t1 = float(parts[1]), float(parts[2])
    client.measuring = True
    napping = asyncio.create_task(nap(client.t1, args.nap_ms / 1000)) if args.nap_ms else None
    cpu0 = _cpu()
    await asyncio.sleep(max(0.0, client.t0 - time.time()))
    stale = sum(1 for f in fans if not f.closed and not f.admitted and f.last < client.t0 - 2)
    await asyncio.sleep(max(0.0, client.t1 - time.time()))
    client.measuring = False
    if napping is not None:
        await napping
    cpu = _cpu() - cpu0
    open_fans = [f for f in fans if not f.closed]
    for fan in open_fans:
        if not fan.admitted:
            client.gaps.append(client.t1 - fan.last)  # the gap still running at the end
    report = Report(
        fans=args.fans,
        joined=len(tokens),
        join_s=round(join_s, 2),
        connected=len(fans),
        connect_failed=failed,
        connect_s=round(connect_s, 2),
        open_at_end=len(open_fans),
        dropped=client.dropped,
        close_codes=client.close_codes,
        admitted=client.admitted,
        messages=client.messages,
        positions=client.positions,
        max_gap_s=round(max(client.gaps, default=0.0), 3),
        stale_at_start=stale,
        cpu_s=round(cpu, 2),
    )
    await close_all(open_fans, client.all_closed)
    return report, client.gaps


async def close_all(fans: list[Fan], all_closed: asyncio.Event) -> None:
    """Send a close frame on every connection; give the server a moment (until
    ``all_closed``), then cut the rest."""
    for fan in fans:
        if fan.ws.state is State.OPEN:
            fan.ws.send_close(1001, "benchmark over")
            fan._flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_closed.wait(), 5)
    for fan in fans:
        if fan.transport is not None and not fan.closed:
            fan.transport.abort()


def main(argv: list[str] | None = None) -> int:
    """Entry point of one client process (see the module's docstring)."""
    parser = argparse.ArgumentParser(prog="python -m stress.wsclient")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event", required=True)
    parser.add_argument("--fans", type=int, required=True)
    parser.add_argument("--ip-offset", type=int, default=0)
    parser.add_argument("--join-connections", type=int, default=8)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--nap-ms", type=float, default=10.0, help="0: wait in epoll")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    raise_file_limit()
    report, gaps = uvloop.run(_main(args))
    Path(args.out).write_bytes(gaps.tobytes())
    print(msgspec.json.encode(report).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
