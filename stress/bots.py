"""``python -m stress bots``: a bot farm on one /24 against honest fans, with proof-of-work on,
while admission runs as in a real on-sale.

Against real Redis and PostgreSQL (fresh database and Redis prefix), one ``waitroom serve``
process with ``WAITROOM_CHALLENGE`` on, its admission loop on, and
``WAITROOM_TRUSTED_PROXIES=127.0.0.1/32``: every client below is on this machine and names
its own address in ``X-Forwarded-For``, as a reverse proxy would. The room is not paused:
it admits ``--admit-rate`` fans per second (200) from the head of the line from the start,
with ``max_active`` so large that it never limits (nobody checks out here, so every pass
issued stays active until it expires).

- **Honest fans** (``--honest``, 2,000): one to three per address, addresses spread over
  100.64.0.0/10 (so nearly every fan has its own /24), each asking for a challenge, solving
  it natively (:mod:`stress.pow`, in ``--honest-solvers`` worker processes) and joining once.
- **The bot farm** (``--bot-processes``, 2, i.e. every core): the 254 addresses of
  203.0.113.0/24 in turn, each process asking for a challenge, solving it natively with all
  the CPU it gets (in chunks, so it can stop), and joining as a new identity, again and
  again, from the start of the honest crowd until it has joined and the browser sample has
  been measured.
- **The browser sample** (``--browser-sample``, 20): while the farm runs, headless Chromium
  (``/usr/bin/chromium``) opens the waiting page as that many more honest fans,
  ``--browser-concurrency`` (4) at a time, each with its own address; the page solves its
  challenge in Web Workers and records how long that took (``data-solved-ms`` of ``#pow``);
  its fan id is read from the page's own join response.
- **The drain**: once the crowd and the farm have stopped, admission keeps running until
  every fan placed has been admitted, or ``--drain-seconds`` (60) have passed.
- **Verification cost**: the server's own :meth:`Challenges.verify` on real solutions, timed
  in process CPU (``time.process_time``) over ``--verify-rounds`` calls.

Every client notes the fan ids its joins got (``fan_id`` of the join's body); who was
admitted, and in which order, is then read from Redis (the event's ``admitted`` hash and
``order`` list). Figures: ``bot_share_of_places`` = bot places / all places;
``bot_share_of_admissions`` = bot fans admitted / all fans admitted;
``bot_share_of_first_admissions`` = the bots' share of the first ``--tickets`` (1,000)
admissions, what a sale of that many tickets would have served; ``honest_admitted_share`` =
honest fans admitted / honest fans. Targets: ``bot_share_of_places`` and
``bot_share_of_admissions`` <= 1 %, ``honest_solve_s_p99`` <= 2 s,
``server_cpu_per_challenge_us`` <= 100; every honest fan placed and admitted; no fan
dropped as abandoned. ``ok`` is false (exit 1) when one is missed. Bounded: the farm stops
at ``--max-seconds`` whatever happens, the drain at ``--drain-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import sys
import tempfile
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
from playwright.async_api import Route, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from redis.asyncio import Redis

from admission import operators
from inventory import catalogue
from stress.common import free_port, fresh_database, fresh_prefix, percentile
from stress.pow import Solver, find_number, payload, solve
from stress.server import server_process
from waitroom.core.keys import EventKeys, Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import load_settings
from waitroom.line.challenge import HEADER, Challenges

TARGET_BOT_SHARE = 0.01
TARGET_SOLVE_P99_S = 2.0
TARGET_VERIFY_US = 100.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
_T = TypeVar("_T")
#: Numbers a bot tries between two looks at the stop flag.
_CHUNK = 200_000
#: The room's ``max_active`` (the most the admin API takes). A pass counts against it until
#: it is completed or expires (``pass_ttl_s``, 15 min, longer than a run), and nobody checks
#: out here: admitted fans stay active, and any smaller value could stop admission.
_MAX_ACTIVE = 10_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--honest", type=int, default=2_000, help="honest fans (native)")
    parser.add_argument("--honest-concurrency", type=int, default=64)
    parser.add_argument("--honest-solvers", type=int, default=2, help="solver processes")
    parser.add_argument("--bot-processes", type=int, default=2)
    parser.add_argument("--browser-sample", type=int, default=20)
    parser.add_argument("--browser-concurrency", type=int, default=4, help="pages at once")
    parser.add_argument("--verify-rounds", type=int, default=20_000)
    parser.add_argument("--max-seconds", type=float, default=150.0)
    parser.add_argument(
        "--admit-rate", type=float, default=200.0, help="admissions per second during the sale"
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=60.0,
        help="most seconds admission runs on after the sale for the fans still in line",
    )
    parser.add_argument(
        "--tickets",
        type=int,
        default=1_000,
        help="tickets on sale: the bots' share of the first this many admissions is reported",
    )


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


def _no_cookies() -> CookieJar:
    """A jar that keeps nothing: one client plays many fans, each its own identity."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


