"""``python -m stress checkout`` at a tiny size: every figure it promises is there, and the
sell-out round oversells nothing.

The benchmark runs as an operator runs it (its own server with two workers, its own fresh
database and Redis prefix, load generators as child processes), with 200 fans for the
measured rounds (which run out of fans well before their 2 s) and 100 fans for 50 tickets in
the sell-out round. Its speed is not judged here: only that the JSON line is complete and
true to the invariants.
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

TICKETS = 50
CONCURRENCY = ("50", "200")


def run_benchmark(settings: Settings) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stress",
            "checkout",
            "--json",
            "--fans=200",
            "--seconds=4",
            "--rounds=2",
            "--warmup=0",
            f"--sellout-tickets={TICKETS}",
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


def test_the_checkout_benchmark_reports_every_figure_and_oversells_nothing(
    settings: Settings,
) -> None:
    report = run_benchmark(settings)
    shown = json.dumps(report, indent=1)[:6000]
    assert report["benchmark"] == "checkout" and report["ok"] is True, shown
    # Per concurrency, keyed as the issue names them.
    for figure in ("http_reserve_rps", "http_reserve_p99_ms"):
        assert set(report[figure]) == set(CONCURRENCY), shown
        assert all(value > 0 for value in report[figure].values()), shown
    assert report["join_rps"] > 0, shown
    assert report["ratio_vs_join"] == pytest.approx(
        report["http_reserve_rps"]["50"] / report["join_rps"], abs=0.002
    )
    assert 0 <= report["forwarded_share"] <= 1, shown
    assert report["cpu_ms_per_reservation"] > 0, shown
    assert set(report["targets"]) == set(report["met"]), shown
    assert report["params"]["server_workers"] == 2, shown
    # Every reservation of the measured rounds was a new fan's, and was held.
    for c in CONCURRENCY:
        assert set(report["sides"][f"reserve_{c}"]["statuses"]) == {"201"}, shown
    assert set(report["sides"]["join"]["statuses"]) == {"201"}, shown
    assert report["passes_differing"] == 0, shown
    assert report["acked_missing"] == 0, shown
    assert report["owner"]["worker_pid"] != report["owner"]["other_pid"], shown
    # The sell-out: every ticket held once, every other fan refused, none oversold.
    sellout = report["sellout"]
    assert report["oversold"] == 0 and sellout["oversold"] == 0, shown
    assert sellout["quantity"] == TICKETS, shown
    assert sellout["held"] + sellout["sold"] == TICKETS, shown
    assert sellout["statuses"] == {"201": TICKETS, "409": sellout["fans"] - TICKETS}, shown
