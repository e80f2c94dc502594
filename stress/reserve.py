"""``python -m stress reserve``: holds committed per second by one event's inventory actor,
against two classic designs measured in the same run on the same database:

- **row lock**: one transaction per reservation, ``SELECT ... FOR UPDATE`` on the ticket type,
  then INSERT the hold (the same triggers keep ``held`` in step), many concurrent clients;
- **optimistic**: read the ticket type and its row version (PostgreSQL's ``xmin``) without a
  lock, then claim that version with a guarded UPDATE and INSERT the hold, retrying from the
  read when someone else got there first.

Every side writes the same ``holds`` rows through the same constraints and triggers, with
durable commits (``synchronous_commit`` and ``fsync`` are read from the server and reported;
the run fails if either is off). The box is shared and noisy, so the sides are interleaved:
``--rounds`` rounds of row lock, optimistic, actor (every other round in reverse order), each
``--seconds``/rounds long, each after a CHECKPOINT (when the role may run one) so that no
side pays for flushing the pages another dirtied; each side pools its rounds. The actor is one
:class:`~inventory.actor.InventoryActor` started once and fed by ``--askers`` concurrent
tasks in this process, each asking for one new fan's hold with an idempotency key, as
checkout does. Afterwards PostgreSQL is checked: oversold tickets on any side fail the run,
and so does an acknowledged hold that is not in the ``holds`` table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
from prometheus_client import REGISTRY

from inventory import catalogue, store
from inventory.actor import InventoryActor
from inventory.ledger import Reserve, Reserved
from stress.common import fresh_database, percentile
from waitroom.core.settings import load_settings

TARGET_HOLDS_PER_S = 50_000.0
TARGET_RATIO = 50.0
SIDES = ("rowlock", "optimistic", "actor")


class _Round(msgspec.Struct):
    """What one side did in one round."""

    seconds: float
    latencies: list[float]
    acked: list[str]
    retries: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per side")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the sides")
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


def _histogram(name: str) -> tuple[float, float]:
    """(sum, count) of one of the actor's histograms, process-wide."""
    total = REGISTRY.get_sample_value(f"{name}_sum") or 0.0
    count = REGISTRY.get_sample_value(f"{name}_count") or 0.0
    return total, count


async def _actor_round(
    actor: InventoryActor, seconds: float, askers: int, fans: Iterator[int]
) -> _Round:
    latencies: list[float] = []
    acked: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def asker() -> None:
        while time.perf_counter() < stop_at:
            i = next(fans)
            started = time.perf_counter()
            result = await actor.ask(Reserve(f"fan{i}", "ga", 1, f"key{i}", "pass"), timeout=30)
            latencies.append(time.perf_counter() - started)
            if isinstance(result, Reserved):
                acked.append(result.hold.id)

    started = time.perf_counter()
    await asyncio.gather(*(asker() for _ in range(askers)))
    return _Round(time.perf_counter() - started, latencies, acked)


async def _baseline_round(
    pool: asyncpg.Pool[Any],
    event_id: str,
    seconds: float,
    clients: int,
    fans: Iterator[int],
    *,
    optimistic: bool,
) -> _Round:
    latencies: list[float] = []
    acked: list[str] = []
    retries = 0
    stop_at = time.perf_counter() + seconds
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
                fan = f"fan{next(fans)}"
                started = time.perf_counter()
                hold_id = await reserve(conn, fan)
                latencies.append(time.perf_counter() - started)
                if hold_id is not None:
                    acked.append(hold_id)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return _Round(time.perf_counter() - started, latencies, acked, retries)


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


def _side(rounds: list[_Round]) -> dict[str, Any]:
    """One side's figures, its rounds pooled."""
    latencies = [v for r in rounds for v in r.latencies]
    seconds = sum(r.seconds for r in rounds)
    holds = sum(len(r.acked) for r in rounds)
    return {
        "holds": holds,
        "holds_per_s": round(holds / seconds, 1),
        "holds_per_s_by_round": [round(len(r.acked) / r.seconds, 1) for r in rounds],
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "retries": sum(r.retries for r in rounds),
    }


async def _durability(pool: asyncpg.Pool[Any]) -> dict[str, str]:
    return {
        name: str(await pool.fetchval(f"SHOW {name}"))
        for name in ("synchronous_commit", "fsync", "wal_sync_method")
    }


