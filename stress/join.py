"""``python -m stress join``: join throughput and latency against a trivial endpoint, and in a
room of 1,000,000 waiting fans.

Against real Redis and PostgreSQL (a fresh database and Redis prefix, removed afterwards),
one server process (:mod:`stress.join_app`: the production app served with the very uvicorn
options of ``waitroom serve``, one worker, plus ``GET /stress/trivial``, routed first), and load from
``--generators`` separate processes (:mod:`stress.loadgen`) holding ``--connections`` (64)
keep-alive connections in all, one request in flight on each. Three sides:

- ``trivial``: ``GET /stress/trivial`` (same middleware as every route, constant body);
- ``join_empty``: joins into a room that starts empty: every request is a NEW fan (no
  identity, so the server issues a visitor token: 201) from its own client address
  (``X-Forwarded-For``, believed because the run trusts 127.0.0.1 as a reverse proxy:
  ``WAITROOM_TRUSTED_PROXIES=127.0.0.1/32``), so the per-IP limit never
  refuses one and every join does its full work: token, limits, place, answer;
- ``join_1m``: the same into a second room, first filled with ``--fans`` (1,000,000) waiting
  fans written straight into Redis in the layout ``join.lua`` writes (sequence numbers,
  ``fans``, ``queue``, ``seen``, ``seq``); a join through the real server then checks that
  it lands behind all of them.

The box is shared and noisy, so the sides are interleaved: ``--rounds`` rounds of
trivial, join_empty, join_1m (every other round in reverse order), each
``--seconds``/rounds long after ``--warmup``; each side pools its rounds. (The "empty" room thus holds the fans of earlier rounds, tens of
thousands at most, against a million.)

Results: ``ratio`` = join_rps / trivial_rps (target >= 0.5), ``p99_ms`` of the empty room
(target <= 50 ms at 64 connections), ``p99_ratio_1m`` = full-room p99 / empty-room p99
(target <= 1.5), and per side where the CPU went (server, Redis, generators, others). The
run fails (``ok`` false) if any join is answered with anything but 201, a connection drops,
the number of places in Redis differs from the 201s counted, or the server does not stop
cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from admission import operators
from inventory import catalogue
from stress.common import free_port, fresh_database, fresh_prefix, percentile
from stress.join_app import TRIVIAL_PATH
from stress.loadgen import LoadResult, run_load
from stress.server import server_process, stopped_cleanly
from waitroom.core.keys import EventKeys, Keys
from waitroom.core.redis import Multiplexer, redis_from_url
from waitroom.core.settings import load_settings

TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
TARGET_P99_RATIO = 1.5
_FILL_BATCH = 10_000
#: Fill batches in flight at once on the pipelined connection.
_FILL_PARALLEL = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per side")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the sides")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured start per phase")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--fans", type=int, default=1_000_000, help="fans in the full room")


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"join: {message}", file=sys.stderr, flush=True)


async def _event(pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, name: str) -> str:
    """A new FIFO event whose admission is paused, so the line only ever grows."""
    spec = catalogue.EventCreate(
        name=f"join benchmark ({name})",
        ticket_types=[catalogue.TicketTypeSpec("ga", 1_000_000, 1000, "EUR")],
    )
    event = await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
    await operators.update_admission(
        pool, redis, keys, event.id, operators.make_patch(paused=True), actor="stress"
    )
    return event.id


async def _join_once(port: int, event_id: str, ip: str) -> tuple[int, dict[str, Any]]:
    """One join through the server on its own connection: status and decoded body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST /v1/events/{event_id}/queue HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-Forwarded-For: {ip}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    body_json: dict[str, Any] = msgspec.json.decode(body) if body else {}
    return int(head[9:12]), body_json


