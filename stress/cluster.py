"""``python -m stress cluster``: the flash sale on several nodes behind HAProxy, on a Redis Cluster.

What it starts, all real processes on this machine: a private 6-node Redis Cluster
(:func:`stress.private_services.private_cluster`), ``--nodes`` ``waitroom serve`` nodes on
it behind two HAProxy processes (:func:`stress.nodes.running_nodes`; two, because one
process may not hold the files of 10,000 WebSockets in and out), the payment workers and the
mock provider; and the same number of nodes on the single Redis, for the comparison.

What it measures, in order:

1. **Joins, cluster against single Redis**: closed-loop joins through the load balancer
   (:func:`stress.loadgen.run_load`, every request a new fan) on each set of nodes, in
   rounds ABBA; ``join_rps_cluster / join_rps_single`` (target >= 0.8).
2. **The flash sale** on the cluster: ``--fans`` fans for ``--tickets`` tickets, arriving
   evenly over ``--arrival-s`` seconds (30 by default: a crowd of 10,000 in half a minute;
   0 sends them all at once, as fast as 200 joins at a time go, a burst whose capacity item
   1 measures), driven by ``--generators`` processes (:mod:`stress.fan_generator`), each
   reporting its CPU (mean and busiest second, in percent of a core), its run-queue wait
   and its event loop's lag: the load must not be what is slow. Per step
   (join, admitted, reserve, confirm, paid), the fans' p50/p99 and the server's p50/p99 from
   the nodes' own Prometheus histograms (their bucket counts summed over the nodes,
   differenced over the sale, interpolated as PromQL's ``histogram_quantile`` does): join,
   reserve and confirm are their routes' request durations, ``paid`` is the reservation
   poll's (the wait for the payment itself is the provider's and the workers'), and
   ``admitted`` is the admission loop's tick (the fan's wait is the line, by design).
   Afterwards PostgreSQL and Redis are checked (:func:`stress.flash_sale.check`).
3. **Owner failover**: on another event, reservations keep coming through the load
   balancer, the node owning the event's inventory actor is killed (SIGKILL), and
   ``failover_s`` is the time from the kill to the first reservation that succeeded after
   it (target <= 3 s).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from inventory.hosting import node_name_of
from stress.common import metric_sum, percentile
from stress.fan_generator import Report
from stress.flash_sale import PER_FAN_LIMIT, check, create_sale
from stress.loadgen import LoadResult, go, run_load, wait_ready
from stress.nodes import Nodes, running_nodes
from stress.private_services import private_cluster
from stress.simulation import Outcome
from waitroom.core.keys import Keys
from waitroom.core.redis import redis_from_url
from waitroom.core.settings import load_settings

TARGETS = {
    "server_join_p99_ms": 50.0,
    "server_reserve_p99_ms": 50.0,
    "fan_join_p99_ms": 500.0,
    "fan_reserve_p99_ms": 500.0,
    "join_ratio": 0.8,
    "failover_s": 3.0,
    "generator_cpu_pct": 70.0,
}
#: One HAProxy's connections: two files each (fan side, node side) under the 20,000 a
#: process may open here, with room for its own.
BALANCER_MAXCONN = 9000
BALANCERS = 2
#: The routes whose request durations are each step's server side.
STEP_ROUTES = {
    "join": ("POST", "/v1/events/{event_id}/queue"),
    "reserve": ("POST", "/v1/events/{event_id}/reservations"),
    "confirm": ("POST", "/v1/reservations/{reservation_id}/confirm"),
    "paid": ("GET", "/v1/reservations/{reservation_id}"),
}
HTTP_HISTOGRAM = "waitroom_http_request_duration_seconds"
#: A generator's report without its selling window's ends (merged into the crowd's).
_SALE_TIMES = ("first_sale", "last_sale")
TICK_HISTOGRAM = "waitroom_admission_tick_seconds"
#: How late each node's event loop fires a timer (one look a second per node).
LAG_HISTOGRAM = "waitroom_event_loop_lag_seconds"
#: How long each HTTP request waited, from its first byte read, for the app to start on it.
QUEUED_HISTOGRAM = "waitroom_http_request_queued_seconds"
#: How long each garbage collection stopped a node.
GC_HISTOGRAM = "waitroom_gc_pause_seconds"
#: The inventory actors' group commits: how long each took, and how many commands it carried
#: (a reservation waits for the commit that carries it, and for the one before it).
COMMIT_HISTOGRAM = "waitroom_inventory_commit_seconds"
BATCH_HISTOGRAM = "waitroom_inventory_batch_size"
#: Inventory commands a node forwarded to the owner of the event's actor (by outcome), and
#: the times a node became an event's owner.
COUNTERS = ("waitroom_inventory_forwarded_total", "waitroom_inventory_owner_changes_total")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fans", type=int, default=10_000)
    parser.add_argument("--tickets", type=int, default=2_000)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--generators", type=int, default=4, help="fan processes in the sale")
    parser.add_argument("--rate", type=float, default=250.0, help="admissions per second")
    parser.add_argument("--max-active", type=int, default=1000)
    parser.add_argument(
        "--arrival-s",
        type=float,
        default=30.0,
        help="the crowd arrives evenly over this many seconds (0: all at once)",
    )
    parser.add_argument("--join-seconds", type=float, default=4.0, help="per join round")
    parser.add_argument("--join-rounds", type=int, default=4, help="rounds per side (ABBA)")
    parser.add_argument("--join-connections", type=int, default=64)
    parser.add_argument("--failover-tickets", type=int, default=150)
    parser.add_argument(
        "--generator-nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="0-19",
        help="run the fan generators' sessions at this niceness (their autogroup's: see"
        " renice_session): a diagnostic of how much of the nodes' tail is the simulated crowd"
        " taking their cores on this machine (the fans' own figures then include the"
        " generators' wait for a core)",
    )
    parser.add_argument(
        "--owner-line-weight",
        type=int,
        default=None,
        choices=range(1, 101),
        metavar="1-100",
        help="the weight in the line's backends of a node that is the sale's checkout"
        " (WAITROOM_OWNER_LINE_WEIGHT, ADR 0022; default: the setting's; 100 compares"
        " against every node taking an equal share)",
    )
    parser.add_argument(
        "--db-pool-max",
        type=int,
        default=DB_POOL_MAX,
        metavar="N",
        help="each node's PostgreSQL pool (WAITROOM_DB_POOL_MAX; default %(default)s, see"
        " DB_POOL_MAX)",
    )
    parser.add_argument(
        "--ignore-node-cookie",
        action="store_true",
        help="fans ignore the owner-affinity cookie (ADR 0017): reservations spread and forwarded",
    )


#: The nodes' PostgreSQL pools in the sale, twice the setting's default of 10. A node whose
#: event loop is busy keeps a pooled connection until the loop reads the reply, so in the
#: sale's confirm burst a pool of 10 ran dry on the nodes taking the payments: 36-195
#: requests a sale waited 2 s for a connection and got a 503 (retried by the fans). With 16,
#: 2-35 503s a sale; with 20, 0-1 (BENCHMARKS.md, session 21), and the fans' confirm took
#: p50 0.3 s and p99 1.1-1.6 s instead of 0.9 s and 4.2 s. The price: PostgreSQL runs more
#: of the burst at once and takes more of the cores (23% against 19%), and the joins' server
#: p99 rose from 126-139 to 160-210 ms in alternated pairs. The sale's connections peaked at
#: 86 with 20 (69 with 16), under PostgreSQL's default max_connections of 100.
DB_POOL_MAX = 20


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"cluster: {message}", file=sys.stderr, flush=True)


# --- server-side latencies from the nodes' histograms ------------------------------------------

#: (histogram name, labels as sorted (name, value) pairs) -> {upper bound: cumulative count}
Buckets = dict[tuple[str, tuple[tuple[str, str], ...]], dict[float, float]]


def parse_buckets(texts: Iterable[str], names: Sequence[str]) -> Buckets:
    """The bucket counts of the histograms ``names`` in Prometheus texts, summed over the
    texts (one per node)."""
    out: Buckets = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in names:
                continue
            for sample in family.samples:
                if not sample.name.endswith("_bucket"):
                    continue
                labels = dict(sample.labels)
                bound = float(labels.pop("le"))
                key = (family.name, tuple(sorted(labels.items())))
                series = out.setdefault(key, {})
                series[bound] = series.get(bound, 0.0) + sample.value
    return out


def bucket_delta(after: Buckets, before: Buckets) -> Buckets:
    """What was observed between two readings."""
    return {
        key: {b: n - before.get(key, {}).get(b, 0.0) for b, n in series.items()}
        for key, series in after.items()
    }


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """PromQL's ``histogram_quantile``: linear interpolation inside the bucket the rank
    falls in (the lowest bucket from 0); None without observations. A rank in the ``+Inf``
    bucket gives the highest finite bound, as PromQL does."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return bounds[-1]


