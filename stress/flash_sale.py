"""``python -m stress flash-sale``: a whole flash sale, end to end, checked from PostgreSQL.

10,000 simulated fans (``--fans``) join the line over HTTP, wait on WebSockets, are admitted
with signed passes, reserve and pay through the real server, payment workers and mock
provider, all as separate processes, for 2,000 tickets (``--tickets``). Afterwards PostgreSQL
and Redis are checked: every ticket sold exactly once, none oversold, no fan over the per-fan
limit, and admission order equal to join order. Any violation makes the run fail.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from inventory import catalogue
from stress.common import fresh_database, fresh_prefix
from stress.simulation import Progress, simulate, summarize
from stress.stack import running_stack
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import load_settings

PER_FAN_LIMIT = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fans", type=int, default=10_000)
    parser.add_argument("--tickets", type=int, default=2_000)
    parser.add_argument("--rate", type=float, default=250.0, help="admissions per second")
    parser.add_argument("--max-active", type=int, default=1000)
    parser.add_argument("--server-workers", type=int, default=1)
    parser.add_argument(
        "--challenge", action="store_true", help="joins need a solved proof-of-work challenge"
    )


async def create_sale(pool: asyncpg.Pool[Any], tickets: int, rate: float, max_active: int) -> str:
    """An event with one ticket type of ``tickets`` tickets whose sale opens now."""
    spec = catalogue.EventCreate(
        name="Flash sale",
        venue="Loopback Arena",
        ticket_types=[catalogue.TicketTypeSpec("ga", tickets, 4500, "EUR", PER_FAN_LIMIT)],
        room=catalogue.RoomSpec(
            rate_per_second=rate,
            max_active=max_active,
            pass_ttl_s=600,
            hold_ttl_s=300,
            per_fan_limit=PER_FAN_LIMIT,
        ),
    )
    event = await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
    return event.id


async def check(pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, event_id: str) -> dict[str, int]:
    """Invariants of the finished sale, from PostgreSQL and Redis."""
    # Summed over the event's ticket types (a seated event has one per price level), with
    # each type's own excess: one type oversold is not hidden by another's unsold stock.
    row = await pool.fetchrow(
        "SELECT sum(quantity)::int AS quantity, sum(held)::int AS held, sum(sold)::int AS sold,"
        " sum(greatest(0, held + sold - quantity))::int AS over"
        " FROM ticket_types WHERE event_id = $1",
        event_id,
    )
    assert row is not None and row["quantity"] is not None
    tickets = await pool.fetchval("SELECT count(*) FROM tickets WHERE event_id = $1", event_id)
    duplicate_codes = await pool.fetchval(
        "SELECT count(*) - count(DISTINCT code) FROM tickets WHERE event_id = $1", event_id
    )
    over_limit = await pool.fetchval(
        "SELECT count(*) FROM (SELECT fan_id FROM holds WHERE event_id = $1"
        " AND status IN ('held', 'paid') GROUP BY fan_id HAVING sum(quantity) > $2) f",
        event_id,
        PER_FAN_LIMIT,
    )
    ek = keys.event(event_id)
    raw_order: list[Any] = await redis.lrange(ek.order, 0, -1)
    order = [f.decode() for f in raw_order]
    seqs: list[Any] = await redis.hmget(ek.fans, order) if order else []
    joined = [int(s) for s in seqs if s is not None]
    violations = sum(1 for a, b in itertools.pairwise(joined) if b <= a)
    return {
        "quantity": row["quantity"],
        "sold": row["sold"],
        "held_left": row["held"],
        "tickets_issued": tickets,
        "oversold": max(row["over"], tickets - row["quantity"]),
        "duplicate_codes": duplicate_codes,
        "fans_over_limit": over_limit,
        "admitted_in_order": len(joined),
        "order_violations": violations + (len(order) - len(joined)),
    }


def _show(progress: Progress) -> None:
    print(f"flash-sale: {progress.line()}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_settings()
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        run_dir = Path(tempfile.mkdtemp(prefix="waitroom-flash-"))
        settings = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=str(run_dir),
            admission_loop=True,
            log_level="warning",
            # Simulated fans each send their own X-Forwarded-For from 127.0.0.1: trusted as
            # a reverse proxy there, each fan's address counts for the per-address limits.
            trusted_proxies=("127.0.0.1/32",),
            # The simulated fans solve the proof-of-work when the server asks (--challenge);
            # by default the sale is measured without it: 10,000 native solves would take
            # the CPU the server's figures are about (`python -m stress bots` measures it).
            challenge=args.challenge,
        )
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        redis = redis_from_url(settings.redis_url)
        keys = Keys(prefix)
        try:
            event_id = await create_sale(pool, args.tickets, args.rate, args.max_active)
            async with running_stack(settings, run_dir, workers=args.server_workers) as stack:
                started = time.monotonic()
                show = None if args.json else _show
                outcomes, progress = await simulate(
                    stack.base_url, event_id, args.fans, on_tick=show
                )
                duration = time.monotonic() - started
                # The last payments may still be settling in the workers.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    sold = await pool.fetchval(
                        "SELECT sold FROM ticket_types WHERE event_id = $1", event_id
                    )
                    if sold >= args.tickets:
                        break
                    await asyncio.sleep(0.5)
                checks = await check(pool, redis, keys, event_id)
        finally:
            await redis.aclose()
            await pool.close()
    summary = summarize(outcomes, progress)
    ok = (
        checks["oversold"] == 0
        and checks["order_violations"] == 0
        and checks["fans_over_limit"] == 0
        and checks["duplicate_codes"] == 0
        and checks["sold"] == args.tickets
        and checks["tickets_issued"] == args.tickets
    )
    return {
        "ok": ok,
        "fans": args.fans,
        "tickets": args.tickets,
        "sold": checks["sold"],
        "oversold": checks["oversold"],
        "order_violations": checks["order_violations"],
        "fans_over_limit": checks["fans_over_limit"],
        "duration_s": round(duration, 1),
        "join_p50_ms": summary["join_p50_ms"],
        "join_p99_ms": summary["join_p99_ms"],
        "admission_p50_s": summary["admission_p50_s"],
        "admission_p99_s": summary["admission_p99_s"],
        "reserve_p50_ms": summary["reserve_p50_ms"],
        "reserve_p99_ms": summary["reserve_p99_ms"],
        "confirm_p50_ms": summary["confirm_p50_ms"],
        "confirm_p99_ms": summary["confirm_p99_ms"],
        "paid_p50_s": summary["paid_p50_s"],
        "paid_p99_s": summary["paid_p99_s"],
        "checks": checks,
        "simulation": {k: v for k, v in summary.items() if not k.endswith(("_ms", "_s"))},
        "params": {
            "challenge": args.challenge,
            "rate_per_second": args.rate,
            "max_active": args.max_active,
            "per_fan_limit": PER_FAN_LIMIT,
            "server_workers": args.server_workers,
        },
    }
