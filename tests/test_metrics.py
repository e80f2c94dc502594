"""Metrics everywhere: one /metrics for all of a server's worker processes, the workers' own
/metrics, and the figures an operator reads during a sale."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from inventory import store
from inventory.actor import InventoryActor
from inventory.ledger import Confirm, Confirmed, Reserve, Reserved
from tests.admission.support import create_event
from tests.harness import ADMIN_TOKEN, WorkersThread, free_port, run_cli, running
from tests.inventory.conftest import make_event
from tests.metrics_support import process, sample, samples, wait_http, waitroom_argv
from waitroom.core.settings import Settings, settings_env

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def eventually(read: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``read`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.1)


def test_a_server_of_two_worker_processes_answers_the_totals_of_both_in_every_scrape(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    served = msgspec.structs.replace(settings, port=port, admission_loop=False)
    # The serve command makes its metrics directory under TMPDIR: here, where we can see it.
    env = {**settings_env(served), "TMPDIR": str(tmp_path)}
    log = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with process(waitroom_argv("serve", "--workers", "2"), log, env=env) as proc:
        wait_http(f"{base}/readyz", proc, log)
        assert len(list(tmp_path.glob("waitroom-metrics-*"))) == 1

        def page() -> str:
            # A connection of its own each time: any worker may take it.
            with httpx.Client(timeout=5) as http:
                return http.get(f"{base}/metrics", headers={"Connection": "close"}).text

        # Both workers report: a gauge every process holds a share of is their sum.
        pool_max = settings.db_pool_max
        eventually(lambda: sample(page(), "waitroom_db_pool_max_connections") == 2 * pool_max)
        # ...and a histogram each process's monitor adds to once a second (or a little less
        # often) grows by more in 4 s than one process's at most 4.
        first = sample(page(), "waitroom_event_loop_lag_seconds_count") or 0.0
        time.sleep(4)
        assert (sample(page(), "waitroom_event_loop_lag_seconds_count") or 0.0) - first >= 5

        labels = {"route": "/healthz", "method": "GET", "status": "200"}
        before = sample(page(), "waitroom_http_requests_total", **labels) or 0.0
        for _ in range(40):
            with httpx.Client(timeout=5) as http:
                assert http.get(f"{base}/healthz").status_code == 200
        # Every scrape, whichever worker answers it, counts all 40: no counter goes back.
        seen = [sample(page(), "waitroom_http_requests_total", **labels) for _ in range(8)]
        assert seen == [before + 40] * 8
    assert proc.returncode == 0, log.read_text()
    # The directory went with the server.
    assert not list(tmp_path.glob("waitroom-metrics-*"))


def test_one_worker_counts_in_memory_and_leaves_no_metrics_directory(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    served = msgspec.structs.replace(settings, port=port, admission_loop=False)
    env = {**settings_env(served), "TMPDIR": str(tmp_path)}
    log = tmp_path / "server.log"
    with process(waitroom_argv("serve"), log, env=env) as proc:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)

        def page() -> str:
            with httpx.Client(timeout=5) as http:
                return http.get(f"http://127.0.0.1:{port}/metrics").text

        pool_max = settings.db_pool_max
        eventually(lambda: sample(page(), "waitroom_db_pool_max_connections") == pool_max)
        # process_* figures exist only where values live in memory (one process).
        assert sample(page(), "process_resident_memory_bytes") is not None
        assert not list(tmp_path.glob("waitroom-metrics-*"))


def test_the_workers_serve_their_metrics_on_their_own_port_with_an_operators_token(
    settings: Settings,
) -> None:
    port = free_port()
    private = msgspec.structs.replace(settings, workers_metrics_port=port, metrics_public=False)
    thread = WorkersThread(private).start()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with httpx.Client(timeout=5) as http:

            def sampled() -> str | None:
                """The page once the listener answers and the backlog has been sampled."""
                try:
                    response = http.get(url, headers=ADMIN)
                except httpx.TransportError:
                    return None
                # Labelled children exist once set: after the first sample of the backlog.
                ready = response.status_code == 200 and bool(
                    samples(response.text, "waitroom_payments_in_flight")
                )
                return response.text if ready else None

            text = eventually(sampled)
            states = {labels["state"] for labels, _ in samples(text, "waitroom_payments_in_flight")}
            assert states == {"pending", "processing"}
            for name in ("waitroom_outbox_lag_seconds", "waitroom_holds_overdue_seconds"):
                assert sample(text, name) is not None, name
            assert sample(text, "waitroom_payment_attempts_total", outcome="succeeded") is not None
            for headers in ({}, {"Authorization": "Bearer not-the-token"}):
                refused = http.get(url, headers=headers)
                assert refused.status_code == 401
                assert refused.json()["error"]["code"] == "admin_token_invalid"
    finally:
        thread.stop()
    # Stopped with the workers.
    with pytest.raises(httpx.TransportError), httpx.Client(timeout=2) as http:
        http.get(url)


def test_a_metrics_port_that_is_taken_stops_the_workers_with_one_line(
    settings: Settings,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli(settings, "workers", "--metrics-port", str(port), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"waitroom: cannot serve metrics on 127.0.0.1:{port} (Address already in use): choose"
        " a free port (WAITROOM_WORKERS_METRICS_PORT, or --metrics-port)"
    )


def test_requests_failed_by_a_dependency_count_as_that_dependencys_errors(
    settings: Settings, admin: httpx.Client
) -> None:
    event_id = create_event(admin, prefix="m")  # while Redis is up
    down = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")

    def errors() -> float:
        value = REGISTRY.get_sample_value(
            "waitroom_dependency_errors_total", {"dependency": "redis"}
        )
        return value or 0.0

    with running(down) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        before = errors()
        for _ in range(5):
            response = http.post(f"/v1/events/{event_id}/queue")
            assert response.status_code == 503, response.text
        # Five 503s, five errors (the server's own ping fails once every 5 s at most).
        assert errors() >= before + 5


def test_rate_limit_and_challenge_refusals_are_counted_by_code(settings: Settings) -> None:
    challenged = msgspec.structs.replace(settings, challenge=True)

    def refusals(code: str) -> float:
        return REGISTRY.get_sample_value("waitroom_refusals_total", {"code": code}) or 0.0

    with running(challenged) as server, httpx.Client(base_url=server.url, timeout=10) as admin:
        event_id = f"m-{uuid.uuid4().hex[:10]}"
        created = admin.post(
            "/v1/admin/events",
            headers=ADMIN,
            json={
                "id": event_id,
                "name": "Metrics",
                "ticket_types": [
                    {"name": "ga", "quantity": 5, "price_minor": 100, "currency": "EUR"}
                ],
            },
        )
        assert created.status_code == 201, created.text
        before = refusals("challenge_required")
        joined = admin.post(f"/v1/events/{event_id}/queue")
        assert joined.status_code == 403
        assert refusals("challenge_required") == before + 1


@pytest.mark.anyio
async def test_the_owners_stock_figures_follow_reservations_and_payments_and_go_with_it(
    pool: asyncpg.Pool[Any],
) -> None:
    event_id = await make_event(pool, quantity=10)

    def figure(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"event": event_id, "ticket_type": "ga"})

    async def settled(expected: tuple[float, float, float]) -> None:
        for _ in range(100):  # published at most every 50 ms
            names = ("available", "held", "sold")
            if tuple(figure(f"waitroom_inventory_tickets_{n}") for n in names) == expected:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"never {expected}")

    epoch = await store.take_ownership(pool, event_id, "metrics-test")
    actor = await InventoryActor.load(event_id, pool, epoch)
    task = asyncio.create_task(actor.run())
    try:
        reserved = await actor.ask(Reserve("fan", "ga", 3, "k1", None))
        assert isinstance(reserved, Reserved)
        await settled((7, 3, 0))
        paid = await actor.ask(Confirm(reserved.hold.id, "fan", "pay-1", "k2"))
        assert isinstance(paid, Confirmed)
        # Availability is unchanged by a payment, and yet the figures move.
        await settled((7, 0, 3))
    finally:
        actor.close()
        await asyncio.gather(task, return_exceptions=True)
    # A stopped actor is no longer the owner: it reports nothing.
    assert figure("waitroom_inventory_tickets_available") is None
    assert figure("waitroom_inventory_tickets_sold") is None


def test_each_garbage_collection_is_timed_by_generation(settings: Settings) -> None:
    # The collector calls back at any allocation: the pause is noted there and observed by
    # the monitor within a second (observing it in the callback could deadlock).
    def collected() -> float:
        return (
            REGISTRY.get_sample_value("waitroom_gc_pause_seconds_count", {"generation": "2"}) or 0.0
        )

    with running(settings):
        before = collected()
        gc.collect()
        gc.collect()
        deadline = time.monotonic() + 5
        while collected() < before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert collected() >= before + 2
        assert (
            REGISTRY.get_sample_value("waitroom_gc_pause_seconds_sum", {"generation": "2"}) or 0
        ) > 0
