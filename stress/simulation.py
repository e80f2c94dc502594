"""Simulated fans of a flash sale, over real HTTP and WebSocket against a running server.

Each fan joins the line (a new anonymous visitor, from its own client address), holds a
WebSocket until it is admitted (or told the sale is sold out), reserves 1 or 2 tickets with
its queue pass, pays with the mock provider's ``card`` method and polls its reservation until
the order is paid. Used by ``python -m stress flash-sale`` and by ``scripts/demo``
(``python -m stress.simulation --base-url ... --event ...`` shows live progress).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import resource
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec

from stress.common import percentile
from stress.fanclient import Answer, FanClient, TransportError
from stress.pow import Solver
from stress.wsclient import Fan as WsFan
from waitroom.core.affinity import NODE_COOKIE


@dataclass
class Outcome:
    """What happened to one fan."""

    index: int
    fan_id: str = ""
    joined_at: float = 0.0
    join_ms: float = 0.0
    admitted_after_s: float | None = None
    #: For a pass that came over the socket: seconds from its ``iat`` (whole seconds, so
    #: 0.5 s late on average) to its arrival: how long the fan took to hear of it.
    pass_age_s: float | None = None
    reserve_ms: float | None = None
    confirm_ms: float | None = None
    paid_after_s: float | None = None
    tickets: int = 0
    sold_out: bool = False
    error: str | None = None


#: Seconds between two progress lines when stdout is not a terminal (a log, CI, a pipe):
#: a terminal gets one line redrawn in place twice a second instead.
LOG_EVERY_S = 5.0
#: A selling window shorter than this gives no rate (one sale is not a rate).
MIN_WINDOW_S = 1.0
#: Least seconds between two asks for a reservation whose payment is under way.
PAYMENT_POLL_S = 0.5
#: Longest the server holds such an ask (``?wait=``: PAYMENT_WAIT_S in static/checkout.js).
PAYMENT_WAIT_S = 10.0


@dataclass
class Progress:
    """Live counters of a running simulation."""

    fans: int
    joined: int = 0
    waiting: int = 0
    admitted: int = 0
    reserved: int = 0
    paid_fans: int = 0
    tickets_sold: int = 0
    sold_out_fans: int = 0
    errors: int = 0
    #: Asks for a reservation whose payment is under way (long polls).
    payment_polls: int = 0
    started: float = field(default_factory=time.monotonic)
    #: When the first and the latest tickets were paid (monotonic), None before any.
    first_sale: float | None = None
    last_sale: float | None = None

    def sold(self, tickets: int, now: float) -> None:
        """Count ``tickets`` paid at ``now`` (``time.monotonic()``)."""
        self.tickets_sold += tickets
        self.first_sale = now if self.first_sale is None else self.first_sale
        self.last_sale = now

    @property
    def selling_window_s(self) -> float:
        """Seconds from the first sale to the latest: the time tickets were being sold."""
        if self.first_sale is None or self.last_sale is None:
            return 0.0
        return self.last_sale - self.first_sale

    @property
    def selling_rate(self) -> float | None:
        """Tickets per second over the selling window, None until it is long enough.

        Averaging over the whole run would count the wait before the first sale and the
        time after the last (fans told it sold out, payments settling) as slow selling.
        """
        window = self.selling_window_s
        return self.tickets_sold / window if window >= MIN_WINDOW_S else None

    def line(self) -> str:
        """One line for a terminal."""
        elapsed = time.monotonic() - self.started
        rate = self.selling_rate
        shown = "      -" if rate is None else f"{rate:6.1f}/s"
        return (
            f"{elapsed:6.1f}s  joined {self.joined:>6}/{self.fans}  waiting {self.waiting:>6}  "
            f"admitted {self.admitted:>6}  tickets sold {self.tickets_sold:>6} "
            f"({shown})  sold-out fans {self.sold_out_fans:>6}  errors {self.errors}"
        )


_decode = msgspec.json.Decoder()
_POSITION = b'{"type":"position"'


def _ip(i: int) -> str:
    # Every simulated fan comes from its own address (X-Forwarded-For, which the server
    # believes from 127.0.0.1 when WAITROOM_TRUSTED_PROXIES trusts it, as the benchmarks and
    # scripts/demo set), as real fans do; the per-IP join limit stays in force. Consecutive
    # fans are in different /24s, as a real crowd is: the proof-of-work's price rises for a
    # subnet that asks for many places.
    return f"10.{i & 255}.{(i >> 8) & 255}.{((i >> 16) & 255) + 1}"


async def _join(
    http: FanClient, event_id: str, ip: str, solver: Solver | None
) -> tuple[Answer, float]:
    """Join as a new fan; when the server asks for proof-of-work, solve it and join again.

    Returns the last answer and how long its request took (the join itself, without the
    challenge and the solving, which are the fan's own time).
    """
    headers = {"X-Forwarded-For": ip}
    url = f"/v1/events/{event_id}/queue"
    started = time.perf_counter()
    response = await _request(http, "POST", url, headers=headers)
    took = time.perf_counter() - started
    for _ in range(3):
        if response.status_code not in (403, 410) or solver is None:
            break
        offer = await _request(http, "POST", f"/v1/events/{event_id}/challenge", headers=headers)
        if offer.status_code != 200:
            return offer, took
        solution = await solver.solve(offer.json())
        started = time.perf_counter()
        response = await _request(
            http, "POST", url, headers={**headers, "X-Challenge-Solution": solution}
        )
        took = time.perf_counter() - started
    return response, took


async def _request(http: FanClient, method: str, url: str, **kwargs: Any) -> Answer:
    """One request, retried on 429/503 after the server's Retry-After, and on a dropped
    connection (bounded). Retrying writes is safe: each carries an Idempotency-Key."""
    for attempt in range(20):
        try:
            response = await http.request(method, url, **kwargs)
        except TransportError:
            if attempt == 19:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
            continue
        if response.status_code not in (429, 503):
            return response
        await asyncio.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0))
    return response


async def run_fan(
    i: int,
    http: FanClient,
    ws_base: str,
    event_id: str,
    progress: Progress,
    join_gate: asyncio.Semaphore,
    ticket_type: str = "ga",
    solver: Solver | None = None,
    arrives_at: float = 0.0,
    seat_levels: Sequence[str] = (),
    keep_route: bool = True,
) -> Outcome:
    """One fan, from joining to paid tickets (or sold out); ``solver`` pays proof-of-work.
    The fan arrives at ``arrives_at`` (``time.monotonic()``; at once when it is past). With
    ``seat_levels``, the fan asks for the best available seats of one of those price levels
    (fan ``i`` the ``i``-th, round robin) instead of ``ticket_type``."""
    out = Outcome(i)
    ip = _ip(i)
    await asyncio.sleep(max(0.0, arrives_at - time.monotonic()))
    async with join_gate:
        out.joined_at = time.monotonic()
        response, took = await _join(http, event_id, ip, solver)
        out.join_ms = took * 1000
    if response.status_code not in (200, 201):
        out.error = f"join {response.status_code}"
        progress.errors += 1
        return out
    body = response.json()
    out.fan_id, token = body["fan_id"], body["visitor_token"]
    progress.joined += 1
    auth = {"Authorization": f"Bearer {token}", "X-Forwarded-For": ip}
    queue_pass = body["queue_pass"] if body["status"] == "admitted" else None
    route: str | None = None
    if body["status"] == "sold_out":
        out.sold_out = True
        progress.sold_out_fans += 1
        return out
    if queue_pass is None:
        progress.waiting += 1
        try:
            queue_pass = await _wait_for_pass(ws_base, event_id, auth)
        except RuntimeError as exc:  # this fan's socket kept failing: its outcome, not a crash
            out.error = str(exc)
            progress.errors += 1
            return out
        finally:
            progress.waiting -= 1
        if queue_pass is not None:
            out.pass_age_s = time.time() - pass_issued_at(queue_pass)
        if queue_pass is not None and keep_route:
            # As the waiting page does once admitted over its socket: one status request,
            # whose answer names the node hosting the event's actor (ADR 0017).
            status = await _request(http, "GET", f"/v1/events/{event_id}/queue/me", headers=auth)
            route = node_cookie(status)
    if queue_pass is None:
        out.sold_out = True
        progress.sold_out_fans += 1
        return out
    out.admitted_after_s = time.monotonic() - out.joined_at
    progress.admitted += 1
    level = seat_levels[i % len(seat_levels)] if seat_levels else None
    return await _buy(
        out, http, event_id, auth, queue_pass, progress, ticket_type, level, route, keep_route
    )


def node_cookie(answer: Answer) -> str | None:
    """The owner-affinity cookie an answer sets (``waitroom_node=node2``), if it sets one:
    a browser sends it back with the event's reservations (its ``Path``), and the load
    balancer sends those to the node it names. (The client keeps no cookie jar: it serves
    every simulated fan.)"""
    raw = answer.headers.get("set-cookie")
    if raw and raw.startswith(f"{NODE_COOKIE}="):
        return str(raw.split(";", 1)[0])
    return None


class _SocketEnded(Exception):
    """A fan's WebSocket closed (or never opened) before the fan's wait was over."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed {code}: {reason}" if code is not None else reason)
        self.code = code
        self.reason = reason


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Wait:
    """What one fan's socket is waiting for: the pass (admitted) or None (sold out).

    The socket is a :class:`stress.wsclient.Fan`: the ``websockets`` library's sans-I/O
    protocol driven from socket callbacks, without a task, a keep-alive timer and a queue per
    connection (the library's asyncio client: a generator process holds thousands of them,
    and its CPU is taken from the server's on this machine). Position updates are skipped
    unread.
    """

    def __init__(self) -> None:
        self.outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        # A socket that closes after its fan stopped waiting on it (a refused handshake, a
        # timeout) ends the outcome with nobody to await it: marked retrieved, so asyncio
        # does not report each such fan as "Future exception was never retrieved".
        self.outcome.add_done_callback(_retrieved)

    def on_open(self, fan: WsFan) -> None:
        pass

    def on_message(self, fan: WsFan, data: bytes, now: float) -> None:
        if self.outcome.done() or data.startswith(_POSITION):
            return
        message = _decode.decode(data)
        if message["type"] == "admitted":
            self.outcome.set_result(message["pass"])
        elif message["type"] == "sold_out":
            self.outcome.set_result(None)

    def on_closed(self, fan: WsFan) -> None:
        if not self.outcome.done():
            # The close frame the server sent, if it sent one (the connection may just drop).
            rcvd = fan.ws.close_rcvd
            ended = _SocketEnded(rcvd.code, rcvd.reason) if rcvd else _SocketEnded(None, "dropped")
            self.outcome.set_exception(ended)