# --- the farm ------------------------------------------------------------------------------


def _bot(
    index: int, processes: int, base_url: str, event_id: str, stop: EventType, out: Any
) -> None:
    """One bot process: challenge, solve, join as a new identity, over and over."""
    placed = tried = refused = 0
    fan_ids: list[str] = []
    refusals: dict[str, int] = {}
    hashes = 0
    addresses = [f"203.0.113.{i}" for i in range(1 + index, 255, processes)]
    started = time.monotonic()
    # No cookie jar: every join is a new identity, as a farm minting them wants.
    with httpx.Client(base_url=base_url, timeout=30, cookies=_no_cookies()) as http:
        n = 0
        while not stop.is_set():
            ip = addresses[n % len(addresses)]
            n += 1
            headers = {"X-Forwarded-For": ip}
            offer = http.post(f"/v1/events/{event_id}/challenge", headers=headers)
            if offer.status_code != 200:
                time.sleep(float(offer.headers.get("Retry-After", "1")))
                continue
            body = offer.json()
            number = None
            for start in range(0, int(body["maxnumber"]) + 1, _CHUNK):
                if stop.is_set():
                    break
                end = min(start + _CHUNK - 1, int(body["maxnumber"]))
                number = find_number(body["challenge"], body["salt"], end, start)
                hashes += (end - start + 1) if number is None else (number - start + 1)
                if number is not None:
                    break
            if number is None:
                continue
            tried += 1
            joined = http.post(
                f"/v1/events/{event_id}/queue",
                headers={**headers, HEADER: payload(body, number)},
            )
            if joined.status_code == 201:
                placed += 1
                fan_ids.append(str(joined.json()["fan_id"]))
            else:
                refused += 1
                code = joined.json().get("error", {}).get("code", str(joined.status_code))
                refusals[code] = refusals.get(code, 0) + 1
    out.put(
        {
            "placed": placed,
            "fan_ids": fan_ids,
            "joins_tried": tried,
            "refused": refused,
            "refusals": refusals,
            "hashes": hashes,
            "seconds": time.monotonic() - started,
        }
    )


# --- honest fans ---------------------------------------------------------------------------


def _honest_addresses(count: int, rng: random.Random) -> list[str]:
    """One to three fans per address, addresses spread over 100.64.0.0/10."""
    addresses: list[str] = []
    while len(addresses) < count:
        n = rng.randrange(1 << 22)
        ip = f"100.{64 + (n >> 16)}.{(n >> 8) & 255}.{1 + (n & 253)}"
        addresses += [ip] * rng.choice((1, 1, 1, 2, 3))
    return addresses[:count]


_progress = {"honest": 0}


async def _honest_fan(
    http: httpx.AsyncClient, event_id: str, ip: str, solver: Solver, gate: asyncio.Semaphore
) -> tuple[int, int, str | None]:
    """One honest fan's join: (status, maxnumber it was asked to solve, its fan id if placed)."""
    _progress["honest"] += 1
    async with gate:
        headers = {"X-Forwarded-For": ip}
        for _ in range(20):
            offer = await http.post(f"/v1/events/{event_id}/challenge", headers=headers)
            if offer.status_code in (429, 503):
                await asyncio.sleep(float(offer.headers.get("Retry-After", "1")))
                continue
            body = offer.json()
            solution = await solver.solve(body)
            joined = await http.post(
                f"/v1/events/{event_id}/queue", headers={**headers, HEADER: solution}
            )
            if joined.status_code in (429, 503):
                await asyncio.sleep(float(joined.headers.get("Retry-After", "1")))
                continue
            fan_id = str(joined.json()["fan_id"]) if joined.status_code == 201 else None
            return joined.status_code, int(body["maxnumber"]), fan_id
    return 0, 0, None


# --- the browser sample --------------------------------------------------------------------


