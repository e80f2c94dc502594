"""``python -m stress waitlist`` at a tiny size: every figure it promises is there, and the
tickets that came back went to the waitlist in line order, none oversold.

The benchmark runs as an operator runs it (its own stack of processes, its own fresh
database and Redis prefix): 40 tickets sell out, 4 come back (1 hold expires after the
shortest hold an event allows, 1 paid order is refunded, 2 holds are cancelled) while 150
fans wait. Its speed is not judged
here: only that the JSON line is complete and true to the invariants.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.harness import ROOT
from waitroom.core.settings import Settings, settings_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150), pytest.mark.not_on_cluster]

TICKETS = 40
FANS = 150


def run_benchmark(settings: Settings) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stress",
            "waitlist",
            "--json",
            f"--fans={FANS}",
            f"--tickets={TICKETS}",
            "--hold-ttl=10",
            "--timeout=120",
        ],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_the_waitlist_benchmark_resells_returned_tickets_in_line_order(
    settings: Settings,
) -> None:
    report = run_benchmark(settings)
    shown = json.dumps(report, indent=1)[:4000]
    assert report["benchmark"] == "waitlist" and report["ok"] is True, shown
    assert (report["fans"], report["tickets"]) == (FANS, TICKETS), shown
    assert report["returned_by"] == {"expired": 1, "cancelled": 2, "refunded": 1}, shown
    assert report["returned"] == report["resold"] == report["admitted_from_waitlist"] == 4, shown
    assert report["oversold"] == 0 and report["order_violations"] == 0, shown
    assert report["offers_refused"] == 0, shown
    assert report["told_waitlist"] == FANS, shown
    assert 0 < report["seconds_to_resell_p50"] <= report["seconds_to_resell_p99"], shown
    assert report["seconds_to_resell_p99"] <= report["seconds_to_resell_max"], shown
    checks = report["checks"]
    assert checks["held"] + checks["sold"] == TICKETS, shown
