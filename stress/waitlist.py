"""``python -m stress waitlist``: a sold-out sale's waitlist, resold in line order.

The whole system runs as real processes (:mod:`stress.stack`: server, workers, mock payment
provider) for one event of ``--tickets`` tickets (one per fan) whose room keeps its line as a
waitlist once sold out (``waitlist`` on, :mod:`admission.waitlist`):

1. ``--tickets`` buyers join, are admitted, and each reserves one ticket; most pay, but
   ``--returned-pct`` of the tickets are held by buyers who will give them back: a third of
   those let their holds expire (``--hold-ttl``), a third pay and then ask for a refund (the
   event's policy: 100% back, no approval), the rest cancel their holds. Every ticket is
   then taken: the sale is sold out and the room starts waitlisting;
2. ``--fans`` more fans join (the waitlist) and wait on their WebSockets, each told it is on
   the waitlist;
3. the returning buyers cancel or ask for their refunds, and the other holds expire: those
   tickets come back (a refund's once the provider paid the money back and the refund worker
   returned the stock through the event's actor). The
   waiting fans who get an admission (a pass) over their WebSocket reserve a ticket and pay.

Checked afterwards, from PostgreSQL and Redis: ``resold`` (tickets held or paid by waitlisted
fans), ``oversold`` (held + sold above the quantity; 0), ``order_violations`` (admissions out
of join order, and waitlisted fans admitted while a fan ahead of them was not; 0), and
``seconds_to_resell_*``: the k-th ticket to come back paired with the k-th reservation by a
waitlisted fan, from the moment it came back (a cancellation's acknowledgement, a hold's
deadline, a refund's stock return committed) to the moment that reservation was acknowledged,
WebSocket push included. ``returned_by`` says how many came back each way.
The run is bounded (``--timeout``), talks to 127.0.0.1 only, and stops its processes itself.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import websockets
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from inventory import catalogue, refunds
from inventory.refund_policy import RefundPolicy, Tier
from stress.common import fresh_database, fresh_prefix, percentile
from stress.fanclient import FanClient
from stress.simulation import _ip, _join, _request, _wait_for_pass
from stress.stack import running_stack
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import load_settings

_decode = msgspec.json.Decoder()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fans", type=int, default=5_000, help="fans on the waitlist")
    parser.add_argument("--tickets", type=int, default=1_000)
    parser.add_argument(
        "--returned-pct", type=float, default=10.0, help="share of the tickets that come back"
    )
    parser.add_argument("--rate", type=float, default=500.0, help="admissions per second")
    parser.add_argument(
        "--hold-ttl", type=int, default=30, help="hold lifetime, seconds (>= 10): when holds expire"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this long")
    parser.add_argument("--server-workers", type=int, default=1)


@dataclass
class Buyer:
    """A fan of the sell-out: reserves one ticket and pays, cancels, or lets it expire."""

    index: int
    role: str  # "pay" | "cancel" | "expire" | "refund"
    order_id: str = ""
    fan_id: str = ""
    auth: dict[str, str] = field(default_factory=dict)
    queue_pass: str = ""
    hold_id: str = ""
    error: str | None = None


@dataclass
class Waiter:
    """A fan on the waitlist."""

    index: int
    fan_id: str = ""
    told_waitlist: bool = False
    admitted_at: float | None = None
    #: time.time() when its reservation was acknowledged: a ticket resold.
    resold_at: float | None = None
    refused: str | None = None
    error: str | None = None


async def create_sale(pool: asyncpg.Pool[Any], args: argparse.Namespace) -> str:
    """One ticket type of ``--tickets``, one ticket per fan, the waitlist on, and refunds of
    100% with no approval (the event is two months away)."""
    spec = catalogue.EventCreate(
        name="Waitlist sale",
        venue="Loopback Arena",
        starts_at=datetime.now(UTC) + timedelta(days=60),
        ticket_types=[catalogue.TicketTypeSpec("ga", args.tickets, 4500, "EUR", 1)],
        room=catalogue.RoomSpec(
            rate_per_second=args.rate,
            max_active=args.tickets + args.fans,
            pass_ttl_s=600,
            hold_ttl_s=args.hold_ttl,
            per_fan_limit=1,
            waitlist=True,
        ),
    )
    event = await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
    async with pool.acquire() as conn:
        policy = RefundPolicy(tiers=[Tier(until_days_before=0, percent=100)])
        await refunds.set_policy(conn, event.id, policy, actor="stress")
    return event.id


async def _buy(http: FanClient, ws_base: str, event_id: str, buyer: Buyer) -> None:
    """Join, wait for the pass, reserve one ticket; pay unless the ticket is to come back."""
    ip = _ip(buyer.index)
    response, _ = await _join(http, event_id, ip, None)
    if response.status_code not in (200, 201):
        buyer.error = f"join {response.status_code}"
        return
    body = response.json()
    buyer.fan_id = body["fan_id"]
    buyer.auth = {"Authorization": f"Bearer {body['visitor_token']}", "X-Forwarded-For": ip}
    queue_pass = body["queue_pass"] or await _wait_for_pass(ws_base, event_id, buyer.auth)
    if queue_pass is None:
        buyer.error = "sold out before the sell-out"
        return
    buyer.queue_pass = queue_pass
    headers = {**buyer.auth, "X-Queue-Pass": queue_pass, "Idempotency-Key": uuid.uuid4().hex}
    reserved = await _request(
        http,
        "POST",
        f"/v1/events/{event_id}/reservations",
        json={"ticket_type": "ga", "quantity": 1},
        headers=headers,
    )
    if reserved.status_code != 201:
        buyer.error = f"reserve {reserved.status_code}: {reserved.text[:120]}"
        return
    buyer.hold_id = reserved.json()["id"]
    if buyer.role in ("pay", "refund"):
        headers["Idempotency-Key"] = uuid.uuid4().hex
        confirmed = await _request(
            http,
            "POST",
            f"/v1/reservations/{buyer.hold_id}/confirm",
            json={"payment_method": "card"},
            headers=headers,
        )
        if confirmed.status_code != 202:
            buyer.error = f"confirm {confirmed.status_code}: {confirmed.text[:120]}"


async def _paid(http: FanClient, buyer: Buyer, timeout: float) -> None:
    """Wait until the buyer's order is paid (the payment worker's charge), keeping its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await _request(
            http, "GET", f"/v1/reservations/{buyer.hold_id}", headers=buyer.auth
        )
        body = response.json() if response.status_code == 200 else {}
        if body.get("order_status") == "paid" and body.get("order_id"):
            buyer.order_id = body["order_id"]
            return
        await asyncio.sleep(0.25)
    buyer.error = f"order of hold {buyer.hold_id} not paid after {timeout} s"