async def _checkpoint(pool: asyncpg.Pool[Any]) -> int:
    """1 after a CHECKPOINT; 0 where the role may not run one (then the rounds go on)."""
    try:
        await pool.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        return 0
    return 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    per_round = args.seconds / args.rounds
    rounds: dict[str, list[_Round]] = {name: [] for name in SIDES}
    fans = {name: itertools.count() for name in SIDES}
    async with fresh_database(settings) as dsn:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
            dsn, min_size=2, max_size=max(4, args.clients + 2)
        )
        try:
            durability = await _durability(pool)
            events = {name: await _event(pool, args.stock, name) for name in SIDES}
            epoch = await store.take_ownership(pool, events["actor"], "stress")
            actor = await InventoryActor.load(events["actor"], pool, epoch)
            actor_task = asyncio.create_task(actor.run())
            batches0, commits0 = (
                _histogram("waitroom_inventory_batch_size"),
                _histogram("waitroom_inventory_commit_seconds"),
            )
            actor_cpu = 0.0
            checkpoints = 0
            for round_ in range(args.rounds):
                order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
                for name in order:
                    # Each side starts from clean buffers, so that it does not pay for
                    # writing out the pages the side before it dirtied.
                    checkpoints += await _checkpoint(pool)
                    if name == "actor":
                        cpu = time.process_time()
                        result = await _actor_round(actor, per_round, args.askers, fans[name])
                        actor_cpu += time.process_time() - cpu
                    else:
                        result = await _baseline_round(
                            pool,
                            events[name],
                            per_round,
                            args.clients,
                            fans[name],
                            optimistic=name == "optimistic",
                        )
                    rounds[name].append(result)
            batches1, commits1 = (
                _histogram("waitroom_inventory_batch_size"),
                _histogram("waitroom_inventory_commit_seconds"),
            )
            actor.close()
            await actor_task
            sides = {name: _side(rounds[name]) for name in SIDES}
            for name in SIDES:
                acked = [hold for r in rounds[name] for hold in r.acked]
                sides[name].update(await _check(pool, events[name], acked))
        finally:
            await pool.close()
    actor_side, rowlock, optimistic = sides["actor"], sides["rowlock"], sides["optimistic"]
    batches = batches1[1] - batches0[1]
    commits = commits1[1] - commits0[1]
    actor_side["batches"] = int(batches)
    actor_side["mean_batch"] = round((batches1[0] - batches0[0]) / batches, 1) if batches else 0
    actor_side["mean_commit_ms"] = (
        round((commits1[0] - commits0[0]) / commits * 1000, 2) if commits else 0
    )
    actor_side["cpu_us_per_hold"] = round(actor_cpu / max(actor_side["holds"], 1) * 1e6, 2)
    durable = durability["synchronous_commit"] != "off" and durability["fsync"] == "on"
    ratio = round(actor_side["holds_per_s"] / max(rowlock["holds_per_s"], 1e-9), 1)
    ok = durable and all(s["oversold"] == 0 and s["acked_missing"] == 0 for s in sides.values())
    return {
        "ok": ok,
        "actor_holds_per_s": actor_side["holds_per_s"],
        "rowlock_holds_per_s": rowlock["holds_per_s"],
        "optimistic_holds_per_s": optimistic["holds_per_s"],
        "ratio_vs_rowlock": ratio,
        "ratio_vs_optimistic": round(
            actor_side["holds_per_s"] / max(optimistic["holds_per_s"], 1e-9), 1
        ),
        "actor_p50_ms": actor_side["p50_ms"],
        "actor_p99_ms": actor_side["p99_ms"],
        "rowlock_p50_ms": rowlock["p50_ms"],
        "rowlock_p99_ms": rowlock["p99_ms"],
        "optimistic_p50_ms": optimistic["p50_ms"],
        "optimistic_p99_ms": optimistic["p99_ms"],
        "actor_mean_batch": actor_side["mean_batch"],
        "actor_batches": actor_side["batches"],
        "actor_mean_commit_ms": actor_side["mean_commit_ms"],
        "optimistic_retries": optimistic["retries"],
        "oversold": actor_side["oversold"],
        "oversold_rowlock": rowlock["oversold"],
        "oversold_optimistic": optimistic["oversold"],
        "acked_missing": sum(s["acked_missing"] for s in sides.values()),
        "targets": {"actor_holds_per_s": TARGET_HOLDS_PER_S, "ratio_vs_rowlock": TARGET_RATIO},
        "met": {
            "actor_holds_per_s": actor_side["holds_per_s"] >= TARGET_HOLDS_PER_S,
            "ratio_vs_rowlock": ratio >= TARGET_RATIO,
        },
        "params": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "askers": args.askers,
            "clients": args.clients,
            "stock": args.stock,
            "durable_commits": durable,
            "checkpoints_between_sides": checkpoints,
            **durability,
        },
        "sides": sides,
    }