async def _browser_sample(
    base_url: str, event_id: str, count: int, concurrency: int
) -> list[dict[str, Any]]:
    """Open the waiting page ``count`` times (``concurrency`` pages at once), each as a new
    fan from its own address; each page's own record of its solve, and its fan id."""
    results: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(concurrency)
    join_path = f"/v1/events/{event_id}/queue"
    # With admission running, a page may be admitted within a tick of its join and leave for
    # checkout (static/waiting.js), taking its DOM and the join's body with it. So the join
    # goes through a route here: its answer is read, with the page's record of the solve
    # (set before the join is sent), while the page still waits for it, then handed over.
    read_pow = (
        "() => { const d = document.getElementById('pow').dataset;"
        " return [d.solvedMs || '-1', d.maxnumber || '-1']; }"
    )

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

        async def one(i: int) -> None:
            async with gate:
                context = await browser.new_context(
                    base_url=base_url, extra_http_headers={"X-Forwarded-For": f"198.18.{i}.9"}
                )
                placed: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

                async def on_join(route: Route) -> None:
                    if route.request.method != "POST":
                        await route.fallback()
                        return
                    response = await route.fetch()
                    try:
                        if response.status == 201 and not placed.done():
                            body = await response.json()
                            solved_ms, maxnumber = await page.evaluate(read_pow)
                            placed.set_result(
                                {
                                    "fan_id": str(body["fan_id"]),
                                    "solved_ms": int(solved_ms),
                                    "maxnumber": int(maxnumber),
                                }
                            )
                    finally:
                        await route.fulfill(response=response)

                try:
                    page = await context.new_page()
                    await page.route(lambda url: urlsplit(url).path == join_path, on_join)
                    await page.goto(f"/events/{event_id}")
                    results.append(await asyncio.wait_for(placed, 60))
                except (PlaywrightTimeoutError, TimeoutError):
                    # Not placed within the minute: counted as an honest fan left out.
                    results.append({"fan_id": None, "solved_ms": -1, "maxnumber": -1})
                finally:
                    await context.close()

        try:
            await asyncio.gather(*(one(i) for i in range(count)))
        finally:
            await browser.close()
    return results


async def _timed(work: Awaitable[_T], phases: dict[str, float], name: str, started: float) -> _T:
    """``await work``, noting in ``phases[name]`` when it finished (seconds from ``started``)."""
    result = await work
    phases[name] = time.monotonic() - started
    return result


# --- verification cost ---------------------------------------------------------------------


def _verify_cost_us(rounds: int) -> dict[str, float]:
    """CPU per issued and per verified challenge, as the server does them (in process)."""
    challenges = Challenges(b"k" * 32)
    now = time.time()
    issued = [
        challenges.issue("bots-sale", f"100.64.{i // 250}.{i % 250}", 10_000, now)
        for i in range(100)
    ]
    started = time.process_time()
    for _ in range(rounds):
        challenges.issue("bots-sale", "100.64.0.1", 10_000, now)
    issue_us = (time.process_time() - started) / rounds * 1e6
    solved = [(solve(msgspec.structs.asdict(c)), c.salt.split("a=")[1].rstrip("&")) for c in issued]
    started = time.process_time()
    for i in range(rounds):
        solution, subject = solved[i % len(solved)]
        challenges.verify(solution, "bots-sale", subject, now)
    verify_us = (time.process_time() - started) / rounds * 1e6
    return {"issue_us": round(issue_us, 1), "verify_us": round(verify_us, 1)}


# --- the run -------------------------------------------------------------------------------