async def _refund(http: FanClient, buyer: Buyer) -> None:
    """Ask for the buyer's whole order back (the worker returns the stock later)."""
    headers = {**buyer.auth, "Idempotency-Key": uuid.uuid4().hex}
    response = await _request(http, "POST", f"/v1/orders/{buyer.order_id}/refunds", headers=headers)
    if response.status_code != 202:
        buyer.error = f"refund {response.status_code}: {response.text[:120]}"


async def _cancel(http: FanClient, buyer: Buyer) -> float | None:
    """Cancel the buyer's hold; when the cancellation was acknowledged (unix time)."""
    headers = {**buyer.auth, "X-Queue-Pass": buyer.queue_pass, "Idempotency-Key": uuid.uuid4().hex}
    response = await _request(http, "DELETE", f"/v1/reservations/{buyer.hold_id}", headers=headers)
    if response.status_code != 200:
        buyer.error = f"cancel {response.status_code}: {response.text[:120]}"
        return None
    return time.time()


async def _wait(
    http: FanClient,
    ws_base: str,
    event_id: str,
    waiter: Waiter,
    handshakes: asyncio.Semaphore,
    joins: asyncio.Semaphore,
) -> None:
    """Join the waitlist, wait on the WebSocket for a pass, then reserve one ticket and pay."""
    ip = _ip(waiter.index)
    async with joins:
        response, _ = await _join(http, event_id, ip, None)
    if response.status_code not in (200, 201):
        waiter.error = f"join {response.status_code}"
        return
    body = response.json()
    waiter.fan_id = body["fan_id"]
    waiter.told_waitlist = body["status"] == "waitlist"
    auth = {"Authorization": f"Bearer {body['visitor_token']}", "X-Forwarded-For": ip}
    url = f"{ws_base}/v1/events/{event_id}/queue/ws"
    queue_pass: str | None = None
    for attempt in range(10):
        try:
            async with handshakes:
                ws = await connect(
                    url,
                    additional_headers=auth,
                    open_timeout=30,
                    ping_interval=None,
                    compression=None,
                )
            try:
                async for raw in ws:
                    message = _decode.decode(raw)
                    if message["type"] == "waitlist":
                        waiter.told_waitlist = True
                    elif message["type"] == "admitted":
                        queue_pass = message["pass"]
                        break
                    elif message["type"] == "sold_out":
                        waiter.refused = "sold_out"
                        return
            finally:
                await ws.close()
            if queue_pass is not None:
                break
        except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
            waiter.error = repr(exc)
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
    if queue_pass is None:
        return
    waiter.error = None
    waiter.admitted_at = time.time()
    headers = {**auth, "X-Queue-Pass": queue_pass, "Idempotency-Key": uuid.uuid4().hex}
    reserved = await _request(
        http,
        "POST",
        f"/v1/events/{event_id}/reservations",
        json={"ticket_type": "ga", "quantity": 1},
        headers=headers,
    )
    if reserved.status_code != 201:
        # Offered a ticket that was not there: an over-offer (counted, and fails the run).
        waiter.refused = f"reserve {reserved.status_code}: {reserved.json()['error']['code']}"
        return
    waiter.resold_at = time.time()
    headers["Idempotency-Key"] = uuid.uuid4().hex
    await _request(
        http,
        "POST",
        f"/v1/reservations/{reserved.json()['id']}/confirm",
        json={"payment_method": "card"},
        headers=headers,
    )