async def _fill(mux: Multiplexer, ek: EventKeys, count: int) -> None:
    """``count`` waiting fans behind the ones already in line, as ``join.lua`` places them.

    A join is: ``INCR seq`` -> s; ``HSET fans fan s``; ``ZADD seen now fan``; ``ZADD queue s
    fan``. Here ``seen`` is set far ahead instead of now, so that no sweep can drop the 1M
    fans mid-run (the room would shrink under the measurement).
    """
    first = int(await mux.execute("GET", ek.seq) or 0) + 1
    never_abandoned = time.time() + 365 * 86400
    semaphore = asyncio.Semaphore(_FILL_PARALLEL)

    async def batch(start: int) -> None:
        stop = min(start + _FILL_BATCH, first + count)
        placed: list[str | int] = []
        seen: list[str | float] = []
        for seq in range(start, stop):
            fan = f"v_{seq:032x}"
            placed += (seq, fan)
            seen += (never_abandoned, fan)
        by_fan = [placed[i ^ 1] for i in range(len(placed))]  # fan, seq, fan, seq...
        async with semaphore:
            await asyncio.gather(
                mux.execute("ZADD", ek.queue, *placed),
                mux.execute("HSET", ek.fans, *by_fan),
                mux.execute("ZADD", ek.seen, *seen),
            )

    await asyncio.gather(*(batch(s) for s in range(first, first + count, _FILL_BATCH)))
    await mux.execute("SET", ek.seq, first + count - 1)