def pass_issued_at(queue_pass: str) -> float:
    """The ``iat`` claim of a queue pass (read, not verified: the server verifies)."""
    payload = queue_pass.split(".")[1]
    claims = msgspec.json.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return float(claims["iat"])


async def _wait_for_pass(ws_base: str, event_id: str, auth: dict[str, str]) -> str | None:
    # The identity in Authorization (a non-browser client; never in the URL), and the fan's
    # own X-Forwarded-For: the server caps sockets per client address.
    url = f"{ws_base}/v1/events/{event_id}/queue/ws"
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    last: BaseException | None = None
    for attempt in range(30):
        wait = _Wait()
        fan: WsFan | None = None
        try:
            _, opened = await asyncio.wait_for(
                loop.create_connection(functools.partial(WsFan, wait, url, auth), host, port),
                30,
            )
            fan = opened
            if not await asyncio.wait_for(opened.handshake, 30):
                raise _SocketEnded(None, f"handshake refused: {opened.ws.handshake_exc!r}")
            return await wait.outcome
        except _SocketEnded as exc:
            if exc.code == 4404:  # not in line: final
                raise RuntimeError(f"the WebSocket said: {exc.reason}") from None
            last = exc
        except (OSError, TimeoutError) as exc:
            last = exc
        finally:
            if fan is not None and not fan.closed:
                fan.close()
        await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
    raise RuntimeError(f"the WebSocket kept failing: {last!r}")


