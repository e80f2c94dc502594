"""The demo's simulated sale (``python -m stress.simulation``, as ``scripts/demo`` runs it).

Its figures must read right: the ticket rate is taken over the selling window, not over the
wait before the first sale or the idle time after the last; and with its output going to a
log or a pipe rather than a terminal it still says, every few seconds, how the sale goes.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from admission.passes import PassClaims, PassKeys
from stress.simulation import Progress, _wait_for_pass, pass_issued_at
from tests.admission.support import create_event
from tests.checkout.test_seat_checkout import seated_event
from tests.harness import ROOT, ServerThread, WorkersThread
from waitroom.core.settings import Settings, settings_env

PROGRESS_LINE = re.compile(r"^\s*[\d.]+s  joined .* tickets sold +\d+ \(.+\)  sold-out fans")


def test_the_ticket_rate_counts_only_the_time_tickets_were_sold() -> None:
    progress = Progress(fans=100, started=0.0)
    assert progress.selling_rate is None
    progress.sold(2, now=50.0)  # the first sale, 50 s after the start
    assert progress.selling_rate is None  # one sale is not a rate
    progress.sold(3, now=52.0)
    progress.sold(5, now=55.0)
    assert progress.selling_window_s == 5.0
    assert progress.selling_rate == 2.0  # 10 tickets in 5 s, not 10 in 55 s
    assert "tickets sold     10 (   2.0/s)" in progress.line()


def test_a_simulated_sale_logs_progress_without_a_terminal_and_reports_its_window(
    settings: Settings, server: ServerThread, workers: WorkersThread, admin: httpx.Client
) -> None:
    # Admitted 4 a second: the sales spread over a few seconds, a window with a rate.
    event_id = create_event(admin, rate=4, quantity=40, prefix="sim")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stress.simulation",
            "--base-url",
            server.url,
            "--event",
            event_id,
            "--fans",
            "12",
            "--ticket-type",
            "ga",
            "--log-every",
            "0.2",
            "--verify",
        ],
        env=settings_env(settings),
        capture_output=True,  # stdout is a pipe, not a terminal
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "\r" not in result.stdout  # no line redrawn in place in a log
    progress = [line for line in lines if PROGRESS_LINE.match(line)]
    assert len(progress) >= 2, result.stdout  # periodic lines, then the final one
    window = [line for line in lines if line.startswith("selling window: ")]
    assert len(window) == 1, result.stdout
    assert re.fullmatch(
        r"selling window: \d+ tickets in [\d.]+ s from the first sale to the last \([\d.]+/s\)",
        window[0],
    )
    assert any(line.startswith("checked in PostgreSQL: sold ") for line in lines)


def test_a_simulated_seated_sale_sells_the_best_seats_available_and_checks_out(
    settings: Settings, server: ServerThread, workers: WorkersThread, admin: httpx.Client
) -> None:
    # As scripts/demo runs it on its sample venue: fans ask for the best 1 or 2 seats of the
    # front or the back stalls, until both levels are gone; nothing is oversold.
    event_id = seated_event(admin)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stress.simulation",
            *("--base-url", server.url, "--event", event_id, "--fans", "30"),
            *("--seat-level", "front", "--seat-level", "back", "--verify"),
        ],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = next(line for line in result.stdout.splitlines() if line.startswith("fans 30: "))
    found = re.fullmatch(
        r"fans 30: \d+ bought (\d+) tickets, \d+ were told it sold out, 0 errors", summary
    )
    assert found is not None, result.stdout
    # 18 seats on sale (A:1-9, B:2-10); a fan who wants two together may leave a last single
    # seat of a level unsold when nobody else asks for one.
    bought = int(found.group(1))
    assert 16 <= bought <= 18, result.stdout
    checked = next(line for line in result.stdout.splitlines() if line.startswith("checked in "))
    assert ", oversold 0," in checked, result.stdout
    # The public map follows the sales within moments (published after each commit).
    deadline = time.monotonic() + 5
    while (states := admin.get(f"/v1/events/{event_id}/seats").json()["states"]).count(
        "s"
    ) != bought:
        assert time.monotonic() < deadline, states
        time.sleep(0.1)


@pytest.mark.anyio
async def test_a_simulated_fans_socket_brings_its_pass_or_gives_up_when_not_in_line(
    server: ServerThread, admin: httpx.Client
) -> None:
    """The fans' WebSocket (:func:`stress.simulation._wait_for_pass`, the wsclient protocol
    without a task per socket): the pass of an admitted fan; a fan who left the line is told
    so (4404) and stops, instead of reconnecting for minutes."""
    event_id = create_event(admin, rate=50, max_active=10, prefix="simws")
    async with httpx.AsyncClient(base_url=server.url) as http:

        async def joined() -> dict[str, str]:
            http.cookies.clear()
            body = (await http.post(f"/v1/events/{event_id}/queue")).json()
            http.cookies.clear()
            return {"Authorization": f"Bearer {body['visitor_token']}"}

        fan = await joined()
        queue_pass = await asyncio.wait_for(_wait_for_pass(server.ws_url, event_id, fan), 20)
        assert queue_pass is not None and queue_pass.count(".") == 2  # a JWS
        gone = await joined()
        left = await http.delete(f"/v1/events/{event_id}/queue/me", headers=gone)
        assert left.status_code in (200, 204), left.text
        with pytest.raises(RuntimeError, match="the WebSocket said: not in line"):
            await asyncio.wait_for(_wait_for_pass(server.ws_url, event_id, gone), 20)


def test_a_passes_issue_time_is_read_from_its_claims() -> None:
    for iat in (1_800_000_000, 1_800_000_001, 1_700_000_123):  # every base64 padding length
        claims = PassClaims(
            "waitroom", "v_" + "1" * 32, "evt-1", "j" * (iat % 3 + 1), iat, iat, iat + 900, 7
        )
        assert pass_issued_at(PassKeys(Ed25519PrivateKey.generate()).sign(claims)) == iat