def _series(buckets: Buckets, name: str, **labels: str) -> dict[float, float]:
    """The buckets of ``name`` summed over every series whose labels include ``labels``."""
    total: dict[float, float] = {}
    for (metric, pairs), series in buckets.items():
        have = dict(pairs)
        if metric == name and all(have.get(k) == v for k, v in labels.items()):
            for bound, count in series.items():
                total[bound] = total.get(bound, 0.0) + count
    return total


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def metric_pages(nodes: Nodes) -> list[str]:
    """Each live node's ``/metrics`` page."""
    async with httpx.AsyncClient(timeout=10, headers=nodes.admin_headers) as http:
        return [(await http.get(f"{node.url}/metrics")).text for node in nodes.nodes if node.alive]


async def scrape(nodes: Nodes) -> Buckets:
    """The nodes' request and admission-tick histograms, read from each node itself."""
    texts = await metric_pages(nodes)
    return parse_buckets(
        texts,
        (
            HTTP_HISTOGRAM,
            TICK_HISTOGRAM,
            LAG_HISTOGRAM,
            GC_HISTOGRAM,
            QUEUED_HISTOGRAM,
            COMMIT_HISTOGRAM,
            BATCH_HISTOGRAM,
        ),
    )


async def counters(nodes: Nodes) -> dict[str, float]:
    """:data:`COUNTERS` summed over the live nodes (every label)."""
    texts = await metric_pages(nodes)
    return {name: sum(metric_sum(text, name) or 0.0 for text in texts) for name in COUNTERS}