async def _buy(
    out: Outcome,
    http: FanClient,
    event_id: str,
    auth: dict[str, str],
    queue_pass: str,
    progress: Progress,
    ticket_type: str,
    seat_level: str | None = None,
    route: str | None = None,
    keep_route: bool = True,
) -> Outcome:
    """Reserve (again while tickets are held), confirm, follow the payment. ``route``: the
    owner-affinity cookie, sent with the reservations only (as a browser does, by its Path)."""
    headers = {**auth, "X-Queue-Pass": queue_pass}
    quantity = 1 + out.index % 2
    wanted: dict[str, Any] = (
        {"ticket_type": ticket_type, "quantity": quantity}
        if seat_level is None
        else {"best_available": {"level": seat_level, "count": quantity}}
    )
    give_up = time.monotonic() + 180
    while True:
        headers["Idempotency-Key"] = uuid.uuid4().hex
        started = time.perf_counter()
        response = await _request(
            http,
            "POST",
            f"/v1/events/{event_id}/reservations",
            json=wanted,
            headers={**headers, "Cookie": route} if route else headers,
        )
        out.reserve_ms = (time.perf_counter() - started) * 1000
        if keep_route:
            route = node_cookie(response) or route
        held = response.status_code == 409 and response.json()["error"]["code"] == "tickets_held"
        if not held or time.monotonic() > give_up:
            break
        # What is left is held by fans still paying: some may come back. A real fan's page
        # says so and tries again; so does this one (a new request, a new key).
        await asyncio.sleep(float(response.headers.get("Retry-After", "5")))
    if response.status_code == 409 and response.json()["error"]["code"] in (
        "sold_out",
        "not_enough_seats",  # the level's seats are gone (or too few left together)
        "tickets_held",  # still held after three minutes: this fan stops waiting
    ):
        out.sold_out = True
        progress.sold_out_fans += 1
        return out
    if response.status_code != 201:
        out.error = f"reserve {response.status_code}: {response.text[:120]}"
        progress.errors += 1
        return out
    progress.reserved += 1
    hold_id = response.json()["id"]
    headers["Idempotency-Key"] = uuid.uuid4().hex
    started = time.perf_counter()
    response = await _request(
        http,
        "POST",
        f"/v1/reservations/{hold_id}/confirm",
        json={"payment_method": "card"},
        headers=headers,
    )
    out.confirm_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 202:
        out.error = f"confirm {response.status_code}: {response.text[:120]}"
        progress.errors += 1
        return out
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # As the checkout page follows its payment (followPayment in static/checkout.js): a
        # long poll, answered when the payment settles, never more often than every 0.5 s.
        asked = time.monotonic()
        polled = await _request(
            http, "GET", f"/v1/reservations/{hold_id}?wait={PAYMENT_WAIT_S:g}", headers=auth
        )
        progress.payment_polls += 1
        if polled.status_code in (502, 504):
            # A proxy that gave up on a saturated node: the page asks again (isTransient).
            await asyncio.sleep(PAYMENT_POLL_S)
            continue
        if polled.status_code != 200:
            out.error = f"payment poll {polled.status_code}: {polled.text[:120]}"
            progress.errors += 1
            return out
        reservation = polled.json()
        if reservation.get("order_status") == "paid":
            out.tickets = len(reservation["tickets"])
            out.paid_after_s = time.monotonic() - out.joined_at
            progress.paid_fans += 1
            progress.sold(out.tickets, time.monotonic())
            return out
        payment = reservation.get("payment") or {}
        if payment.get("state") == "failed":
            out.error = f"payment failed: {payment.get('last_error')}"
            progress.errors += 1
            return out
        await asyncio.sleep(max(0.0, PAYMENT_POLL_S - (time.monotonic() - asked)))
    out.error = "payment did not finish in 120 s"
    progress.errors += 1
    return out


