"""``python -m stress affinity`` at a tiny size: the four sides run, every figure is there,
the affinity side forwards nothing while the round-robin one forwards about half, and the
workers forward over their local socket on one side and through the Redis inbox on the other.

As an operator runs it: its own two nodes behind a real HAProxy and its own
``serve --workers 2``, a fresh database and Redis prefix, load generators as child
processes. Its speed is not judged here, only that the JSON line is complete and true.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.harness import ROOT
from waitroom.core.settings import Settings, settings_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200), pytest.mark.not_on_cluster]

SIDES = ("workers2", "workers2_inbox", "lb_roundrobin", "lb_affinity")


def test_the_affinity_benchmark_measures_forwarding_both_ways(settings: Settings) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stress",
            "affinity",
            "--json",
            "--seconds=3",
            "--rounds=1",
            "--warmup=0",
            "--expect-rps=200",
        ],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=190,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    shown = json.dumps(report, indent=1)[:6000]
    assert report["benchmark"] == "affinity" and report["ok"] is True, shown
    for figure in ("http_reserve_rps", "http_reserve_p99_ms", "forwarded_share"):
        assert set(report[figure]) == set(SIDES), shown
    assert all(report["http_reserve_rps"][side] > 0 for side in SIDES), shown
    assert all(report["cpu_ms_per_reservation"][side] > 0 for side in SIDES), shown
    # The cookie the admitted fan was given names the node hosting the actor, and with it
    # nothing is forwarded; without it, HAProxy's round robin sends about half elsewhere.
    checks = report["checks"]
    assert checks["status_cookie"] == checks["owner_node"] in ("node1", "node2"), shown
    assert report["forwarded_share"]["lb_affinity"] == 0, shown
    assert 0.3 <= report["forwarded_share"]["lb_roundrobin"] <= 0.7, shown
    assert report["sides"]["lb_affinity"]["cpu_ms_per_reservation_by_process"]["haproxy"] > 0
    for name in ("workers2", "workers2_inbox", "nodes"):
        assert checks[f"acked_missing_{name}"] == 0 and checks[f"oversold_{name}"] == 0, shown
    # The local side forwarded (the kernel split the connections) without the inbox; the
    # other one through it.
    local, inbox = report["sides"]["workers2"], report["sides"]["workers2_inbox"]
    assert local["forwarded"]["inbox_entries"] == 0, shown
    if inbox["forwarded"]["commands"] > 0:
        assert inbox["forwarded"]["inbox_entries"] > 0, shown
    assert report["local_vs_inbox"] > 0, shown
    assert report["bad_answers"] == 0 and report["connections_lost"] == 0, shown