#: The nodes' event-loop stalls (waitroom.core.stalls): the histogram by cause, the CPU the
#: loop thread used during them, and the log line each carries the loop's stack on.
STALL_HISTOGRAM = "waitroom_event_loop_stall_seconds"
STALL_CPU = "waitroom_event_loop_stall_cpu_seconds"
STALL_LOG = "event loop stalled"
STALL_CAUSES = ("running", "starved")


async def stall_totals(nodes: Nodes) -> dict[str, dict[str, float]]:
    """Per cause, the nodes' stalls so far: how many, their seconds, the loop's CPU in them."""
    texts = await metric_pages(nodes)
    out = {cause: {"count": 0.0, "seconds": 0.0, "cpu_s": 0.0} for cause in STALL_CAUSES}
    wanted = {
        f"{STALL_HISTOGRAM}_count": "count",
        f"{STALL_HISTOGRAM}_sum": "seconds",
        f"{STALL_CPU}_total": "cpu_s",
    }
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                field = wanted.get(sample.name)
                cause = sample.labels.get("cause")
                if field is not None and cause in out:
                    out[cause][field] += sample.value
    return out


def stall_report(
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    logs: Iterable[str],
    seconds: float,
) -> dict[str, Any]:
    """The nodes' stalls during the sale, by cause, and where the logged ones were.

    *running* stalls are the nodes' own code holding the loop; *starved* ones are the nodes
    waiting for a core. ``where`` ranks the innermost frame of each logged stall's most
    sampled stack (a node logs at most one stall a second, so these are samples).
    """
    causes: dict[str, Any] = {}
    for cause in STALL_CAUSES:
        delta = {k: after[cause][k] - before[cause][k] for k in after[cause]}
        causes[cause] = {
            "count": int(delta["count"]),
            "seconds": round(delta["seconds"], 2),
            "share_of_sale": round(delta["seconds"] / seconds, 3) if seconds else None,
            "loop_cpu_share": round(delta["cpu_s"] / delta["seconds"], 2)
            if delta["seconds"]
            else None,
        }
    where: dict[str, dict[str, float]] = {}
    logged = 0
    for text in logs:
        for line in text.splitlines():
            if STALL_LOG not in line:
                continue
            try:
                record = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if (
                not isinstance(record, dict)
                or record.get("msg", record.get("message")) != STALL_LOG
            ):
                continue
            logged += 1
            stacks = record.get("stacks") or [{"frames": ["(no sample)"]}]
            frames = stacks[0].get("frames") or ["(no sample)"]
            key = f"{record.get('cause')}: {frames[0]}"
            entry = where.setdefault(key, {"stalls": 0, "ms": 0.0})
            entry["stalls"] += 1
            entry["ms"] = round(entry["ms"] + float(record.get("stall_ms", 0.0)), 1)
    ranked = sorted(where.items(), key=lambda kv: -kv[1]["ms"])[:8]
    return {**causes, "logged": logged, "where": dict(ranked)}


def _summary(series: dict[float, float]) -> dict[str, float | None]:
    """p50/p99 (ms) and count of one histogram's cumulative buckets."""
    return {
        "p50_ms": _ms(histogram_quantile(0.5, series)),
        "p99_ms": _ms(histogram_quantile(0.99, series)),
        "count": max(series.values(), default=0.0),
    }


def server_steps(delta: Buckets) -> dict[str, dict[str, Any]]:
    """p50/p99 (ms) and count of each step on the server's side."""
    out: dict[str, dict[str, Any]] = {}
    for step, (method, route) in STEP_ROUTES.items():
        out[step] = _summary(_series(delta, HTTP_HISTOGRAM, method=method, route=route))
    out["admitted"] = _summary(_series(delta, TICK_HISTOGRAM))
    # Not steps: how far behind the nodes' event loops ran (a request waits that long to be
    # read before the request histograms above start timing it), and the collector's pauses.
    lag = _series(delta, LAG_HISTOGRAM)
    looks = max(lag.values(), default=0.0)
    out["event_loop_lag"] = {
        **_summary(lag),
        "share_over_1s": round((looks - lag.get(1.0, looks)) / looks, 3) if looks else None,
    }
    # Every request's wait between its first byte read and the app (the request histograms
    # above include it): the node's own backlog, apart from what happens before the read.
    out["request_queued"] = _summary(_series(delta, QUEUED_HISTOGRAM))
    out["commit"] = _summary(_series(delta, COMMIT_HISTOGRAM))
    batch = _series(delta, BATCH_HISTOGRAM)  # commands, not seconds
    out["commit_batch"] = {
        "p50": histogram_quantile(0.5, batch),
        "p99": histogram_quantile(0.99, batch),
        "count": max(batch.values(), default=0.0),
    }
    pauses = _series(delta, GC_HISTOGRAM)
    collections = max(pauses.values(), default=0.0)
    out["gc_pause"] = {
        **_summary(pauses),
        "over_100ms": collections - pauses.get(0.1, collections),
        "by_generation": {
            generation: _summary(_series(delta, GC_HISTOGRAM, generation=generation))
            for generation in ("0", "1", "2")
        },
    }
    return out