async def _drain(
    redis: Redis, ek: EventKeys, placed: set[str], seconds: float
) -> tuple[bool, float]:
    """Let admission run until every fan of ``placed`` is admitted or nobody is left in line
    (or ``seconds`` pass): (every one admitted, seconds it took)."""
    started = time.monotonic()
    while True:
        pipe = redis.pipeline(transaction=False)
        pipe.hkeys(ek.admitted)
        pipe.zcard(ek.queue)
        raw, waiting = await pipe.execute()
        admitted = {_text(f) for f in raw}
        done = placed <= admitted
        if done or int(waiting) == 0 or time.monotonic() - started >= seconds:
            return done, time.monotonic() - started
        await asyncio.sleep(0.25)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cost = _verify_cost_us(args.verify_rounds)
    _say(args, f"verification {cost['verify_us']} us, issue {cost['issue_us']} us")
    base = load_settings()
    rng = random.Random(11)
    # Nobody here polls its place or keeps a WebSocket open once placed (native fans and
    # bots join and go; browser pages close once placed), so the sweeper and the admission
    # loop would drop every fan not admitted within the room's grace period (60 s by
    # default) as abandoned. A real client, bot or fan, keeps its place by polling every few
    # seconds at next to no cost; a grace period longer than the whole run stands for that,
    # for bots and fans alike, without thousands of polling clients taking the CPU the
    # solvers, the farm and the server are measured on. ``abandoned_total`` (reported, and
    # a target) shows that nobody was dropped.
    grace_s = min(86_400, int(args.max_seconds + args.drain_seconds) + 600)
    async with fresh_database(base) as dsn, fresh_prefix(base) as prefix:
        work_dir = Path(tempfile.mkdtemp(prefix="waitroom-stress-bots-"))
        settings = msgspec.structs.replace(
            base,
            database_url=dsn,
            redis_prefix=prefix,
            run_dir=str(work_dir),
            log_level="warning",
            port=free_port(),
            trusted_proxies=("127.0.0.1/32",),
            challenge=True,
            # The server's own admission loop admits from the line as the sale goes on,
            # as in `waitroom serve` on an on-sale (stress/flash_sale.py does the same).
            admission_loop=True,
        )
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        redis = redis_from_url(settings.redis_url)
        keys = Keys(prefix)
        try:
            spec = catalogue.EventCreate(
                name="bots benchmark",
                ticket_types=[catalogue.TicketTypeSpec("ga", max(1, args.tickets), 1000, "EUR")],
                room=catalogue.RoomSpec(abandon_grace_s=grace_s),
            )
            event = await catalogue.create_event(pool, spec, actor="stress", now=datetime.now(UTC))
            ek = keys.event(event.id)
            await operators.update_admission(
                pool,
                redis,
                keys,
                event.id,
                operators.make_patch(rate_per_second=args.admit_rate, max_active=_MAX_ACTIVE),
                actor="stress",
            )
            base_url = f"http://127.0.0.1:{settings.port}"
            argv = [sys.executable, "-m", "waitroom", "serve"]
            async with server_process(argv, settings, work_dir / "server.log"):
                ctx = multiprocessing.get_context("spawn")
                stop = ctx.Event()
                out = ctx.Queue()
                bots = [
                    ctx.Process(
                        target=_bot,
                        args=(i, args.bot_processes, base_url, event.id, stop, out),
                        daemon=True,
                    )
                    for i in range(args.bot_processes)
                ]
                started = time.monotonic()
                phases: dict[str, float] = {}
                for bot in bots:
                    bot.start()
                solver = Solver(args.honest_solvers)
                gate = asyncio.Semaphore(args.honest_concurrency)
                addresses = _honest_addresses(args.honest, rng)
                try:
                    async with httpx.AsyncClient(
                        base_url=base_url,
                        timeout=60,
                        cookies=_no_cookies(),
                        limits=httpx.Limits(max_connections=args.honest_concurrency + 8),
                    ) as http:
                        honest_fans = _timed(
                            asyncio.gather(
                                *(_honest_fan(http, event.id, ip, solver, gate) for ip in addresses)
                            ),
                            phases,
                            "honest_s",
                            started,
                        )
                        browser = _timed(
                            _browser_sample(
                                base_url, event.id, args.browser_sample, args.browser_concurrency
                            ),
                            phases,
                            "browser_s",
                            started,
                        )
                        honest, sample = await asyncio.wait_for(
                            asyncio.gather(honest_fans, browser), args.max_seconds
                        )
                finally:
                    stop.set()
                    solver.close()
                farm = [out.get(timeout=60) for _ in bots]
                for bot in bots:
                    bot.join(timeout=30)
                duration = time.monotonic() - started
                honest_ids = {f for _, _, f in honest if f is not None}
                honest_ids |= {s["fan_id"] for s in sample if s["fan_id"] is not None}
                bot_ids = {f for b in farm for f in b["fan_ids"]}
                # The sale is over; admission goes on for those still in line.
                drained, drain_s = await _drain(redis, ek, honest_ids | bot_ids, args.drain_seconds)
            # Places ever created, who was admitted and in which order, and how many were
            # dropped as abandoned (none should be: see grace_s above).
            pipe = redis.pipeline(transaction=False)
            pipe.get(ek.seq)
            pipe.hkeys(ek.admitted)
            pipe.lrange(ek.order, 0, max(0, args.tickets - 1))
            pipe.hget(ek.meta, "abandoned_total")
            raw_seq, raw_admitted, raw_order, raw_abandoned = await pipe.execute()
        finally:
            await redis.aclose()
            await pool.close()

    placed_in_redis = int(raw_seq or 0)
    admitted = {_text(f) for f in raw_admitted}
    first = [_text(f) for f in raw_order] if args.tickets > 0 else []
    abandoned = int(raw_abandoned or 0)

    honest_placed = sum(1 for status, _, _ in honest if status == 201)
    sample_placed = sum(1 for s in sample if s["fan_id"] is not None)
    honest_total = args.honest + args.browser_sample
    bot_places = sum(b["placed"] for b in farm)
    all_places = honest_placed + sample_placed + bot_places
    solve_s = [s["solved_ms"] / 1000 for s in sample if s["solved_ms"] >= 0]
    bot_share = bot_places / all_places if all_places else 1.0
    bot_admitted = len(admitted & bot_ids)
    honest_admitted = len(admitted & honest_ids)
    bot_share_admitted = bot_admitted / len(admitted) if admitted else 1.0
    honest_admitted_share = honest_admitted / honest_total if honest_total else 1.0
    p99 = percentile(solve_s, 99) if solve_s else float("inf")
    targets = {
        "bot_share_of_places": bot_share <= TARGET_BOT_SHARE,
        "bot_share_of_admissions": bot_share_admitted <= TARGET_BOT_SHARE,
        "honest_solve_s_p99": p99 <= TARGET_SOLVE_P99_S,
        "server_cpu_per_challenge_us": cost["verify_us"] <= TARGET_VERIFY_US,
        "every_honest_fan_placed": honest_placed == args.honest
        and sample_placed == args.browser_sample,
        "honest_admitted_share": honest_admitted_share == 1.0,
        "no_fan_dropped_as_abandoned": abandoned == 0,
        "places_match_redis": placed_in_redis == all_places,
    }
    bot_seconds = sum(b["seconds"] for b in farm) / max(1, len(farm))
    return {
        "benchmark": "bots",
        "ok": all(targets.values()),
        "targets_met": targets,
        "honest_fans": honest_total,
        "honest_places": honest_placed + sample_placed,
        "bot_places": bot_places,
        "bot_share_of_places": round(bot_share, 4),
        "honest_share_of_places": round((honest_placed + sample_placed) / honest_total, 4)
        if honest_total
        else None,
        "admitted_total": len(admitted),
        "honest_admitted": honest_admitted,
        "bot_admitted": bot_admitted,
        # Admitted fans no client of this run named (a join whose answer was lost): 0.
        "admitted_unknown": len(admitted - honest_ids - bot_ids),
        "bot_share_of_admissions": round(bot_share_admitted, 4),
        "honest_admitted_share": round(honest_admitted_share, 4),
        # What a sale of --tickets tickets would have served, one ticket per admission.
        "bot_share_of_first_admissions": _share(sum(1 for f in first if f in bot_ids), len(first)),
        "first_admissions": len(first),
        "abandoned_total": abandoned,
        "drained": drained,
        "drain_s": round(drain_s, 1),
        "honest_solve_s_p50": round(percentile(solve_s, 50), 3) if solve_s else None,
        "honest_solve_s_p99": round(p99, 3),
        "browser_maxnumbers": sorted({s["maxnumber"] for s in sample}),
        "honest_maxnumber_max": max((m for _, m, _ in honest), default=0),
        "server_cpu_per_challenge_us": cost["verify_us"],
        "server_cpu_per_issue_us": cost["issue_us"],
        "bot_joins_tried": sum(b["joins_tried"] for b in farm),
        "bot_refused": sum(b["refused"] for b in farm),
        "bot_refusals": {
            code: sum(b["refusals"].get(code, 0) for b in farm)
            for code in sorted({c for b in farm for c in b["refusals"]})
        },
        "honest_statuses": {
            str(code): sum(1 for status, _, _ in honest if status == code)
            for code in sorted({status for status, _, _ in honest})
        },
        "bot_hashes": sum(b["hashes"] for b in farm),
        "bot_hashes_per_s": round(sum(b["hashes"] for b in farm) / max(bot_seconds, 1e-9)),
        "places_in_redis": placed_in_redis,
        "duration_s": round(duration, 1),
        **{k: round(v, 1) for k, v in phases.items()},
        "params": {
            "honest": args.honest,
            "browser_sample": args.browser_sample,
            "browser_concurrency": args.browser_concurrency,
            "bot_processes": args.bot_processes,
            "bot_subnet": "203.0.113.0/24",
            "honest_solvers": args.honest_solvers,
            "challenge": True,
            "admission": "running during the sale, then drained",
            "admit_rate_per_s": args.admit_rate,
            "max_active": _MAX_ACTIVE,
            "abandon_grace_s": grace_s,
            "drain_seconds": args.drain_seconds,
            "tickets": args.tickets,
            "browser_sample_in_admission_figures": True,
        },
    }
