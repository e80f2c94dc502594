"""``python -m stress chaos``: the flash sale without a fault, then once per fault, in one run.

Each sale runs on a stack of its own (private Redis and PostgreSQL, mock provider, servers,
workers: :mod:`stress.faults`), so one fault's leftovers never reach the next. The fault-free
sale comes first: its ``duration_s`` is the comparison for every fault's. Per fault the JSON
carries the invariants (``oversold``, ``acked_lost``, ``double_charged``, ``places_lost``,
``order_inversions_after``, ``max_active_exceeded``, ``revoked_accepted``,
``spent_accepted``), the HTTP health (``http_500``, ``hung_requests``), ``recovery_s`` (the
slowest route) with ``recovery_s_by_route`` (join, position, reserve, pay), ``duration_s``
and whether the sale ``completed`` (every ticket sold, every fan done). The top level sums the
invariants over the faults, and ``ok`` is true when all of them are 0, every sale completed
and every recovery took at most ``--recovery-target-s`` (2 s).

The default is the flash sale of the figures (10,000 fans, 2,000 tickets); ``--fans`` and
``--tickets`` shrink it, and the admission rate, ``max_active``, the arrival window and the
polling pace scale with the crowd unless given. ``--faults`` runs a subset.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from stress.crowd import SaleSpec
from stress.faults import FAULTS, INVARIANTS, run_fault_sale

#: The figures kept per sale in the JSON line (the full report is on stderr without --json).
_KEPT = (
    *INVARIANTS,
    "completed",
    "recovery_s",
    "recovery_s_by_route",
    "hung_by_route",
    "duration_s",
    "sold",
    "fans_unfinished",
    "fan_states",
    "fan_errors",
    "http_503",
    "transport_errors",
    "rejoins",
    "receipts_refused",
    "fans_in_line_at_fault",
    "places_never_back",
    "places_moved",
    "fans_admitted_twice",
    "charged_unpaid",
    "active_peak_redis",
    "active_peak_db",
    "revoked_checked",
    "spent_checked",
    "victim",
    "fault_at_s",
    "outage_s",
    "paid_resumed_s",
    "requests",
    "latency_p99_ms",
    "harness_stalls",
)
#: Summed over the faults at the top level: every invariant.
_SUMS = INVARIANTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fans", type=int, default=10_000)
    parser.add_argument("--tickets", type=int, default=2_000)
    parser.add_argument(
        "--rate", type=float, default=None, help="admissions per second (default: fans / 40)"
    )
    parser.add_argument("--max-active", type=int, default=None, help="default: 4 x the rate")
    parser.add_argument(
        "--arrival-s",
        type=float,
        default=None,
        help="fans arrive over this (default: fans/400, at least 15 s)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, from {', '.join(FAULTS)} (the fault-free sale always runs)",
    )
    parser.add_argument("--deadline-s", type=float, default=240.0, help="bound on each sale")
    parser.add_argument("--recovery-target-s", type=float, default=2.0)


def spec_for(args: argparse.Namespace) -> SaleSpec:
    """The sale of these options; unset pace figures scale with the crowd."""
    rate = args.rate if args.rate is not None else max(10.0, args.fans / 40)
    arrival = args.arrival_s if args.arrival_s is not None else max(15.0, args.fans / 400)
    poll_max = 2.0 + args.fans / 2500
    return SaleSpec(
        fans=args.fans,
        tickets=args.tickets,
        rate=rate,
        max_active=args.max_active if args.max_active is not None else int(4 * rate),
        arrival_s=arrival,
        fault_by_s=arrival + 10,
        poll_min_s=0.5,
        poll_max_s=poll_max,
        settle_s=poll_max + 2,
        deadline_s=args.deadline_s,
        connections=256,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise SystemExit(f"stress chaos: unknown faults {unknown}; known: {', '.join(FAULTS)}")
    spec = spec_for(args)
    # SIGTERM (a `timeout`, an operator) cancels the run, so that every process and private
    # server it started is stopped and removed on the way out, never left behind.
    main = asyncio.current_task()
    if main is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)

    def show(line: str) -> None:
        if not args.json:
            print(f"chaos: {line}", file=sys.stderr, flush=True)

    runs: dict[str, dict[str, Any]] = {}
    for kind in [None, *faults]:
        name = kind or "none"
        show(f"--- {name} ---")
        report = await run_fault_sale(kind, spec, on_tick=show)
        show(str(report))
        runs[name] = {key: report[key] for key in _KEPT if key in report}
    baseline = runs.pop("none")
    for entry in runs.values():
        entry["fault_free_duration_s"] = baseline["duration_s"]
    recoveries = [r["recovery_s"] for r in runs.values() if r.get("recovery_s") is not None]
    sums = {key: sum(int(r.get(key) or 0) for r in runs.values()) for key in _SUMS}
    baseline_clean = all(not baseline.get(key) for key in _SUMS) and baseline["completed"]
    stalls = {name: r["harness_stalls"] for name, r in runs.items() if r.get("harness_stalls")}
    if baseline.get("harness_stalls"):
        stalls["none"] = baseline["harness_stalls"]
    ok = (
        not any(sums.values())
        and baseline_clean
        and all(r["completed"] for r in runs.values())
        and all(r.get("recovery_s") is not None for r in runs.values())
        and all(v <= args.recovery_target_s for v in recoveries)
        and not stalls
    )
    return {
        "ok": ok,
        **sums,
        "recovery_s": max(recoveries) if recoveries else None,
        "all_completed": all(r["completed"] for r in runs.values()),
        "harness_stalls": stalls,
        "fans": spec.fans,
        "tickets": spec.tickets,
        "fault_free": baseline,
        "faults": runs,
        "params": {
            "rate_per_second": spec.rate,
            "max_active": spec.max_active,
            "arrival_s": spec.arrival_s,
            "poll_s": [spec.poll_min_s, spec.poll_max_s],
            "fault_at_sold": spec.fault_at_sold,
            "outage_s": spec.outage_s,
            "deadline_s": spec.deadline_s,
            "recovery_target_s": args.recovery_target_s,
            "servers": "2 for server_kill, else 1 (each --workers 1)",
        },
    }