#: One HAProxy ``option httplog`` line: its timers (``Tq/Tw/Tc/Tr/Ta``), status and request.
_LB_LINE = re.compile(
    r" \S+/(?P<server>\S+) (?P<timers>-?\d+/-?\d+/-?\d+/-?\d+/\+?\d+) (?P<status>\d{3}) .*"
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/'
)
_LB_STEPS = (
    ("join", "POST", re.compile(r"^/v1/events/[^/]+/queue$")),
    ("reserve", "POST", re.compile(r"^/v1/events/[^/]+/reservations$")),
    ("confirm", "POST", re.compile(r"^/v1/reservations/[^/]+/confirm$")),
    ("paid", "GET", re.compile(r"^/v1/reservations/[^/]+$")),
)


def balancer_steps(
    logs: Iterable[str], event_id: str, owner: str | None = None
) -> dict[str, dict[str, float]]:
    """p50/p99 (ms) of each HTTP step as the load balancer timed it (``Ta``: from the
    request's first byte to the answer's last), from HAProxy's logs: between the fan's time
    and the server's, it tells the generator's share of a slow step from the network's and
    the queue's. Lines of other events are left out (reservation ids carry no event, so this
    is read before any other event's reservations). With ``owner`` (the node hosting the
    sale's actor), each step's ``owner_share``: the part of its requests that node answered
    (ADR 0022: the checkout's node takes little of the line). ``unavailable``: the step's
    answers that were 503s (retried by the fans)."""
    found: dict[str, list[float]] = {step: [] for step, _, _ in _LB_STEPS}
    at_owner = dict.fromkeys(found, 0)
    # 503s the fans were answered (a node's pool or inventory busy, a node gone): the
    # generators retry them after Retry-After, so they are no errors of the sale, but each
    # is a fan's wait the step's latencies do not show as such.
    unavailable = dict.fromkeys(found, 0)
    # HAProxy's parts of Ta: Tw (waiting in its queue for a server slot), Tc (connecting to
    # the server: a full accept queue shows here as TCP's SYN retries of 1 s and 3 s) and Tr
    # (the server's answer to the request's last byte: the node's event loop and handler).
    parts: dict[str, dict[str, list[float]]] = {
        step: {"queue": [], "connect": [], "server": []} for step, _, _ in _LB_STEPS
    }
    for text in logs:
        for line in text.splitlines():
            match = _LB_LINE.search(line)
            if match is None:
                continue
            path = match["path"].split("?", 1)[0]
            if path.startswith("/v1/events/") and f"/{event_id}/" not in path + "/":
                continue
            for step, method, pattern in _LB_STEPS:
                if match["method"] == method and pattern.match(path):
                    timers = match["timers"].split("/")
                    found[step].append(float(timers[4].lstrip("+")))
                    at_owner[step] += match["server"] == owner
                    unavailable[step] += match["status"] == "503"
                    for name, value in zip(
                        ("queue", "connect", "server"), timers[1:4], strict=True
                    ):
                        if not value.startswith("-"):  # -1: the step never happened
                            parts[step][name].append(float(value))
    out: dict[str, dict[str, float]] = {}
    for step, values in found.items():
        out[step] = {
            "p50_ms": round(percentile(values, 50), 2),
            "p99_ms": round(percentile(values, 99), 2),
            "count": float(len(values)),
            "unavailable": float(unavailable[step]),
        }
        for name, part in parts[step].items():
            out[step][f"{name}_p99_ms"] = round(percentile(part, 99), 2)
        if owner is not None:
            out[step]["owner_share"] = round(at_owner[step] / max(len(values), 1), 3)
    return out


_WS_PATH = re.compile(r"^/v1/events/[^/]+/queue/ws$")


def balancer_websockets(logs: Iterable[str], event_id: str) -> dict[str, float]:
    """The sale's queue WebSocket upgrades as HAProxy logged them: how many were asked for,
    opened (101), refused (503: no node up or free) and never answered (504: the node did
    not answer the handshake within HAProxy's ``timeout server``, as when upgrades wait
    unread in its accept queue), and the handshake's p50/p99 at the balancer (``Tr``, to the
    101). A fan whose socket failed reconnects, so failures are no errors of the sale, but
    each is a fan left without a position meanwhile."""
    statuses: dict[str, int] = {}
    handshake: list[float] = []
    for text in logs:
        for line in text.splitlines():
            match = _LB_LINE.search(line)
            if match is None or match["method"] != "GET":
                continue
            path = match["path"].split("?", 1)[0]
            if not _WS_PATH.match(path) or f"/{event_id}/" not in path:
                continue
            statuses[match["status"]] = statuses.get(match["status"], 0) + 1
            answered = match["timers"].split("/")[3]
            if match["status"] == "101" and not answered.startswith("-"):
                handshake.append(float(answered))
    return {
        "upgrades": float(sum(statuses.values())),
        "opened": float(statuses.get("101", 0)),
        "refused": float(statuses.get("503", 0)),
        "timed_out": float(statuses.get("504", 0)),
        "handshake_p50_ms": round(percentile(handshake, 50), 2),
        "handshake_p99_ms": round(percentile(handshake, 99), 2),
    }


