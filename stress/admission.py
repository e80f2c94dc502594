"""``python -m stress admission``: the admission loop's rate, reaction time and cap, and the gate.

Against real Redis and PostgreSQL (a fresh database and Redis prefix, removed afterwards):

1. A line of ``--fans`` (200,000) fans is written straight into Redis (pipelined), for an
   event that starts paused; a real ``waitroom serve`` process runs the admission loop.
2. For each rate of ``--rates`` (10, 100, 1000/s), with ``max_active`` out of the way: set it
   through :func:`admission.operators.update_admission` (what the CLI and the admin API call),
   let it settle, then count admissions over ``--seconds`` (60): the observed rate and its
   error against the configured one (target: within 2%).
3. ``rate_change_latency_s``: from the call that raises the rate 100 -> 1000/s to the moment
   the admitted counter runs ahead of anything the old rate could explain (target <= 1 s).
4. ``max_active_exceeded``: a second event with ``max_active`` 50 at 1000/s, while a client
   completes passes at random (:func:`admission.operators.complete_pass`); every 10 ms the
   passes active are counted: the samples above the cap (target: 0).
5. ``pass_verifications_per_s``: the pass gate (:class:`admission.passes.PassGate`, signature
   and revocation check in Redis) on real passes, from 32 concurrent callers.

The admission order is checked too: the ``order`` list must be the line's order exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
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
from admission.passes import PassGate, PassKeys
from inventory import catalogue
from stress.common import free_port, fresh_database, fresh_prefix
from waitroom.core.keys import EventKeys, Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import Settings, load_settings, settings_env

ROOT = Path(__file__).resolve().parent.parent
TARGET_ERROR_PCT = 2.0
CAP = 50
_FILL_BATCH = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per rate")
    parser.add_argument("--fans", type=int, default=200_000, help="fans waiting in line")
    parser.add_argument("--rates", default="10,100,1000", help="comma-separated rates per second")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds to settle per rate")
    parser.add_argument(
        "--cap-seconds", type=float, default=None, help="max_active run (default min(seconds, 10))"
    )
    parser.add_argument("--verify-seconds", type=float, default=3.0)


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"admission: {message}", file=sys.stderr, flush=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _event(pool: asyncpg.Pool[Any], *, rate: float, max_active: int, ttl: int) -> str:
    spec = catalogue.EventCreate(
        name="admission benchmark",
        ticket_types=[catalogue.TicketTypeSpec("ga", 1_000_000, 1000, "EUR")],
        room=catalogue.RoomSpec(rate_per_second=rate, max_active=max_active, pass_ttl_s=ttl),
    )
    event = await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
    return event.id


async def _fill(redis: Redis, ek: EventKeys, count: int) -> list[str]:
    """``count`` fans in line, in this order, seen far in the future (never abandoned)."""
    fans = [f"v_{i:032x}" for i in range(1, count + 1)]
    never_abandoned = time.time() + 10 * 365 * 86400
    for start in range(0, count, _FILL_BATCH):
        chunk = fans[start : start + _FILL_BATCH]
        pipe = redis.pipeline(transaction=False)
        pipe.zadd(ek.queue, {fan: start + i + 1 for i, fan in enumerate(chunk)})
        pipe.hset(ek.fans, mapping={fan: start + i + 1 for i, fan in enumerate(chunk)})
        pipe.zadd(ek.seen, dict.fromkeys(chunk, never_abandoned))
        await pipe.execute()
    await redis.set(ek.seq, count)
    return fans


async def _admitted(redis: Redis, ek: EventKeys) -> tuple[float, int]:
    before = time.monotonic()
    value = await redis.hget(ek.meta, "admitted_total")
    return (before + time.monotonic()) / 2, int(value or 0)


async def _set(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, event_id: str, **fields: Any
) -> None:
    await operators.update_admission(
        pool, redis, keys, event_id, operators.make_patch(**fields), actor="stress"
    )


async def _wait_leader(redis: Redis, ek: EventKeys, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    while not (await redis.exists(ek.leader) and await redis.exists(ek.meta)):
        if proc.returncode is not None:
            raise RuntimeError("the server exited")
        if time.monotonic() > deadline:
            raise RuntimeError("no admission leader within 30 s")
        await asyncio.sleep(0.1)


async def _rate_latency(
    pool: asyncpg.Pool[Any], redis: Redis, keys: Keys, event_id: str, old: float, new: float
) -> float | None:
    """Seconds from the call that changes ``old`` -> ``new`` to the counter showing it."""
    ek = keys.event(event_id)
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append(await _admitted(redis, ek))
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    await asyncio.sleep(0.5)
    t0, c0 = await _admitted(redis, ek)
    await _set(pool, redis, keys, event_id, rate_per_second=new)
    await asyncio.sleep(2.0)
    stop.set()
    await sampler
    # Ahead of the old trend by more than two ticks' worth of it plus 5 fans: the steps of
    # the counter at the old rate never do that; only the new rate does.
    margin = old * 0.1 + 5
    for t, c in samples:
        if t > t0 and c - c0 > old * (t - t0) + margin:
            return round(t - t0, 3)
    return None


async def _cap_run(
    pool: asyncpg.Pool[Any],
    redis: Redis,
    keys: Keys,
    event_id: str,
    seconds: float,
) -> dict[str, Any]:
    """``max_active`` = CAP at 1000/s, completions at random; samples of the active count."""
    ek = keys.event(event_id)
    await _set(pool, redis, keys, event_id, paused=False)
    stop = asyncio.Event()
    completed = 0

    async def completer() -> None:
        nonlocal completed
        while not stop.is_set():
            jtis = await redis.zrandmember(ek.active, 3)
            for jti in jtis or []:
                text = jti.decode() if isinstance(jti, bytes) else str(jti)
                completed += await operators.complete_pass(redis, keys, event_id, text)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(completer())
    samples: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(int(await redis.zcount(ek.active, f"({time.time()!r}", "+inf")))
        await asyncio.sleep(0.01)
    stop.set()
    await task
    await _set(pool, redis, keys, event_id, paused=True)
    _, admitted = await _admitted(redis, ek)
    return {
        "max_active": CAP,
        "max_active_exceeded": sum(1 for s in samples if s > CAP),
        "max_active_samples": len(samples),
        "max_active_peak": max(samples, default=0),
        "max_active_admitted": admitted,
        "max_active_completed": completed,
    }


async def _verifications(
    settings: Settings, redis: Redis, keys: Keys, event_id: str, seconds: float
) -> dict[str, float]:
    ek = keys.event(event_id)
    raw = await redis.hgetall(ek.admitted)
    passes = [(_text(f), _text(p)) for f, p in list(raw.items())[:2000]]
    if not passes:
        return {"pass_verifications_per_s": 0.0, "pass_signature_checks_per_s": 0.0}
    pass_keys = PassKeys.from_settings(settings)
    gate = PassGate(pass_keys, redis, keys, settings.pass_issuer)
    done = 0
    deadline = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            fan, token = random.choice(passes)
            await gate.check(token, event_id=event_id, fan_id=fan, now=time.time())
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(32)))
    gate_rate = done / (time.monotonic() - started)
    checks = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        fan, token = passes[checks % len(passes)]
        pass_keys.verify(
            token, issuer=settings.pass_issuer, event_id=event_id, fan_id=fan, now=time.time()
        )
        checks += 1
    return {
        "pass_verifications_per_s": round(gate_rate, 1),
        "pass_signature_checks_per_s": round(checks / (time.monotonic() - started), 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_settings()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    cap_seconds = args.cap_seconds if args.cap_seconds is not None else min(args.seconds, 10.0)
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        run_dir = tempfile.mkdtemp(prefix="waitroom-stress-")
        settings = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=run_dir,
            admission_loop=True,
            log_level="warning",
            port=free_port(),
        )
        keys = Keys(prefix)
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        redis = redis_from_url(settings.redis_url)
        log = Path(run_dir) / "server.log"
        proc: asyncio.subprocess.Process | None = None
        try:
            big = await _event(pool, rate=rates[0], max_active=10_000_000, ttl=3600)
            capped = await _event(pool, rate=1000, max_active=CAP, ttl=10)
            for event_id in (big, capped):
                await _set(pool, redis, keys, event_id, paused=True)
            fill_started = time.monotonic()
            fans = await _fill(redis, keys.event(big), args.fans)
            await _fill(redis, keys.event(capped), min(args.fans, 100_000))
            _say(args, f"{args.fans} fans in line in {time.monotonic() - fill_started:.1f} s")

            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "waitroom",
                    "serve",
                    env=settings_env(settings),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            ek = keys.event(big)
            await _wait_leader(redis, ek, proc)

            runs: list[dict[str, float]] = []
            latency: float | None = None
            for i, rate in enumerate(rates):
                if i > 0 and rates[i - 1] == 100 and rate == 1000:
                    latency = await _rate_latency(pool, redis, keys, big, 100, 1000)
                    _say(args, f"rate change 100 -> 1000/s showed after {latency} s")
                else:
                    await _set(pool, redis, keys, big, rate_per_second=rate, paused=False)
                await asyncio.sleep(args.warmup)
                t0, c0 = await _admitted(redis, ek)
                await asyncio.sleep(args.seconds)
                t1, c1 = await _admitted(redis, ek)
                observed = (c1 - c0) / (t1 - t0)
                error = (observed - rate) / rate * 100
                runs.append(
                    {
                        "configured_rate": rate,
                        "observed_rate": round(observed, 3),
                        "error_pct": round(error, 3),
                        "admitted": c1 - c0,
                        "seconds": round(t1 - t0, 3),
                    }
                )
                _say(args, f"{rate:g}/s configured: {observed:.2f}/s observed ({error:+.2f}%)")
            await _set(pool, redis, keys, big, paused=True)
            if latency is None:
                await _set(pool, redis, keys, big, rate_per_second=100, paused=False)
                await asyncio.sleep(1.5)
                latency = await _rate_latency(pool, redis, keys, big, 100, 1000)
                await _set(pool, redis, keys, big, paused=True)

            cap = await _cap_run(pool, redis, keys, capped, cap_seconds)
            _say(args, f"max_active {CAP}: exceeded in {cap['max_active_exceeded']} samples")
            await asyncio.sleep(0.5)  # the last tick before the pause lands

            order = [_text(f) for f in await redis.lrange(ek.order, 0, -1)]
            violations = sum(1 for got, want in zip(order, fans, strict=False) if got != want)
            duplicates = len(order) - len(set(order))
            verify = await _verifications(settings, redis, keys, big, args.verify_seconds)
            _say(args, f"pass gate: {verify['pass_verifications_per_s']:.0f} verifications/s")
        finally:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await redis.aclose()
            await pool.close()
        server_failed = proc is not None and proc.returncode not in (0, -signal.SIGTERM)
        within = all(abs(r["error_pct"]) <= TARGET_ERROR_PCT for r in runs)
        return {
            "benchmark": "admission",
            "ok": violations == 0 and duplicates == 0 and cap["max_active_exceeded"] == 0,
            "fans": args.fans,
            "seconds": args.seconds,
            "runs": runs,
            "target_error_pct": TARGET_ERROR_PCT,
            "within_target": within,
            "rate_change_latency_s": latency,
            "rate_change": {
                "from": 100.0,
                "to": 1000.0,
                "via": "admission.operators.update_admission",
            },
            **cap,
            **verify,
            "admitted_in_order": len(order),
            "order_violations": violations,
            "duplicates": duplicates,
            "server_exit_code": proc.returncode if proc is not None else None,
            "server_failed": server_failed,
        }
