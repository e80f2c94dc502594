"""``python -m stress cluster`` at a tiny size, and the pieces it computes its figures with.

The benchmark runs as an operator runs it (a private Redis Cluster from ``scripts/services
--cluster``, three nodes behind two HAProxy processes, the workers and the mock provider,
fan generators as child processes), with 300 fans for 60 tickets. Its speed is not judged
here: only that the JSON line is complete and true to the invariants. The quantile and the
balancer-log parsing are checked against figures worked out by hand.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stress.cluster import (
    balancer_steps,
    balancer_websockets,
    histogram_quantile,
    parse_buckets,
    renice_session,
    stall_report,
)
from tests.harness import ROOT
from waitroom.core.settings import Settings, settings_env

STEPS = ("join", "admitted", "reserve", "confirm", "paid")


def test_the_quantile_interpolates_inside_the_bucket_as_promql_does() -> None:
    # 100 observations: 50 at or under 10 ms, 90 at or under 50 ms, all at or under 100 ms.
    buckets = {0.01: 50.0, 0.05: 90.0, 0.1: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.03)  # halfway from 10 to 50
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.095)
    assert histogram_quantile(0.99, {0.01: 0.0, math.inf: 0.0}) is None
    # Past the last finite bound: that bound, as PromQL answers.
    assert histogram_quantile(0.99, {0.01: 10.0, math.inf: 20.0}) == pytest.approx(0.01)


def test_a_generator_is_reniced_by_its_session_which_is_what_shares_the_cpu() -> None:
    # Each generator leads a session of its own (stress.nodes._spawn's reason); a plain
    # `nice` of the process would only weigh against the rest of that session: nothing.
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        renice_session(proc.pid, 7)
        autogroup = Path(f"/proc/{proc.pid}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == "7"
        else:  # no autogroup: the process's own niceness
            assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 7
    finally:
        proc.kill()
        proc.wait()


def test_bucket_counts_are_summed_over_the_nodes() -> None:
    page = (
        "# TYPE waitroom_http_request_duration_seconds histogram\n"
        'waitroom_http_request_duration_seconds_bucket{{route="/r",method="POST",le="0.01"}} {a}\n'
        'waitroom_http_request_duration_seconds_bucket{{route="/r",method="POST",le="+Inf"}} {b}\n'
        'waitroom_http_request_duration_seconds_count{{route="/r",method="POST"}} {b}\n'
        'waitroom_http_request_duration_seconds_sum{{route="/r",method="POST"}} 1.0\n'
    )
    parsed = parse_buckets(
        [page.format(a=3, b=4), page.format(a=5, b=9)], ["waitroom_http_request_duration_seconds"]
    )
    key = ("waitroom_http_request_duration_seconds", (("method", "POST"), ("route", "/r")))
    assert parsed == {key: {0.01: 8.0, math.inf: 13.0}}


def test_the_balancer_times_come_from_haproxy_log_lines_of_the_sale_only() -> None:
    def line(timers: str, status: int, request: str, server: str = "node1") -> str:
        return (
            f"127.0.0.1:40000 [03/Dec/2026:05:31:16.817] fans waitroom/{server}"
            f' {timers} {status} 989 - - ---- 1/1/1/1/0 0/0 "{request} HTTP/1.1"'
        )

    log = "\n".join(
        [
            line("0/0/1/9/10", 201, "POST /v1/events/evt-a/queue"),
            line("0/0/1/29/30", 201, "POST /v1/events/evt-a/queue", server="node2"),
            line("0/0/1/9/999", 201, "POST /v1/events/evt-other/queue"),  # another event
            line("0/0/0/40/+40", 201, "POST /v1/events/evt-a/reservations"),
            line("0/0/0/7/8", 202, "POST /v1/reservations/0f1e/confirm"),
            line("0/0/0/2/3", 200, "GET /v1/reservations/0f1e"),
            line("0/0/0/2000/2001", 503, "GET /v1/reservations/0f1e?wait=10"),
            "[WARNING] (11469) : Server waitroom/node3 is DOWN",
        ]
    )
    steps = balancer_steps([log], "evt-a")
    assert steps["join"]["connect_p99_ms"] == 1.0 and steps["reserve"]["server_p99_ms"] == 40.0
    assert {step: value["count"] for step, value in steps.items()} == {
        "join": 2.0,
        "reserve": 1.0,
        "confirm": 1.0,
        "paid": 2.0,
    }
    assert steps["paid"]["unavailable"] == 1.0 and steps["join"]["unavailable"] == 0.0
    assert steps["reserve"]["p99_ms"] == 40.0 and steps["confirm"]["p50_ms"] == 8.0
    assert 10.0 <= steps["join"]["p50_ms"] <= 30.0
    # The part of each step the sale's checkout node answered (ADR 0022).
    shares = balancer_steps([log], "evt-a", owner="node2")
    assert shares["join"]["owner_share"] == 0.5 and shares["reserve"]["owner_share"] == 0.0
    assert "owner_share" not in steps["join"]


def test_the_balancer_log_counts_the_sales_websocket_upgrades_and_their_failures() -> None:
    def line(timers: str, status: int, event_id: str = "evt-a", flags: str = "----") -> str:
        return (
            f"127.0.0.1:40000 [03/Dec/2026:05:31:16.817] fans waitroom_ws/node1 {timers}"
            f" {status} 736 - - {flags} 1/1/1/1/0 0/0"
            f' "GET /v1/events/{event_id}/queue/ws HTTP/1.1"'
        )

    log = "\n".join(
        [
            line("0/0/0/18/1025", 101),
            line("0/0/0/40/30000", 101),
            line("0/0/1/-1/30002", 504, flags="sH--"),  # the node never answered
            line("0/-1/-1/-1/0", 503, flags="SC--"),  # no node up
            line("0/0/0/9/99", 101, event_id="evt-other"),
            line("0/0/0/2/3", 201).replace("GET", "POST").replace("/ws", ""),  # a join
        ]
    )
    ws = balancer_websockets([log], "evt-a")
    assert ws["upgrades"] == 4.0 and ws["opened"] == 2.0
    assert ws["timed_out"] == 1.0 and ws["refused"] == 1.0
    assert 18.0 <= ws["handshake_p50_ms"] <= 40.0 and ws["handshake_p99_ms"] <= 40.0


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.not_on_cluster  # it starts a Redis Cluster of its own
def test_stalls_are_the_sales_own_by_cause_and_ranked_by_where_they_held_the_loop() -> None:
    zero = {"count": 0.0, "seconds": 0.0, "cpu_s": 0.0}
    before = {"running": {"count": 2.0, "seconds": 0.5, "cpu_s": 0.4}, "starved": dict(zero)}
    after = {
        "running": {"count": 5.0, "seconds": 1.7, "cpu_s": 1.4},
        "starved": {"count": 4.0, "seconds": 2.0, "cpu_s": 0.2},
    }

    def line(cause: str, ms: float, frame: str) -> str:
        stacks = [{"samples": 3, "frames": [frame, "line/room.py:10 outer"]}]
        return json.dumps(
            {"msg": "event loop stalled", "cause": cause, "stall_ms": ms, "stacks": stacks}
        )

    node1 = "\n".join(
        [
            line("running", 300.0, "line/broadcast.py:200 tick"),
            '{"msg": "request done", "note": "event loop stalled"}',  # not a stall line
            "not json: event loop stalled",
            line("running", 150.0, "line/broadcast.py:200 tick"),
        ]
    )
    node2 = line("starved", 900.0, "inventory/actor.py:336 _apply")
    report = stall_report(before, after, [node1, node2], seconds=10.0)
    assert report["running"] == {
        "count": 3, "seconds": 1.2, "share_of_sale": 0.12, "loop_cpu_share": 0.83,
    }  # fmt: skip
    assert report["starved"] == {
        "count": 4, "seconds": 2.0, "share_of_sale": 0.2, "loop_cpu_share": 0.1,
    }  # fmt: skip
    assert report["logged"] == 3
    assert list(report["where"].items()) == [
        ("starved: inventory/actor.py:336 _apply", {"stalls": 1, "ms": 900.0}),
        ("running: line/broadcast.py:200 tick", {"stalls": 2, "ms": 450.0}),
    ]


def test_the_cluster_benchmark_reports_every_figure_and_oversells_nothing(
    settings: Settings,
) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "stress", "cluster", "--json",
            "--fans=300", "--tickets=60", "--generators=2", "--arrival-s=3",
            "--join-seconds=1", "--join-rounds=1", "--join-connections=16",
            "--failover-tickets=40",
        ],
        env=settings_env(settings), capture_output=True, text=True, timeout=380,
        check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    shown = json.dumps(report, indent=1)[:6000]
    assert report["benchmark"] == "cluster" and report["ok"] is True, shown
    assert (report["fans"], report["tickets"], report["sold"]) == (300, 60, 60), shown
    assert report["oversold"] == 0 and report["order_violations"] == 0, shown
    for figure in (
        "server_join_p99_ms",
        "server_reserve_p99_ms",
        "fan_join_p99_ms",
        "fan_reserve_p99_ms",
        "join_rps_cluster",
        "join_rps_single",
        "failover_s",
    ):
        assert isinstance(report[figure], float) and report[figure] > 0, (figure, shown)
    assert set(report["steps"]) == set(STEPS), shown
    # Reservations forwarded to the actor's node (fans keep the owner-affinity cookie once
    # an owner exists; the first ones have none to keep).
    assert 0 <= report["forwarded_share"] <= 1, shown
    for step in ("join", "reserve", "confirm"):
        assert {"fan_p99_ms", "lb_p99_ms", "server_p99_ms"} <= set(report["steps"][step]), shown
        # The part of the step the sale's checkout node answered (ADR 0022).
        assert 0 <= report["steps"][step]["lb_owner_share"] <= 1, shown
    assert report["params"]["owner_line_weight"] == 10, shown
    assert report["params"]["db_pool_max"] == 20, shown
    for step in ("join", "reserve", "confirm", "paid"):
        # 503s are retried by the fans, and counted (a node's pool or inventory was busy).
        assert report["steps"][step]["lb_unavailable"] >= 0, shown
    # The waits for admission and payment are the fans', in seconds.
    assert {"fan_p99_s", "lb_p99_ms", "server_p99_ms"} <= set(report["steps"]["paid"]), shown
    assert {"fan_p99_s", "server_p99_ms"} <= set(report["steps"]["admitted"]), shown
    # Passes that came over the socket: from their signing to the fan, under a second or so.
    delivery = report["steps"]["admitted"]["fan_pass_delivery_mean_s"]
    assert delivery is None or -0.6 <= delivery <= 30, shown
    # The nodes' loops were looked at once a second each, during a sale of a few seconds.
    lag = report["node_event_loop_lag"]
    assert lag["count"] >= 3 and lag["p99_ms"] is not None and lag["p99_ms"] > 0, shown
    assert 0 <= lag["share_over_1s"] <= 1, shown
    assert report["node_gc_pause"]["count"] >= 0, shown
    stalls = report["sale"]["node_stalls"]
    assert {"running", "starved", "logged", "where"} <= set(stalls), shown
    assert all(stalls[cause]["count"] >= 0 for cause in ("running", "starved")), shown
    generators = report["sale"]["generators"]
    assert len(generators) == 2 and all(g["cpu_pct"] >= 0 for g in generators), shown
    assert report["failover"]["reserved"] == report["failover"]["fans"], shown
    assert report["failover"]["new_owner"] not in (None, report["failover"]["killed"]), shown