def fan_steps(outcomes: Sequence[Outcome]) -> dict[str, dict[str, float | None]]:
    """p50/p99 of each step as the fans saw it (ms; ``admitted`` and ``paid`` are waits
    from joining, in seconds)."""

    def pct(values: list[float], unit: str) -> dict[str, float | None]:
        return {
            f"p50_{unit}": round(percentile(values, 50), 2),
            f"p99_{unit}": round(percentile(values, 99), 2),
            "count": float(len(values)),
        }

    ages = [o.pass_age_s for o in outcomes if o.pass_age_s is not None]
    return {
        "join": pct([o.join_ms for o in outcomes if o.fan_id], "ms"),
        "admitted": {
            **pct([o.admitted_after_s for o in outcomes if o.admitted_after_s is not None], "s"),
            # From the pass's signing to the fan's socket: the pass's iat is whole seconds,
            # 0.5 s early on average, which the mean takes back.
            "pass_delivery_mean_s": round(statistics.fmean(ages) - 0.5, 3) if ages else None,
        },
        "reserve": pct([o.reserve_ms for o in outcomes if o.reserve_ms is not None], "ms"),
        "confirm": pct([o.confirm_ms for o in outcomes if o.confirm_ms is not None], "ms"),
        "paid": pct([o.paid_after_s for o in outcomes if o.paid_after_s is not None], "s"),
    }


# --- where the machine's CPU went ---------------------------------------------------------------

#: Kinds of process, by a piece of their command line (the first that matches).
_KINDS = (
    ("nodes", "waitroom serve"),
    ("workers", "waitroom workers"),
    ("generators", "stress.fan_generator"),
    ("provider", "mock_provider"),
    ("redis", "redis-server"),
    ("postgres", "postgres"),
    ("haproxy", "haproxy"),
)


def cpu_by_kind() -> dict[str, float]:
    """CPU seconds used so far by every process of the machine, summed by kind (see
    ``_KINDS``; ``other`` for the rest): a reading of where a crowded machine's time goes."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        used = (int(fields[11]) + int(fields[12])) / ticks
        kind = next((k for k, piece in _KINDS if piece in cmdline), "other")
        out[kind] = out.get(kind, 0.0) + used
    return out


def cpu_share(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """CPU per kind between two :func:`cpu_by_kind` readings, in percent of one core
    (processes that ended in between are missing from ``after``: their share is lost)."""
    return {
        kind: round(max(0.0, after.get(kind, 0.0) - before.get(kind, 0.0)) / seconds * 100, 1)
        for kind in sorted(set(before) | set(after))
    }


# --- 1. joins: cluster against single Redis -----------------------------------------------------


async def _paused_event(nodes: Nodes, name: str, *, tickets: int = 10) -> str:
    """An open event whose line does not move (every join stays a place), through the LB."""
    event_id = f"c-{uuid.uuid4().hex[:10]}"
    async with httpx.AsyncClient(base_url=nodes.url, headers=nodes.admin_headers, timeout=10) as h:
        created = await h.post(
            "/v1/admin/events",
            json={
                "id": event_id,
                "name": name,
                "ticket_types": [
                    {"name": "ga", "quantity": tickets, "price_minor": 1000, "currency": "EUR"}
                ],
                "room": {"rate_per_second": 1, "max_active": 10},
            },
        )
        created.raise_for_status()
        paused = await h.patch(f"/v1/admin/events/{event_id}/admission", json={"paused": True})
        paused.raise_for_status()
    return event_id


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def compare_joins(
    args: argparse.Namespace, work: Path, cluster: Nodes, single: Nodes
) -> dict[str, Any]:
    """Join throughput through the load balancer on each set of nodes, rounds ABBA."""
    sides = {"cluster": cluster, "single": single}
    events = {name: await _paused_event(nodes, f"joins on {name}") for name, nodes in sides.items()}
    results: dict[str, list[LoadResult]] = {"cluster": [], "single": []}
    order = ["cluster", "single"]
    for round_ in range(args.join_rounds):
        for index, name in enumerate(order if round_ % 2 == 0 else order[::-1]):
            nodes = sides[name]
            result = await run_load(
                port=_port(nodes.url),
                method="POST",
                path=f"/v1/events/{events[name]}/queue",
                connections=args.join_connections,
                generators=2,
                seconds=args.join_seconds,
                warmup=1.0,
                ip_offset=(round_ * 2 + index) << 20,
                work_dir=work,
                watch={"nodes": [n.pid for n in nodes.nodes]},
            )
            results[name].append(result)
            _say(args, f"joins on {name}, round {round_ + 1}: {result.rps:.0f}/s")

    def side(rounds: list[LoadResult]) -> dict[str, Any]:
        latencies = [x for r in rounds for x in r.latencies]
        statuses: dict[str, int] = {}
        for r in rounds:
            for code, n in r.statuses.items():
                statuses[str(code)] = statuses.get(str(code), 0) + n
        return {
            "rps": round(sum(r.rps for r in rounds) / len(rounds), 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 99) * 1000, 2),
            "statuses": statuses,
            "cpu_pct": [r.cpu_pct for r in rounds],
        }

    return {name: side(rounds) for name, rounds in results.items()}


# --- 2. the flash sale --------------------------------------------------------------------------


def renice_session(pid: int, nice: int) -> None:
    """Lower the CPU share of ``pid``'s session (it leads one of its own): under Linux's
    autogroup the CPU is shared between sessions first, and a process's own niceness only
    counts against the processes of its session, so the session's is the one that matters
    (``/proc/PID/autogroup``); where there is no autogroup, the process's."""
    autogroup = Path(f"/proc/{pid}/autogroup")
    try:
        autogroup.write_text(f"{nice}\n")
    except OSError:
        os.setpriority(os.PRIO_PROCESS, pid, nice)


