"""``python -m stress reserve``: holds committed per second by one event's inventory actor,
against two classic designs measured in the same run on the same database:

- **row lock**: one transaction per reservation, ``SELECT ... FOR UPDATE`` on the ticket type,
  then INSERT the hold (the same triggers keep ``held`` in step), many concurrent clients;
- **optimistic**: read the ticket type and its row version (PostgreSQL's ``xmin``) without a
  lock, then claim that version with a guarded UPDATE and INSERT the hold, retrying from the
  read when someone else got there first.

Every side writes the same ``holds`` rows through the same constraints and triggers, with
durable commits. Each side runs for ``--seconds``; afterwards PostgreSQL is checked for
oversold tickets (the run fails if any side oversold) and every acknowledged hold is looked
up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import REGISTRY

from inventory import catalogue, store
from inventory.actor import InventoryActor
from inventory.ledger import Reserve, Reserved
from stress.common import fresh_database, percentile
from waitroom.settings import load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each side")
    parser.add_argument("--askers", type=int, default=2048, help="concurrent askers of the actor")
    parser.add_argument("--clients", type=int, default=50, help="connections of the baselines")
    parser.add_argument("--stock", type=int, default=5_000_000, help="tickets per event")


async def _event(pool: asyncpg.Pool[Any], stock: int, name: str) -> str:
    event_id = f"{name}-{secrets.token_hex(3)}"
    spec = catalogue.EventCreate(
        id=event_id,
        name=f"reserve benchmark ({name})",
        ticket_types=[catalogue.TicketTypeSpec("ga", stock, 5000, "EUR", 1)],
        room=catalogue.RoomSpec(per_fan_limit=1),
    )
    await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
    return event_id


def _batch_totals() -> tuple[float, float]:
    total = REGISTRY.get_sample_value("waitroom_inventory_batch_size_sum") or 0.0
    count = REGISTRY.get_sample_value("waitroom_inventory_batch_size_count") or 0.0
    return total, count


async def run_actor(
    pool: asyncpg.Pool[Any], event_id: str, seconds: float, askers: int
) -> dict[str, Any]:
    epoch = await store.take_ownership(pool, event_id, "stress")
    actor = await InventoryActor.load(event_id, pool, epoch)
    task = asyncio.create_task(actor.run())
    latencies: list[float] = []
    acked: list[str] = []
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def asker() -> None:
        while time.perf_counter() < stop_at:
            i = next(counter)
            started = time.perf_counter()
            result = await actor.ask(Reserve(f"fan{i}", "ga", 1, f"key{i}", "pass"), timeout=30)
            latencies.append(time.perf_counter() - started)
            if isinstance(result, Reserved):
                acked.append(result.hold.id)

    sum0, count0 = _batch_totals()
    started = time.perf_counter()
    await asyncio.gather(*(asker() for _ in range(askers)))
    elapsed = time.perf_counter() - started
    sum1, count1 = _batch_totals()
    actor.close()
    await task
    batches = count1 - count0
    return {
        "holds": len(acked),
        "holds_per_s": round(len(acked) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "batches": int(batches),
        "mean_batch": round((sum1 - sum0) / batches, 1) if batches else 0,
        "acked_ids": acked,
    }


async def _baseline(
    pool: asyncpg.Pool[Any], event_id: str, seconds: float, clients: int, optimistic: bool
) -> dict[str, Any]:
    latencies: list[float] = []
    acked: list[str] = []
    retries = 0
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))
    expires = datetime.now(UTC) + timedelta(hours=1)

    async def reserve_locked(conn: Any, fan: str) -> str | None:
        async with conn.transaction():
            row = await conn.fetchrow(
                "SELECT quantity - held - sold AS left FROM ticket_types"
                " WHERE event_id = $1 AND name = 'ga' FOR UPDATE",
                event_id,
            )
            if row["left"] < 1:
                return None
            hold_id = _uuid()
            await conn.execute(
                "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, expires_at)"
                " VALUES ($1, $2, 'ga', $3, 1, 'held', $4)",
                hold_id,
                event_id,
                fan,
                expires,
            )
            return hold_id

    async def reserve_optimistic(conn: Any, fan: str) -> str | None:
        nonlocal retries
        while True:
            row = await conn.fetchrow(
                "SELECT quantity - held - sold AS left, xmin::text AS version FROM ticket_types"
                " WHERE event_id = $1 AND name = 'ga'",
                event_id,
            )
            if row["left"] < 1:
                return None
            async with conn.transaction():
                claimed = await conn.fetchval(
                    "UPDATE ticket_types SET held = held WHERE event_id = $1 AND name = 'ga'"
                    " AND xmin::text = $2 RETURNING 1",
                    event_id,
                    row["version"],
                )
                if claimed:
                    hold_id = _uuid()
                    await conn.execute(
                        "INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status,"
                        " expires_at) VALUES ($1, $2, 'ga', $3, 1, 'held', $4)",
                        hold_id,
                        event_id,
                        fan,
                        expires,
                    )
                    return hold_id
            retries += 1

    reserve = reserve_optimistic if optimistic else reserve_locked

    async def client() -> None:
        async with pool.acquire() as conn:
            while time.perf_counter() < stop_at:
                fan = f"fan{next(counter)}"
                started = time.perf_counter()
                hold_id = await reserve(conn, fan)
                latencies.append(time.perf_counter() - started)
                if hold_id is not None:
                    acked.append(hold_id)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    out: dict[str, Any] = {
        "holds": len(acked),
        "holds_per_s": round(len(acked) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "acked_ids": acked,
    }
    if optimistic:
        out["retries"] = retries
    return out


def _uuid() -> str:
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


async def _check(pool: asyncpg.Pool[Any], event_id: str, acked: list[str]) -> dict[str, int]:
    row = await pool.fetchrow(
        "SELECT quantity, held, sold, (SELECT count(*) FROM holds WHERE event_id = $1) AS rows"
        " FROM ticket_types WHERE event_id = $1",
        event_id,
    )
    assert row is not None
    found = await pool.fetchval("SELECT count(*) FROM holds WHERE id = ANY($1::uuid[])", acked)
    return {
        "oversold": max(0, row["held"] + row["sold"] - row["quantity"]),
        "acked_missing": len(acked) - found,
        "rows": row["rows"],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    async with fresh_database(settings) as dsn:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
            dsn, min_size=2, max_size=max(4, args.clients + 2)
        )
        try:
            sides: dict[str, dict[str, Any]] = {}
            events: dict[str, str] = {}
            for name in ("rowlock", "optimistic", "actor"):
                events[name] = await _event(pool, args.stock, name)
            sides["rowlock"] = await _baseline(
                pool, events["rowlock"], args.seconds, args.clients, optimistic=False
            )
            sides["optimistic"] = await _baseline(
                pool, events["optimistic"], args.seconds, args.clients, optimistic=True
            )
            sides["actor"] = await run_actor(pool, events["actor"], args.seconds, args.askers)
            for name, side in sides.items():
                side.update(await _check(pool, events[name], side.pop("acked_ids")))
        finally:
            await pool.close()
    actor, rowlock, optimistic = sides["actor"], sides["rowlock"], sides["optimistic"]
    ok = all(s["oversold"] == 0 and s["acked_missing"] == 0 for s in sides.values())
    return {
        "ok": ok,
        "actor_holds_per_s": actor["holds_per_s"],
        "rowlock_holds_per_s": rowlock["holds_per_s"],
        "optimistic_holds_per_s": optimistic["holds_per_s"],
        "ratio_vs_rowlock": round(actor["holds_per_s"] / max(rowlock["holds_per_s"], 1e-9), 1),
        "ratio_vs_optimistic": round(
            actor["holds_per_s"] / max(optimistic["holds_per_s"], 1e-9), 1
        ),
        "actor_p50_ms": actor["p50_ms"],
        "actor_p99_ms": actor["p99_ms"],
        "rowlock_p50_ms": rowlock["p50_ms"],
        "rowlock_p99_ms": rowlock["p99_ms"],
        "optimistic_p50_ms": optimistic["p50_ms"],
        "optimistic_p99_ms": optimistic["p99_ms"],
        "actor_mean_batch": actor["mean_batch"],
        "actor_batches": actor["batches"],
        "optimistic_retries": optimistic.get("retries", 0),
        "oversold": actor["oversold"],
        "oversold_rowlock": rowlock["oversold"],
        "oversold_optimistic": optimistic["oversold"],
        "acked_missing": sum(s["acked_missing"] for s in sides.values()),
        "params": {
            "seconds": args.seconds,
            "askers": args.askers,
            "clients": args.clients,
            "durable_commits": True,
        },
        "sides": {name: {k: v for k, v in s.items()} for name, s in sides.items()},
    }
