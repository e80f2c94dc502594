"""Faults mid-sale: each kind of fault strikes a small live sale, and every invariant holds.

One test per fault of :data:`stress.faults.FAULTS`. Each runs a whole stack on PRIVATE Redis
and PostgreSQL (:mod:`stress.private_services`; the machine's shared ones are never touched):
the mock provider, ``waitroom serve`` (two of them for ``server_kill``), ``waitroom workers``,
and 250 fans over HTTP for 75 tickets, admitted at 10/s with at most 8 shopping at once (40 for
PostgreSQL's restart, see SPECS). Once 30% of the tickets are paid, the fault strikes: a
server (the inventory's owner) or the workers are SIGKILLed and restarted 3 s later,
PostgreSQL is stopped for 3 s, or Redis is SIGKILLed and restarted empty or from its
append-only file.

Afterwards nothing may be oversold, lost after it was acknowledged (201/202), charged twice,
or admitted beyond ``max_active``; no fan waiting in line may lose its place or its order in
line; a revoked pass and the passes of paid orders must still be refused; no request may end
in a 5xx other than 503 or take longer than the dependency timeout and a second; and the sale
must complete: every ticket sold, every fan paid or told it sold out. A failure prints the
whole report (the processes' logs are in the test's temporary directory).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from stress.crowd import SaleSpec
from stress.faults import FAULTS, broken, run_fault_sale

#: 250 fans for 75 tickets (about 50 buyers), admitted at 10/s, 8 at most at once: some 12 s.
SPEC = SaleSpec()
#: While PostgreSQL is down no pass is spent (the outbox waits for it), so with 8 slots the
#: shoppers of the moment fill them and nobody new reserves during the outage; with 40, fans
#: keep being admitted and reserving all through it, as they do in a big sale.
SPECS = {"postgres_restart": dataclasses.replace(SPEC, max_active=40)}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150), pytest.mark.not_on_cluster]


@pytest.mark.parametrize("kind", FAULTS)
def test_a_fault_mid_sale_leaves_every_invariant_intact(kind: str, tmp_path: Path) -> None:
    spec = SPECS.get(kind, SPEC)
    report = asyncio.run(run_fault_sale(kind, spec, run_dir=tmp_path))
    shown = json.dumps(report, indent=1) + _log_tails(tmp_path)
    # The fault struck mid-sale, with fans in line, and the checks had something to check.
    assert report["fans_in_line_at_fault"] > 0, shown
    assert report["revoked_checked"], shown
    assert report["spent_checked"] > 0, shown
    if kind == "server_kill":
        assert report["transport_errors"] > 0, shown
    if kind == "redis_restart_aof":
        # The workers noticed the restart and wrote back the markers its last second may have
        # lost: the gate itself refuses every paid pass (not only the inventory ledger).
        assert report["refused_otherwise"] == [], shown
    if kind == "redis_restart_empty":
        assert report["rejoins"] >= report["fans_in_line_at_fault"] // 2, shown
    assert broken(report) == {}, shown


def _log_tails(run_dir: Path, lines: int = 25) -> str:
    """The last lines of the stack's logs (servers, workers, provider), for a failure's
    message: CI keeps nothing else of the run."""
    out = []
    for log in sorted(run_dir.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"\n--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "".join(out)