async def _generators(
    args: argparse.Namespace, work: Path, nodes: Nodes, event_id: str
) -> tuple[list[Outcome], list[Report]]:
    """Run the crowd in ``--generators`` processes, spread over the load balancers."""
    count = args.generators
    shares = [args.fans // count + (i < args.fans % count) for i in range(count)]
    procs: list[asyncio.subprocess.Process] = []
    outs: list[Path] = []
    try:
        first = 0
        for i, share in enumerate(shares):
            out = work / f"fans-{i}.json"
            outs.append(out)
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "stress.fan_generator",
                    f"--base-url={nodes.urls[i % len(nodes.urls)]}",
                    f"--event={event_id}",
                    f"--fans={share}",
                    f"--first={first}",
                    f"--join-concurrency={max(1, 200 // count)}",
                    f"--arrival-s={args.arrival_s}",
                    f"--out={out}",
                    *(["--ignore-node-cookie"] if args.ignore_node_cookie else []),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    # A session of its own, as each service (stress.nodes._spawn): the
                    # crowd is its own machines, not a share of the nodes' CPU.
                    start_new_session=True,
                )
            )
            if args.generator_nice:
                renice_session(procs[-1].pid, args.generator_nice)
            first += share
        await wait_ready(procs, "a fan generator", 60)
        await go(procs)
        reports: list[Report] = []
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 900)
            if not line.strip():
                raise RuntimeError(f"a fan generator exited with {await proc.wait()}")
            reports.append(msgspec.json.decode(line, type=Report))
            await proc.wait()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    outcomes: list[Outcome] = []
    for out in outs:
        outcomes.extend(msgspec.json.decode(out.read_bytes(), type=list[Outcome]))
    return outcomes, reports


def _read_from(offsets: dict[Path, int]) -> list[str]:
    """What each log got since its offset (the sale's lines)."""
    texts = []
    for path, offset in offsets.items():
        with path.open("rb") as log:
            log.seek(offset)
            texts.append(log.read().decode(errors="replace"))
    return texts


async def flash_sale(args: argparse.Namespace, work: Path, nodes: Nodes) -> dict[str, Any]:
    """The sale on ``nodes``: fans' and server's latencies per step, and the checks."""
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        nodes.settings.database_url, min_size=1, max_size=2
    )
    redis = redis_from_url(nodes.settings.redis_url)
    try:
        event_id = await create_sale(pool, args.tickets, args.rate, args.max_active)
        before = await scrape(nodes)
        counted_before = await counters(nodes)
        stalls_before = await stall_totals(nodes)
        log_offsets = {path: path.stat().st_size for path in nodes.run_dir.glob("node*.log")}
        started, cpu_before = time.monotonic(), cpu_by_kind()
        outcomes, reports = await _generators(args, work, nodes, event_id)
        duration = time.monotonic() - started
        # The generators have exited: their share is read from their own reports.
        cpu = cpu_share(cpu_before, cpu_by_kind(), duration)
        cpu["generators"] = round(sum(r.cpu_s for r in reports) / duration * 100, 1)
        after = await scrape(nodes)
        counted = {k: v - counted_before[k] for k, v in (await counters(nodes)).items()}
        stalls = stall_report(
            stalls_before, await stall_totals(nodes), _read_from(log_offsets), duration
        )
        forwarded = counted["waitroom_inventory_forwarded_total"]
        deadline = time.monotonic() + 30  # the last payments may still be settling
        while time.monotonic() < deadline:
            sold = await pool.fetchval(
                "SELECT sold FROM ticket_types WHERE event_id = $1", event_id
            )
            if sold >= args.tickets:
                break
            await asyncio.sleep(0.5)
        checks = await check(pool, redis, Keys(nodes.settings.redis_prefix), event_id)
        # Which process held the sale's actor at the end: a node's name (its lease names
        # it, ``node2/host:pid:id``), or "unnamed" for a process that is no node (the
        # payment workers; their reservations would all have been forwarded).
        owner: Any = await redis.get(Keys(nodes.settings.redis_prefix).event(event_id).owner)
        owner_text = owner.decode() if isinstance(owner, bytes) else owner
        owner_at_end = (node_name_of(owner_text) or "unnamed") if owner_text else None
        lb_logs = [path.read_text(errors="replace") for path in nodes.run_dir.glob("haproxy-*.log")]
        balancer = balancer_steps(lb_logs, event_id, owner_at_end)
        websockets = balancer_websockets(lb_logs, event_id)
    finally:
        await redis.aclose()
        await pool.close()
    sales = [(r.first_sale, r.last_sale) for r in reports if r.first_sale and r.last_sale]
    window = max(b for _, b in sales) - min(a for a, _ in sales) if sales else 0.0
    server = server_steps(bucket_delta(after, before))
    reserves = server["reserve"]["count"] or 0.0
    return {
        "event_id": event_id,
        "duration_s": round(duration, 1),
        "cpu_pct": cpu,
        "fan": fan_steps(outcomes),
        "server": server,
        # Reservations forwarded to the actor's node (ADR 0017: fans that keep the cookie
        # their admitted status gave them are routed to it instead).
        "forwarded": forwarded,
        "forwarded_share": round(forwarded / reserves, 3) if reserves else None,
        # Owners taken during the sale: 1 when the sale's actor never moved (a lease lost to
        # a stalled node moves it, and the fans' cookies then name the old owner).
        "owner_changes": counted["waitroom_inventory_owner_changes_total"],
        "owner_at_end": owner_at_end,
        "balancer": balancer,
        "websockets": websockets,
        # The nodes' event-loop stalls over 100 ms: their own code (running) or no core free
        # (starved), and where the logged ones were.
        "node_stalls": stalls,
        "checks": checks,
        "errors": sum(r.errors for r in reports),
        "error_samples": [o.error for o in outcomes if o.error][:5],
        "paid_fans": sum(r.paid_fans for r in reports),
        "payment_polls": sum(r.payment_polls for r in reports),
        "sold_out_fans": sum(r.sold_out_fans for r in reports),
        "tickets_per_s": round(checks["sold"] / window, 1) if window >= 1 else None,
        "generators": [
            {k: v for k, v in msgspec.structs.asdict(r).items() if k not in _SALE_TIMES}
            for r in reports
        ],
    }