def _side(rounds: list[LoadResult]) -> dict[str, Any]:
    """One side's figures, its rounds pooled."""
    latencies = [v for r in rounds for v in r.latencies]
    statuses: dict[int, int] = {}
    cpu: dict[str, float] = {}
    for r in rounds:
        for code, count in r.statuses.items():
            statuses[code] = statuses.get(code, 0) + count
        for key, value in r.cpu_pct.items():
            cpu[key] = cpu.get(key, 0.0) + value / len(rounds)
    window = sum(r.window_s for r in rounds)
    return {
        "rps": round(sum(r.rps * r.window_s for r in rounds) / window, 1),
        "rps_by_round": [round(r.rps, 1) for r in rounds],
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "p99_ms_by_round": [round(percentile(r.latencies, 99) * 1000, 2) for r in rounds],
        "max_ms": round(max(latencies, default=0.0) * 1000, 2),
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connections_lost": sum(r.connections_lost for r in rounds),
        "cpu_pct": {k: round(v, 1) for k, v in cpu.items()},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_settings()
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        work_dir = Path(tempfile.mkdtemp(prefix="waitroom-stress-join-"))
        settings = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=str(work_dir),
            log_level="warning",
            port=free_port(),
            # The load comes from this machine with a made-up X-Forwarded-For per fan, as a
            # reverse proxy on 127.0.0.1 would send it: trusting that proxy makes each fan's
            # own address count for the per-address limit.
            trusted_proxies=("127.0.0.1/32",),
            # This measures the join itself; the proof-of-work a real fan solves first is
            # measured by `python -m stress bots` (its verification is ~10-20 us of CPU).
            challenge=False,
        )
        keys = Keys(prefix)
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        mux = Multiplexer(settings.redis_url, timeout=30)
        redis = redis_from_url(settings.redis_url)
        sides: dict[str, dict[str, Any]] = {}
        checks: dict[str, Any] = {}
        try:
            empty = await _event(pool, redis, keys, "empty room")
            full = await _event(pool, redis, keys, "full room")
            redis_pid = int((await redis.info("server"))["process_id"])
            argv = [sys.executable, "-m", "stress.join_app"]
            async with server_process(argv, settings, work_dir / "server.log") as proc:
                # The first join of a room loads it into Redis: do that outside the windows.
                for event_id in (empty, full):
                    status, _ = await _join_once(settings.port, event_id, "192.0.2.1")
                    if status != 201:
                        raise RuntimeError(f"the first join of {event_id} answered {status}")
                started = time.monotonic()
                await _fill(mux, keys.event(full), args.fans)
                status, body = await _join_once(settings.port, full, "192.0.2.2")
                checks["fill_s"] = round(time.monotonic() - started, 1)
                checks["probe_position_1m"] = body.get("position")
                _say(args, f"{args.fans} fans in line in {checks['fill_s']} s")
                phases = [
                    ("trivial", "GET", TRIVIAL_PATH),
                    ("join_empty", "POST", f"/v1/events/{empty}/queue"),
                    ("join_1m", "POST", f"/v1/events/{full}/queue"),
                ]
                results: dict[str, list[LoadResult]] = {name: [] for name, _, _ in phases}
                for round_ in range(args.rounds):
                    # ABC CBA...: no side always runs right after the same other one.
                    order = list(enumerate(phases))
                    for index, (name, method, path) in order if round_ % 2 == 0 else order[::-1]:
                        result = await run_load(
                            port=settings.port,
                            method=method,
                            path=path,
                            connections=args.connections,
                            generators=args.generators,
                            seconds=args.seconds / args.rounds,
                            warmup=args.warmup,
                            # A block of 2**20 client addresses per phase of each round.
                            ip_offset=(round_ * len(phases) + index) << 20,
                            work_dir=work_dir,
                            watch={"server": [proc.pid], "redis": [redis_pid]},
                        )
                        results[name].append(result)
                        _say(
                            args,
                            f"round {round_ + 1} {name}: {result.rps:.0f} req/s,"
                            f" p99 {percentile(result.latencies, 99) * 1000:.1f} ms",
                        )
                for name, _, _ in phases:
                    side = sides[name] = _side(results[name])
                    _say(
                        args,
                        f"{name}: {side['rps']:.0f} req/s, p50 {side['p50_ms']} ms,"
                        f" p99 {side['p99_ms']} ms, statuses {side['statuses']}",
                    )
            checks["server_exit_code"] = proc.returncode
            checks["server_stopped_cleanly"] = stopped_cleanly(proc)
            # Every 201 is one new place (plus the probes): nothing lost, nothing doubled.
            for name, event_id, extra in (
                ("join_empty", empty, 1),
                ("join_1m", full, 2 + args.fans),
            ):
                placed = int(await mux.execute("ZCARD", keys.event(event_id).queue))
                expected = sides[name]["statuses"].get("201", 0) + extra
                checks[f"places_{name}"] = placed
                checks[f"places_missing_{name}"] = expected - placed
        finally:
            await mux.aclose()
            await redis.aclose()
            await pool.close()
    trivial, empty_side, full_side = sides["trivial"], sides["join_empty"], sides["join_1m"]
    bad_answers = sum(
        count
        for side in (empty_side, full_side)
        for code, count in side["statuses"].items()
        if code != "201"
    ) + sum(count for code, count in trivial["statuses"].items() if code != "200")
    ok = (
        bad_answers == 0
        and all(s["connections_lost"] == 0 for s in sides.values())
        and checks["places_missing_join_empty"] == 0
        and checks["places_missing_join_1m"] == 0
        and checks["probe_position_1m"] == args.fans + 2
        and checks["server_stopped_cleanly"]
    )
    ratio = empty_side["rps"] / max(trivial["rps"], 1e-9)
    p99_ratio = full_side["p99_ms"] / max(empty_side["p99_ms"], 1e-9)
    return {
        "benchmark": "join",
        "ok": ok,
        "join_rps": empty_side["rps"],
        "trivial_rps": trivial["rps"],
        "ratio": round(ratio, 3),
        "p50_ms": empty_side["p50_ms"],
        "p99_ms": empty_side["p99_ms"],
        "join_rps_1m": full_side["rps"],
        "p50_ms_1m": full_side["p50_ms"],
        "p99_ms_1m": full_side["p99_ms"],
        "p99_ratio_1m": round(p99_ratio, 3),
        "targets": {
            "ratio": TARGET_RATIO,
            "p99_ms": TARGET_P99_MS,
            "p99_ratio_1m": TARGET_P99_RATIO,
        },
        "met": {
            "ratio": ratio >= TARGET_RATIO,
            "p99_ms": empty_side["p99_ms"] <= TARGET_P99_MS,
            "p99_ratio_1m": p99_ratio <= TARGET_P99_RATIO,
        },
        "bad_answers": bad_answers,
        **checks,
        "params": {
            "challenge": False,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "connections": args.connections,
            "generators": args.generators,
            "fans_1m": args.fans,
            "server_workers": 1,
            "new_fan_per_request": True,
        },
        "sides": sides,
    }
