"""Simulated fans of a sale, and the lean HTTP client they use; see :mod:`stress.faults`.

Each :class:`Fan` arrives at its time, joins over HTTP (keeping its ``visitor_token`` and
``place_receipt``), polls ``GET .../queue/me`` (more often the nearer it is to the head of the
line), and when told 404 ``not_in_line`` joins again WITH its receipt (without it only if the
receipt restores nothing: a lost place). Once admitted it reserves 1 or 2 tickets with its
pass (fewer if only one is left), confirms with the mock provider's ``card`` and polls the
reservation until the order is paid (confirming again, up to three times, after a failed
payment). Writes carry an ``Idempotency-Key`` kept across retries.

Every request is recorded (route, status or 0 for a failed connection, start, duration): a
503 or 429 is retried after its ``Retry-After``, a dropped connection on the other server when
there are two. Requests go through :class:`Http`, keep-alive HTTP/1.1 parsed by httptools:
httpx cost some 2 ms of CPU per request, which made the fans' own process the bottleneck of a
2,000-fan sale and put its event loop's lag into every latency measured.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import httptools
import msgspec

T = TypeVar("T")


@dataclass(frozen=True)
class SaleSpec:
    """One sale: its size, pace and how the fans behave; and when the fault strikes."""

    fans: int = 250
    tickets: int = 75
    #: Admissions per second and passes live at once.
    rate: float = 10.0
    max_active: int = 8
    #: Fans arrive evenly over this many seconds.
    arrival_s: float = 8.0
    #: The fault strikes once this share of the tickets is paid (or after ``fault_by_s``).
    fault_at_sold: float = 0.3
    fault_by_s: float = 20.0
    #: A killed process is restarted, a stopped PostgreSQL started, after this long.
    outage_s: float = 3.0
    #: The line is read again this long after the fault's end (every fan has polled by then).
    settle_s: float = 4.0
    #: Least and most seconds between two polls of a waiting fan.
    poll_min_s: float = 0.3
    poll_max_s: float = 2.0
    #: Bound on the whole sale, from the first arrival; fans not done by then are unfinished.
    deadline_s: float = 45.0
    #: Concurrent HTTP requests of all fans together (also the connection pool's size).
    connections: int = 128
    #: Paid fans whose pass is tried again after the sale (it must be refused as spent).
    spent_checks: int = 30


@dataclass
class Fan:
    """One simulated fan and what happened to it."""

    index: int
    ip: str
    server: int
    fan_id: str = ""
    token: str = ""
    receipt: str | None = None
    #: (monotonic time, place) of every place a join answered with.
    places: list[tuple[float, int]] = field(default_factory=list)
    queue_pass: str | None = None
    hold_id: str | None = None
    tickets: int = 0
    state: str = "new"  # waiting, admitted, paid, sold_out, failed
    error: str | None = None
    paid_at: float | None = None
    rejoins: int = 0
    receipts_refused: int = 0


@dataclass
class Progress:
    """Counters of the sale; ``trigger`` is set once ``trigger_at`` tickets are paid."""

    trigger_at: float
    tickets_paid: int = 0
    fans_done: int = 0
    trigger: asyncio.Event = field(default_factory=asyncio.Event)

    def paid(self, tickets: int) -> None:
        self.tickets_paid += tickets
        if self.tickets_paid >= self.trigger_at:
            self.trigger.set()


class TransportError(Exception):
    """The connection failed, closed or timed out before a whole answer came."""


class Answer:
    """One HTTP answer: status, headers (lower-case names) and body."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        return _decode(self.content)


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, parsed by httptools.

    httpx costs some 2 ms of CPU per request, which made the fans' own process the bottleneck
    of a 2,000-fan sale (and its event loop's lag part of every latency): this costs a tenth.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[Answer] | None = None
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.name = b""
        self.lost = False
        self.used = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are transports.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail("connection lost")

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad answer: {exc}")
            if self.transport is not None:
                self.transport.close()

    def _fail(self, why: str) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(TransportError(why))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.answer is not None and not self.answer.done():
            status = self.parser.get_status_code()
            self.answer.set_result(Answer(status, self.headers, b"".join(self.body)))
        if not self.parser.should_keep_alive():
            self.lost = True

    async def send(self, request: bytes, timeout: float) -> Answer:
        assert self.transport is not None
        self.headers, self.body = {}, []
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await asyncio.wait_for(self.answer, timeout)
        except TimeoutError:
            self.lost = True
            self.transport.close()
            raise TransportError("no answer in time") from None
        finally:
            self.answer = None
            self.used = time.monotonic()


class _Server:
    """Idle keep-alive connections to one server."""

    def __init__(self, url: str) -> None:
        host_port = url.split("://", 1)[1]
        host, port = host_port.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.host_header = f"Host: {host_port}\r\n".encode()
        self.idle: list[_Connection] = []

    def _idle(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            # Older than the server's keep-alive timeout (5 s) would race its close.
            if not conn.lost and now - conn.used < 3.0:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot connect: {exc!r}") from None
        return conn

    async def request(self, raw: bytes, timeout: float) -> Answer:
        conn = self._idle() or await self._connect(timeout)
        try:
            answer = await conn.send(raw, timeout)
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()
            raise
        if not conn.lost:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return answer

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


class Http:
    """The fans' HTTP client (keep-alive connections to each server), recording every request.

    Each request waits for one of ``connections`` slots BEFORE its clock starts, so a
    recorded duration is the server's (and the network's), not the client's own queue.
    """

    def __init__(self, urls: Sequence[str], connections: int, hung_s: float) -> None:
        self.servers = [_Server(u) for u in urls]
        self.gate = asyncio.Semaphore(connections)
        self.hung_s = hung_s
        self.timeout = 30.0
        #: (route, status or 0 for a failed connection, started, seconds)
        self.calls: list[tuple[str, int, float, float]] = []

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        await asyncio.sleep(0)  # let the transports finish closing

    async def call(
        self,
        fan: Fan,
        route: str,
        method: str,
        path: str,
        *,
        deadline: float,
        headers: dict[str, str] | None = None,
        json: Any = None,
    ) -> Answer | None:
        """One request, retried after 503/429 and on the other server when a connection
        fails; the last answer, or None when ``deadline`` passed first."""
        head = [f"{method} {path} HTTP/1.1\r\n".encode()]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode())
        body = b"" if json is None else _encode(json)
        if json is not None:
            head.append(b"Content-Type: application/json\r\n")
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        tail = b"".join(head[1:]) + body
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            server = self.servers[fan.server]
            async with self.gate:
                started = time.monotonic()
                try:
                    answer = await server.request(head[0] + server.host_header + tail, self.timeout)
                except TransportError:
                    self.calls.append((route, 0, started, time.monotonic() - started))
                    fan.server = (fan.server + 1) % len(self.servers)
                    answer = None
            if answer is None:
                await asyncio.sleep(min(0.05 * attempt, 1.0))
                continue
            self.calls.append((route, answer.status_code, started, time.monotonic() - started))
            if answer.status_code in (429, 503):
                retry = float(answer.headers.get("retry-after", "1") or 1)
                await asyncio.sleep(min(retry, 5.0) * random.uniform(0.5, 1.0))
                continue
            return answer
        return None


def _code(response: Answer) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _place(receipt: str) -> int:
    return int(receipt.split(".", 1)[0])


def _ip(i: int) -> str:
    # Every fan from its own address, consecutive fans in different /24s (as stress.simulation).
    return f"10.{i & 255}.{(i >> 8) & 255}.{((i >> 16) & 255) + 1}"


class Stalls:
    """Harness steps that did not finish within their bound (each is named in the report).

    A step that hangs (a client that never times out, a cancellation that is never honoured)
    must not hang the benchmark: it is given up on, not awaited, and the report says so.
    """

    def __init__(self) -> None:
        self.names: list[str] = []

    async def bounded(self, name: str, work: Awaitable[T], seconds: float, default: T) -> T:
        task = asyncio.ensure_future(work)
        await asyncio.wait({task}, timeout=seconds)
        if not task.done():
            self.names.append(name)
            task.cancel()
            return default
        return task.result()


class Sale:
    """The fans of one sale against the servers at ``urls``."""

    def __init__(self, urls: Sequence[str], event_id: str, spec: SaleSpec, hung_s: float) -> None:
        self.event_id = event_id
        self.spec = spec
        self.http = Http(urls, spec.connections, hung_s)
        self.servers = len(urls)
        self.fans = [Fan(i, _ip(i), i % self.servers) for i in range(spec.fans)]
        self.progress = Progress(spec.fault_at_sold * spec.tickets)
        self.started = time.monotonic()
        self.deadline = self.started + spec.deadline_s
        #: Reservations answered 201, and payments answered 202 (hold ids).
        self.acked_holds: set[str] = set()
        self.acked_payments: set[str] = set()
        self.stalls = Stalls()
        #: What checks expecting a refusal got instead ("check:<status> <code>", in order).
        self.not_refused: list[str] = []
        #: Checks refused, but with one of their other accepted codes ("<expected>: 403 <code>").
        self.refused_otherwise: list[str] = []

    # --- one fan ----------------------------------------------------------------------------

    def headers(self, fan: Fan) -> dict[str, str]:
        headers = {"X-Forwarded-For": fan.ip}
        if fan.token:
            headers["Authorization"] = f"Bearer {fan.token}"
        return headers

    async def join(self, fan: Fan, receipt: str | None = None) -> dict[str, Any] | None:
        """Join (again, with ``receipt``); the answer's body, or None (refused, or failed)."""
        headers = self.headers(fan)
        if receipt is not None:
            headers["X-Place-Receipt"] = receipt
        response = await self.http.call(
            fan,
            "join",
            "POST",
            f"/v1/events/{self.event_id}/queue",
            headers=headers,
            deadline=self.deadline,
        )
        if response is None:
            return None
        if response.status_code not in (200, 201):
            if receipt is not None and response.status_code in (403, 410):
                fan.receipts_refused += 1
                fan.error = f"receipt refused: {response.status_code} {_code(response)}"
                return None
            self._fail(fan, f"join {response.status_code} {_code(response)}")
            return None
        body: dict[str, Any] = response.json()
        if body.get("visitor_token"):
            fan.token = body["visitor_token"]
        fan.fan_id = body["fan_id"]
        if body.get("place_receipt"):
            fan.receipt = body["place_receipt"]
            fan.places.append((time.monotonic(), _place(body["place_receipt"])))
        return body

    def _fail(self, fan: Fan, error: str) -> None:
        fan.state, fan.error = "failed", error

    async def run_fan(self, fan: Fan, at: float) -> None:
        try:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            body = await self.join(fan)
            if body is not None:
                fan.state = "waiting"
                if await self._wait(fan, body):
                    await self._buy(fan)
        finally:
            self.progress.fans_done += 1

    async def _wait(self, fan: Fan, body: dict[str, Any]) -> bool:
        """Wait for a pass (True), or for the sale to sell out (False)."""
        spec = self.spec
        me = f"/v1/events/{self.event_id}/queue/me"
        while True:
            if body["status"] == "admitted":
                fan.queue_pass, fan.state = body["queue_pass"], "admitted"
                return True
            if body["status"] == "sold_out":
                fan.state = "sold_out"
                return False
            ahead = body.get("fans_ahead") or 0
            pause = min(spec.poll_max_s, max(spec.poll_min_s, ahead / spec.rate / 3))
            await asyncio.sleep(pause * random.uniform(0.8, 1.2))
            response = await self.http.call(
                fan, "position", "GET", me, headers=self.headers(fan), deadline=self.deadline
            )
            if response is None:
                return False
            if response.status_code == 404 and _code(response) == "not_in_line":
                # Redis lost the line (or the fan was dropped): back with the receipt, and
                # only if it restores nothing, without it (a new place: a lost one).
                fan.rejoins += 1
                again = await self.join(fan, fan.receipt) if fan.receipt else None
                if again is None and fan.state != "failed":
                    again = await self.join(fan)
                if again is None:
                    return False
                body = again
            elif response.status_code == 200:
                body = response.json()
            else:
                self._fail(fan, f"position {response.status_code} {_code(response)}")
                return False

    async def _buy(self, fan: Fan) -> None:
        assert fan.queue_pass is not None
        headers = {**self.headers(fan), "X-Queue-Pass": fan.queue_pass}
        quantity = 1 + fan.index % 2
        key = uuid.uuid4().hex
        while True:
            response = await self.http.call(
                fan,
                "reserve",
                "POST",
                f"/v1/events/{self.event_id}/reservations",
                json={"ticket_type": "ga", "quantity": quantity},
                headers={**headers, "Idempotency-Key": key},
                deadline=self.deadline,
            )
            if response is None:
                self._fail(fan, "reserve: out of time")
                return
            if response.status_code == 201:
                fan.hold_id = response.json()["id"]
                self.acked_holds.add(fan.hold_id)
                break
            if response.status_code == 409 and _code(response) == "sold_out":
                available = int(response.json()["error"].get("details", {}).get("available", 0))
                if 0 < available < quantity:
                    quantity, key = available, uuid.uuid4().hex
                    continue
                fan.state = "sold_out"
                return
            if response.status_code == 409 and _code(response) == "tickets_held":
                # Held by others who may not pay: ask again (a new request, a new key) after
                # Retry-After, until they are paid (sold_out) or come back.
                retry = float(response.headers.get("retry-after", "5") or 5)
                await asyncio.sleep(retry * random.uniform(0.5, 1.0))
                key = uuid.uuid4().hex
                continue
            self._fail(fan, f"reserve {response.status_code} {_code(response)}")
            return
        await self._pay(fan, headers)

    async def _pay(self, fan: Fan, headers: dict[str, str]) -> None:
        assert fan.hold_id is not None
        path = f"/v1/reservations/{fan.hold_id}"
        for _ in range(3):  # a failed payment is confirmed again while the hold lasts
            response = await self.http.call(
                fan,
                "pay",
                "POST",
                f"{path}/confirm",
                json={"payment_method": "card"},
                headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
                deadline=self.deadline,
            )
            if response is None:
                self._fail(fan, "confirm: out of time")
                return
            if response.status_code == 409 and _code(response) == "hold_already_confirmed":
                pass  # paid already (an earlier confirm whose answer was lost)
            elif response.status_code != 202:
                self._fail(fan, f"confirm {response.status_code} {_code(response)}")
                return
            else:
                self.acked_payments.add(fan.hold_id)
            while True:
                await asyncio.sleep(0.3)
                polled = await self.http.call(
                    fan,
                    "reservation",
                    "GET",
                    path,
                    headers=self.headers(fan),
                    deadline=self.deadline,
                )
                if polled is None:
                    self._fail(fan, "payment: out of time")
                    return
                if polled.status_code != 200:
                    self._fail(fan, f"reservation {polled.status_code} {_code(polled)}")
                    return
                reservation = polled.json()
                if reservation.get("order_status") == "paid":
                    fan.tickets = len(reservation["tickets"])
                    fan.state, fan.paid_at = "paid", time.monotonic()
                    self.progress.paid(fan.tickets)
                    return
                if (reservation.get("payment") or {}).get("state") == "failed":
                    break
        self._fail(fan, "payment failed three times")

    # --- the whole crowd ----------------------------------------------------------------------

    async def run(self) -> None:
        spread = self.spec.arrival_s / max(1, self.spec.fans)
        await asyncio.gather(
            *(self.run_fan(f, self.started + i * spread) for i, f in enumerate(self.fans))
        )

    async def refused(
        self,
        fan: Fan,
        queue_pass: str,
        code: str,
        bound_s: float = 15.0,
        *,
        also: tuple[str, ...] = (),
    ) -> bool:
        """Whether reserving with ``queue_pass`` is refused with 403 ``code``, or one of the
        codes ``also`` (noted in :attr:`refused_otherwise`); 503s retried."""
        response = await self.http.call(
            fan,
            "check",
            "POST",
            f"/v1/events/{self.event_id}/reservations",
            json={"ticket_type": "ga", "quantity": 1},
            headers={
                **self.headers(fan),
                "X-Queue-Pass": queue_pass,
                "Idempotency-Key": uuid.uuid4().hex,
            },
            deadline=time.monotonic() + bound_s,
        )
        got_code = "" if response is None else _code(response)
        if response is not None and response.status_code == 403 and got_code == code:
            return True
        if response is not None and response.status_code == 403 and got_code in also:
            self.refused_otherwise.append(f"{code}: 403 {got_code}")
            return True
        got = "no answer" if response is None else f"{response.status_code} {_code(response)}"
        self.not_refused.append(f"{code}: {got}")
        return False