# --- 3. owner failover --------------------------------------------------------------------------


async def owner_failover(nodes: Nodes, tickets: int, *, buyers: int = 6) -> dict[str, Any]:
    """Kill the owner of an event's actor while reservations keep coming; see the module."""
    event_id = await _open_event(nodes, tickets)
    fans = max(1, tickets - 10)
    async with httpx.AsyncClient(base_url=nodes.url, timeout=15) as http:
        admitted = await asyncio.gather(*(_admitted_fan(http, event_id, i) for i in range(fans)))
        queue = list(admitted)
        reserved: list[tuple[int, float, float]] = []  # (status, started, ended)
        enough = asyncio.Event()
        killed_at = 0.0

        async def buyer() -> None:
            while queue:
                headers = queue.pop()
                headers = {**headers, "Idempotency-Key": uuid.uuid4().hex}
                while True:
                    started = time.monotonic()
                    try:
                        response = await http.post(
                            f"/v1/events/{event_id}/reservations",
                            json={"ticket_type": "ga", "quantity": 1},
                            headers=headers,
                        )
                        status = response.status_code
                    except httpx.TransportError:  # the node died with it: send it again
                        status = 0
                    reserved.append((status, started, time.monotonic()))
                    if status == 201:
                        break
                    if status not in (0, 503):
                        raise RuntimeError(f"a reservation answered {status}: {response.text}")
                    await asyncio.sleep(0.05)
                if sum(1 for s, _, _ in reserved if s == 201) >= fans // 4:
                    enough.set()
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(buyer()) for _ in range(buyers)]
        try:
            await asyncio.wait_for(enough.wait(), 60)
            victim = await nodes.owner(event_id)
            if victim is None:
                raise RuntimeError(f"no node owns {event_id}: {await nodes.owner_lease(event_id)}")
            await nodes.kill(victim)
            killed_at = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    after = sorted(e - killed_at for s, b, e in reserved if s == 201 and b >= killed_at)
    since = [s for s, _, e in reserved if e >= killed_at]
    new_owner = await nodes.owner(event_id)
    return {
        "failover_s": round(after[0], 2) if after else None,
        "reserved": sum(1 for s, _, _ in reserved if s == 201),
        "fans": fans,
        "answers_503_after_kill": since.count(503),
        "unanswered_after_kill": since.count(0),
        "killed": victim.name,
        "new_owner": new_owner.name if new_owner else None,
    }


async def _open_event(nodes: Nodes, tickets: int) -> str:
    event_id = f"f-{uuid.uuid4().hex[:10]}"
    async with httpx.AsyncClient(base_url=nodes.url, headers=nodes.admin_headers, timeout=10) as h:
        created = await h.post(
            "/v1/admin/events",
            json={
                "id": event_id,
                "name": "Owner failover",
                "ticket_types": [
                    {"name": "ga", "quantity": tickets, "price_minor": 1000, "currency": "EUR"}
                ],
                "room": {"rate_per_second": 200, "max_active": 1000, "pass_ttl_s": 900},
            },
        )
        created.raise_for_status()
    return event_id


async def _admitted_fan(http: httpx.AsyncClient, event_id: str, i: int) -> dict[str, str]:
    """A new fan, joined and admitted (polled): the headers its reservations carry."""
    ip = {"X-Forwarded-For": f"198.18.{i & 255}.{(i >> 8 & 255) + 1}"}
    joined = await http.post(f"/v1/events/{event_id}/queue", headers=ip)
    joined.raise_for_status()
    body = joined.json()
    auth = {**ip, "Authorization": f"Bearer {body['visitor_token']}"}
    deadline = time.monotonic() + 60
    while body.get("status") != "admitted":
        if time.monotonic() > deadline:
            raise RuntimeError(f"fan {i} was not admitted within 60 s: {body}")
        await asyncio.sleep(0.2)
        polled = await http.get(f"/v1/events/{event_id}/queue/me", headers=auth)
        polled.raise_for_status()
        body = polled.json()
    return {**auth, "X-Queue-Pass": body["queue_pass"]}