async def simulate(
    base_url: str,
    event_id: str,
    fans: int,
    *,
    join_concurrency: int = 200,
    http_connections: int = 256,
    ticket_type: str = "ga",
    on_tick: Callable[[Progress], None] | None = None,
    first: int = 0,
    arrival_s: float = 0.0,
    seat_levels: Sequence[str] = (),
    keep_route: bool = True,
) -> tuple[list[Outcome], Progress]:
    """Run ``fans`` simulated fans against the server at ``base_url``; their outcomes.

    ``first`` numbers the first fan (each fan's client address comes from its number), so
    that several processes, each simulating its own share of a crowd, never share one.
    ``arrival_s`` spreads the fans' arrivals evenly over that many seconds (0: all at once,
    as many joining at a time as ``join_concurrency`` lets). ``keep_route`` False: the fans
    ignore the owner-affinity cookie (ADR 0017), so the balancer spreads their reservations.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    progress = Progress(fans)
    ws_base = base_url.replace("http://", "ws://", 1)
    gate = asyncio.Semaphore(join_concurrency)
    # Idle connections are dropped before the server's keep-alive timeout (5 s) closes them,
    # so a request never races a server-side close. The client keeps no cookies: it serves
    # every simulated fan, and a shared jar would hand the first fan's visitor cookie to
    # everyone after it (one fan, not thousands).
    client = FanClient(base_url, max_connections=http_connections, keepalive_expiry=3.0, timeout=60)
    # Fans solve the server's proof-of-work in one worker process: the event loop keeps
    # serving the others' WebSockets meanwhile.
    solver = Solver(processes=1)
    async with client as http:
        ticker: asyncio.Task[None] | None = None
        if on_tick is not None:

            async def tick() -> None:
                while True:
                    on_tick(progress)
                    await asyncio.sleep(0.5)

            ticker = asyncio.create_task(tick())
        started = time.monotonic()
        try:
            outcomes = await asyncio.gather(
                *(
                    run_fan(
                        i,
                        http,
                        ws_base,
                        event_id,
                        progress,
                        gate,
                        ticket_type,
                        solver,
                        arrives_at=started + (i - first) * arrival_s / max(fans, 1),
                        seat_levels=seat_levels,
                        keep_route=keep_route,
                    )
                    for i in range(first, first + fans)
                )
            )
        finally:
            solver.close()
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
                on_tick(progress)  # type: ignore[misc]
    return list(outcomes), progress


def summarize(outcomes: list[Outcome], progress: Progress) -> dict[str, Any]:
    """Latency percentiles and counts of a simulation."""

    def pct(values: list[float], p: float) -> float:
        return round(percentile(values, p), 2)

    joins = [o.join_ms for o in outcomes if o.fan_id]
    admissions = [o.admitted_after_s for o in outcomes if o.admitted_after_s is not None]
    reserves = [o.reserve_ms for o in outcomes if o.reserve_ms is not None]
    confirms = [o.confirm_ms for o in outcomes if o.confirm_ms is not None]
    paid = [o.paid_after_s for o in outcomes if o.paid_after_s is not None]
    rate = progress.selling_rate
    return {
        "fans": progress.fans,
        "joined": progress.joined,
        "admitted": progress.admitted,
        "paid_fans": progress.paid_fans,
        "tickets_bought": sum(o.tickets for o in outcomes),
        "sold_out_fans": progress.sold_out_fans,
        "errors": progress.errors,
        "error_samples": [o.error for o in outcomes if o.error][:5],
        "selling_window_s": round(progress.selling_window_s, 2),
        "tickets_per_s": None if rate is None else round(rate, 1),
        "join_p50_ms": pct(joins, 50),
        "join_p99_ms": pct(joins, 99),
        "admission_p50_s": pct(admissions, 50),
        "admission_p99_s": pct(admissions, 99),
        "reserve_p50_ms": pct(reserves, 50),
        "reserve_p99_ms": pct(reserves, 99),
        "confirm_p50_ms": pct(confirms, 50),
        "confirm_p99_ms": pct(confirms, 99),
        "paid_p50_s": pct(paid, 50),
        "paid_p99_s": pct(paid, 99),
    }


async def _verify(event_id: str) -> dict[str, int]:
    """The finished sale checked from PostgreSQL and Redis (settings from the environment)."""
    import asyncpg

    from stress.flash_sale import check
    from waitroom.core.keys import Keys
    from waitroom.core.redis import redis_from_url
    from waitroom.core.settings import load_settings

    settings = load_settings()
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=2
    )
    redis = redis_from_url(settings.redis_url)
    try:
        for _ in range(60):  # the last payments may still be settling
            row = await pool.fetchrow(
                "SELECT sum(held) AS held FROM ticket_types WHERE event_id = $1", event_id
            )
            if row is None or not row["held"]:
                break
            await asyncio.sleep(0.5)
        return await check(pool, redis, Keys(settings.redis_prefix), event_id)
    finally:
        await redis.aclose()
        await pool.close()


def main() -> None:
    """``python -m stress.simulation``: drive a running server and show live progress."""
    parser = argparse.ArgumentParser(prog="python -m stress.simulation")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--event", required=True)
    parser.add_argument("--fans", type=int, default=3000)
    parser.add_argument("--ticket-type", default="ga")
    parser.add_argument(
        "--seat-level",
        action="append",
        default=[],
        help="a seated event: fans ask for the best available seats of this price level"
        " (repeat for several; fans take turns) instead of --ticket-type",
    )
    parser.add_argument(
        "--verify", action="store_true", help="check the sale in PostgreSQL and Redis afterwards"
    )
    parser.add_argument(
        "--log-every",
        type=float,
        default=LOG_EVERY_S,
        help="seconds between progress lines when stdout is not a terminal",
    )
    args = parser.parse_args()
    live = sys.stdout.isatty()
    logged = time.monotonic()

    def show(progress: Progress) -> None:
        nonlocal logged
        if live:
            sys.stdout.write("\r" + progress.line())
            sys.stdout.flush()
        elif time.monotonic() - logged >= args.log_every:
            # Not a terminal: no line redrawn in place, but a line every few seconds, so a
            # log shows the sale is moving rather than a minute of silence.
            logged = time.monotonic()
            print(progress.line(), flush=True)

    outcomes, progress = asyncio.run(
        simulate(
            args.base_url,
            args.event,
            args.fans,
            ticket_type=args.ticket_type,
            on_tick=show,
            seat_levels=args.seat_level,
        )
    )
    print(("\n" if live else "") + progress.line())
    s = summarize(outcomes, progress)
    print(
        f"fans {s['fans']}: {s['paid_fans']} bought {s['tickets_bought']} tickets,"
        f" {s['sold_out_fans']} were told it sold out, {s['errors']} errors"
    )
    if s["tickets_per_s"] is not None:
        print(
            f"selling window: {s['tickets_bought']} tickets in {s['selling_window_s']:.1f} s"
            f" from the first sale to the last ({s['tickets_per_s']}/s)"
        )
    print(
        f"latency p50/p99: join {s['join_p50_ms']}/{s['join_p99_ms']} ms,"
        f" admission {s['admission_p50_s']}/{s['admission_p99_s']} s,"
        f" reserve {s['reserve_p50_ms']}/{s['reserve_p99_ms']} ms,"
        f" confirm {s['confirm_p50_ms']}/{s['confirm_p99_ms']} ms,"
        f" paid after {s['paid_p50_s']}/{s['paid_p99_s']} s"
    )
    if args.verify:
        c = asyncio.run(_verify(args.event))
        print(
            f"checked in PostgreSQL: sold {c['sold']} of {c['quantity']},"
            f" oversold {c['oversold']}, fans over the limit {c['fans_over_limit']},"
            f" tickets issued {c['tickets_issued']} (duplicate codes {c['duplicate_codes']})"
        )
        verdict = (
            "yes" if c["order_violations"] == 0 else f"NO ({c['order_violations']} violations)"
        )
        print(f"admitted in join order: {verdict} ({c['admitted_in_order']} fans)")
        if c["oversold"] or c["order_violations"] or c["fans_over_limit"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