async def _meta(redis: Redis, keys: Keys, event_id: str, name: str) -> str | None:
    value: Any = await redis.hget(keys.event(event_id).meta, name)
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


async def _until(check: Any, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(every)
    return False


async def check(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    event_id: str,
    waiters: list[Waiter],
) -> dict[str, Any]:
    """Invariants of the finished run, from PostgreSQL and Redis."""
    row = await pool.fetchrow(
        "SELECT quantity, held, sold FROM ticket_types WHERE event_id = $1", event_id
    )
    assert row is not None
    waiting_ids = [w.fan_id for w in waiters if w.fan_id]
    resold = await pool.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM holds WHERE event_id = $1"
        " AND status IN ('held', 'paid') AND fan_id = ANY($2::text[])",
        event_id,
        waiting_ids,
    )
    returned = await pool.fetch(
        "SELECT status, count(*) AS n FROM holds WHERE event_id = $1"
        " AND status IN ('expired', 'cancelled') AND NOT fan_id = ANY($2::text[])"
        " GROUP BY status",
        event_id,
        waiting_ids,
    )
    restocked = await pool.fetch(
        "SELECT quantity, created_at FROM stock_returns WHERE event_id = $1", event_id
    )
    refunded_at = [r["created_at"].timestamp() for r in restocked for _ in range(r["quantity"])]
    expired_at = [
        r["expires_at"].timestamp()
        for r in await pool.fetch(
            "SELECT expires_at FROM holds WHERE event_id = $1 AND status = 'expired'"
            " AND NOT fan_id = ANY($2::text[])",
            event_id,
            waiting_ids,
        )
    ]
    ek = keys.event(event_id)
    raw_order: list[Any] = await redis.lrange(ek.order, 0, -1)
    order = [f.decode() for f in raw_order]
    seqs: list[Any] = await redis.hmget(ek.fans, order) if order else []
    joined = [int(s) for s in seqs if s is not None]
    out_of_order = sum(1 for a, b in itertools.pairwise(joined) if b <= a)
    # Strictly in line order: the waitlisted fans admitted are exactly the first ones in line.
    places: list[Any] = await redis.hmget(ek.fans, waiting_ids) if waiting_ids else []
    by_place = sorted(
        (int(p.split()[0]), fan) for p, fan in zip(places, waiting_ids, strict=True) if p
    )
    admitted = {w.fan_id for w in waiters if w.admitted_at is not None}
    first = {fan for _, fan in by_place[: len(admitted)]}
    skipped = len(admitted - first)
    return {
        "quantity": row["quantity"],
        "held": row["held"],
        "sold": row["sold"],
        "oversold": max(0, row["held"] + row["sold"] - row["quantity"]),
        "resold": int(resold),
        "returned": {
            **{r["status"]: r["n"] for r in returned},
            "refunded": len(refunded_at),
        },
        "expired_at": expired_at,
        "refunded_at": refunded_at,
        "order_violations": out_of_order + (len(order) - len(joined)) + skipped,
        "skipped_in_line": skipped,
    }


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"waitlist: {message}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.hold_ttl < 10:
        raise SystemExit("--hold-ttl must be at least 10 (the shortest hold an event allows)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # one socket per waiting fan
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    base = load_settings()
    returning = max(3, round(float(args.tickets) * float(args.returned_pct) / 100))
    expiring = returning // 3
    refunding = returning // 3
    cancelling = returning - expiring - refunding
    started = time.monotonic()
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        run_dir = Path(tempfile.mkdtemp(prefix="waitroom-waitlist-"))
        settings = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=str(run_dir),
            admission_loop=True,
            log_level="warning",
            trusted_proxies=("127.0.0.1/32",),  # each simulated fan has its own address
            challenge=False,
        )
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        redis = redis_from_url(settings.redis_url)
        keys = Keys(prefix)
        tasks: list[asyncio.Task[None]] = []
        try:
            event_id = await create_sale(pool, args)
            async with (
                running_stack(settings, run_dir, workers=args.server_workers) as stack,
                FanClient(stack.base_url, max_connections=64) as http,
            ):
                ws_base = stack.base_url.replace("http://", "ws://", 1)
                roles = ["expire"] * expiring + ["cancel"] * cancelling
                roles += ["refund"] * refunding
                roles += ["pay"] * (args.tickets - returning)
                buyers = [Buyer(i, role) for i, role in enumerate(roles)]
                gate = asyncio.Semaphore(64)

                async def buy(buyer: Buyer) -> None:
                    async with gate:
                        await _buy(http, ws_base, event_id, buyer)

                await asyncio.wait_for(
                    asyncio.gather(*(buy(b) for b in buyers)), timeout=args.timeout
                )
                failed = [b.error for b in buyers if b.error]
                if failed:
                    raise RuntimeError(f"{len(failed)} buyers failed, e.g. {failed[0]}")

                async def waitlisting() -> bool:
                    return await _meta(redis, keys, event_id, "waitlisting") == "1"

                if not await _until(waitlisting, 30):
                    raise RuntimeError("the sale never sold out into its waitlist")
                sold_out_at = time.monotonic()
                _say(args, f"sold out after {sold_out_at - started:.1f} s; the waitlist joins")

                waiters = [Waiter(args.tickets + i) for i in range(args.fans)]
                handshakes, joins = asyncio.Semaphore(128), asyncio.Semaphore(64)
                for waiter in waiters:
                    # Created in line order; joins in flight at once may still land in
                    # any order: the line order checked is the server's (join numbers).
                    tasks.append(
                        asyncio.create_task(
                            _wait(http, ws_base, event_id, waiter, handshakes, joins)
                        )
                    )

                async def all_told() -> bool:
                    return all(w.told_waitlist or w.error for w in waiters)

                await _until(all_told, args.timeout)
                told = sum(1 for w in waiters if w.told_waitlist)
                refunders = [b for b in buyers if b.role == "refund"]
                await asyncio.gather(*(_paid(http, b, args.timeout / 4) for b in refunders))
                _say(args, f"{told} fans on the waitlist; {returning} tickets come back")
                cancels = asyncio.gather(*(_cancel(http, b) for b in buyers if b.role == "cancel"))
                await asyncio.gather(*(_refund(http, b) for b in refunders))
                cancel_times = [t for t in await cancels if t is not None]
                failed = [b.error for b in buyers if b.error]
                if failed:
                    raise RuntimeError(f"{len(failed)} returns failed, e.g. {failed[0]}")

                async def resold_all() -> bool:
                    settled = sum(1 for w in waiters if w.resold_at or w.refused)
                    return settled >= returning

                deadline = max(0.0, args.timeout - (time.monotonic() - started))
                await _until(resold_all, min(deadline, args.hold_ttl + 60.0))
                await asyncio.sleep(1.0)  # nobody further is admitted: checked below
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                checks = await check(pool, redis, keys, event_id, waiters)
        finally:
            for task in tasks:
                task.cancel()
            await redis.aclose()
            await pool.close()
    returns = sorted([*cancel_times, *checks.pop("expired_at"), *checks.pop("refunded_at")])
    resales = sorted(w.resold_at for w in waiters if w.resold_at is not None)
    delays = [max(0.0, sold - back) for back, sold in zip(returns, resales, strict=False)]
    refused = [w.refused for w in waiters if w.refused]
    returned_total = sum(checks["returned"].values())
    admitted = sum(1 for w in waiters if w.admitted_at is not None)
    # One ticket per fan: exactly one admission per ticket that came back, each one resold.
    ok = (
        checks["oversold"] == 0
        and checks["order_violations"] == 0
        and not refused
        and checks["resold"] == returned_total
        and admitted == returned_total
    )
    return {
        "ok": ok,
        "fans": args.fans,
        "tickets": args.tickets,
        "returned": returned_total,
        "returned_by": checks["returned"],
        "resold": checks["resold"],
        "oversold": checks["oversold"],
        "order_violations": checks["order_violations"],
        "admitted_from_waitlist": admitted,
        "offers_refused": len(refused),
        "told_waitlist": told,
        "seconds_to_resell_p50": round(percentile(delays, 50), 3),
        "seconds_to_resell_p99": round(percentile(delays, 99), 3),
        "seconds_to_resell_max": round(max(delays, default=0.0), 3),
        "duration_s": round(time.monotonic() - started, 1),
        "checks": checks,
        "params": {
            "returned_pct": args.returned_pct,
            "rate_per_second": args.rate,
            "hold_ttl_s": args.hold_ttl,
            "per_fan_limit": 1,
            "server_workers": args.server_workers,
        },
    }