# --- the run ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # HAProxy and the nodes inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    base = msgspec.structs.replace(
        load_settings(), admission_loop=True, challenge=False, log_level="warning"
    )
    base = msgspec.structs.replace(base, db_pool_max=args.db_pool_max)
    if args.owner_line_weight is not None:
        base = msgspec.structs.replace(base, owner_line_weight=args.owner_line_weight)
    args.owner_line_weight = base.owner_line_weight
    work = Path(tempfile.mkdtemp(prefix="waitroom-stress-cluster-"))
    _say(args, f"starting a Redis Cluster and {args.nodes} nodes on it (logs in {work})")
    with private_cluster(work / "redis-cluster") as cluster_url:
        async with running_nodes(
            base,
            work / "on-cluster",
            count=args.nodes,
            redis_url=cluster_url,
            balancers=BALANCERS,
            maxconn=BALANCER_MAXCONN,
        ) as on_cluster:
            async with running_nodes(base, work / "on-single", count=args.nodes) as on_single:
                joins = await compare_joins(args, work, on_cluster, on_single)
            _say(args, f"the flash sale: {args.fans} fans, {args.tickets} tickets")
            sale = await flash_sale(args, work, on_cluster)
            _say(args, "owner failover")
            failover = await owner_failover(on_cluster, args.failover_tickets)
    return summarize(args, joins, sale, failover)


def summarize(
    args: argparse.Namespace,
    joins: dict[str, Any],
    sale: dict[str, Any],
    failover: dict[str, Any],
) -> dict[str, Any]:
    """The result line: the headline figures, the targets and whether each is met."""
    fan, server, lb, checks = sale["fan"], sale["server"], sale["balancer"], sale["checks"]
    ratio = joins["cluster"]["rps"] / max(joins["single"]["rps"], 1e-9)
    peak = max(g["cpu_pct_peak"] for g in sale["generators"])
    figures = {
        "server_join_p99_ms": server["join"]["p99_ms"],
        "server_reserve_p99_ms": server["reserve"]["p99_ms"],
        "fan_join_p99_ms": fan["join"]["p99_ms"],
        "fan_reserve_p99_ms": fan["reserve"]["p99_ms"],
        "join_ratio": round(ratio, 3),
        "failover_s": failover["failover_s"],
        "generator_cpu_pct": max(g["cpu_pct"] for g in sale["generators"]),
    }
    met = {
        name: value is not None
        and (value >= TARGETS[name] if name == "join_ratio" else value <= TARGETS[name])
        for name, value in figures.items()
    }
    ok = (
        checks["oversold"] == 0
        and checks["order_violations"] == 0
        and checks["fans_over_limit"] == 0
        and checks["duplicate_codes"] == 0
        and checks["sold"] == args.tickets
        and failover["failover_s"] is not None
        and failover["reserved"] == failover["fans"]
    )
    return {
        "benchmark": "cluster",
        "ok": ok,
        "fans": args.fans,
        "tickets": args.tickets,
        "sold": checks["sold"],
        "oversold": checks["oversold"],
        "order_violations": checks["order_violations"],
        **figures,
        "join_rps_cluster": joins["cluster"]["rps"],
        "join_rps_single": joins["single"]["rps"],
        "generator_cpu_pct_peak": peak,
        "forwarded_share": sale["forwarded_share"],
        # Queue WebSocket upgrades that failed at the balancer (refused or never answered):
        # fans left without a position until they reconnected.
        "websocket_upgrades_failed": sale["websockets"]["refused"]
        + sale["websockets"]["timed_out"],
        "steps": {
            step: {
                **{f"fan_{k}": v for k, v in fan[step].items() if k != "count"},
                **{f"lb_{k}": v for k, v in lb.get(step, {}).items() if k != "count"},
                **{f"server_{k}": v for k, v in server[step].items() if k != "count"},
            }
            for step in ("join", "admitted", "reserve", "confirm", "paid")
        },
        "targets": TARGETS,
        "met": met,
        "sale": {k: v for k, v in sale.items() if k not in ("fan", "server", "balancer")},
        "server_counts": {
            step: s["count"]
            for step, s in server.items()
            if step
            not in ("event_loop_lag", "gc_pause", "request_queued", "commit", "commit_batch")
        },
        "node_event_loop_lag": server["event_loop_lag"],
        "node_gc_pause": server["gc_pause"],
        "node_inventory_commit": server["commit"],
        "node_inventory_commit_batch": server["commit_batch"],
        "node_request_queued": server["request_queued"],
        "joins": joins,
        "failover": failover,
        "params": {
            "nodes": args.nodes,
            "balancers": BALANCERS,
            "redis_cluster": "3 primaries + 3 replicas",
            "generators": args.generators,
            "rate_per_second": args.rate,
            "max_active": args.max_active,
            "generator_nice": args.generator_nice,
            # Every node, balancer, worker and generator runs in a session (a CPU share
            # under Linux's autogroup) of its own, as services do (stress.nodes._spawn).
            "sessions": "one per process",
            "arrival_s": args.arrival_s,
            "fans_keep_node_cookie": not args.ignore_node_cookie,
            # The sale's checkout node's weight in the line's backends (ADR 0022), percent.
            "owner_line_weight": args.owner_line_weight,
            "db_pool_max": args.db_pool_max,
            "per_fan_limit": PER_FAN_LIMIT,
            "join_seconds": args.join_seconds,
            "join_rounds": args.join_rounds,
            "join_connections": args.join_connections,
        },
    }
