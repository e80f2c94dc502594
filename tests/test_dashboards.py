"""The Grafana dashboards (deploy/grafana/dashboards) show data from a real sale.

A real Prometheus (Debian's), configured by deploy/prometheus.yml with its targets pointed
at local ports and a 1 s scrape, scrapes ``waitroom serve --workers 2``, ``waitroom workers``
(its own /metrics port) and redis_exporter while a small sale runs through the HTTP API:
fans join, wait on WebSockets, are admitted, reserve, pay (the workers and the mock
provider) and get their tickets. Then every query of every panel is run over the sale's
time range through Prometheus's HTTP API: each must be valid, return a series with a
finite value, and name only metrics Prometheus has (a misspelt name would otherwise hide
behind an ``or vector(0)``). The alert rules load there too, and evaluate without error.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import yaml
from websockets.asyncio.client import connect

from tests.harness import (
    ADMIN_TOKEN,
    ROOT,
    ServerThread,
    cleanup,
    free_port,
    fresh_settings,
)
from tests.metrics_support import (
    DEPLOY,
    Prometheus,
    debian_binary,
    finite,
    process,
    wait_http,
    waitroom_argv,
)
from tests.queue_support import new_ip
from waitroom.core.redis import cluster_seeds, is_cluster_url
from waitroom.core.settings import Settings, settings_env
from workers import mock_provider

# Installing Debian's packages on a fresh machine takes longer than a test usually may.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FANS = 16
#: What Grafana puts in place of its variables when the test runs a panel's query.
RATE_INTERVAL = "15s"
#: Metric names in a query (ours, redis_exporter's, Prometheus's own ``up``).
_METRIC = re.compile(r"\b(waitroom_[a-z0-9_]+|redis_[a-z0-9_]+|up)\b")


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


def targets(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(panel title, query)`` of every panel of ``board``."""
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_the_dashboards_are_provisioned_from_their_folder_on_the_provisioned_prometheus() -> None:
    assert {p.name for p in DASHBOARDS} == {"sale.json", "inventory-payments.json", "service.json"}
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    provider = yaml.safe_load((provisioning / "dashboards" / "waitroom.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    uids = [board["uid"] for board in dashboards().values()]
    assert len(set(uids)) == len(uids)
    for name, board in dashboards().items():
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert panels, name
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
            assert panel["targets"] and panel.get("description"), panel["title"]
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] == uid


@pytest.fixture(scope="module")
def provider() -> Iterator[ServerThread]:
    """The mock payment provider."""
    server = ServerThread(mock_provider.create_app()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sale_settings(tmp_path: Path, provider: ServerThread) -> Iterator[Settings]:
    """A database of its own (its admission loops see this sale only), the provider, and
    free ports for the server and the workers' metrics."""
    value = fresh_settings(tmp_path / "run", admission_loop=True, payment_url=provider.url)
    value = msgspec.structs.replace(value, port=free_port(), workers_metrics_port=free_port())
    try:
        yield value
    finally:
        cleanup(value)


def _redis_address(url: str) -> str:
    if is_cluster_url(url):
        host, port = cluster_seeds(url)[0][0]
        return f"redis://{host}:{port}"
    parts = urlsplit(url)
    return f"redis://{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


def test_every_panel_shows_data_from_a_real_prometheus_during_a_sale(
    sale_settings: Settings, tmp_path: Path
) -> None:
    settings = sale_settings
    exporter_binary = debian_binary("prometheus-redis-exporter")
    base = f"http://127.0.0.1:{settings.port}"
    workers_metrics = f"http://127.0.0.1:{settings.workers_metrics_port}/metrics"
    exporter_port = free_port()
    env = settings_env(settings)
    with ExitStack() as stack:
        log = tmp_path / "server.log"
        server = stack.enter_context(
            process(waitroom_argv("serve", "--workers", "2"), log, env=env)
        )
        wait_http(f"{base}/readyz", server, log)
        log = tmp_path / "workers.log"
        workers = stack.enter_context(process(waitroom_argv("workers"), log, env=env))
        wait_http(workers_metrics, workers, log)
        log = tmp_path / "redis-exporter.log"
        exporter = stack.enter_context(
            process(
                [
                    exporter_binary,
                    f"-web.listen-address=127.0.0.1:{exporter_port}",
                    f"-redis.addr={_redis_address(settings.redis_url)}",
                    "-include-system-metrics",  # as docker-compose.yml runs it
                ],
                log,
            )
        )
        wait_http(f"http://127.0.0.1:{exporter_port}/metrics", exporter, log)
        config = _prometheus_config(
            {
                "waitroom-api": f"127.0.0.1:{settings.port}",
                "waitroom-workers": f"127.0.0.1:{settings.workers_metrics_port}",
                "redis": f"127.0.0.1:{exporter_port}",
            }
        )
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        prometheus = stack.enter_context(Prometheus(config, workdir).running())
        _wait_until(lambda: len([s for s in prometheus.query("up") if s["value"][1] == "1"]) == 3)

        started = time.time()
        event_id = asyncio.run(_sale(base, settings))
        # The last scrapes and rule evaluations after the last payment.
        time.sleep(6)
        ended = time.time()

        failures = _check_panels(prometheus, event_id, started, ended)
        failures += _check_rules(prometheus)
        assert not failures, "\n".join(failures)

        # One /metrics for both worker processes: Prometheus never saw a counter go back,
        # and the joins of every worker add up.
        resets = prometheus.query(
            'sum(resets(waitroom_http_requests_total{job="waitroom-api"}[5m]))'
        )
        assert float(resets[0]["value"][1]) == 0
        joined = prometheus.query(f'sum(waitroom_fans_joined_total{{event="{event_id}"}})')
        assert float(joined[0]["value"][1]) == FANS


def _prometheus_config(targets: dict[str, str]) -> dict[str, Any]:
    """deploy/prometheus.yml, scraping ``targets`` (by job) every second, without
    Alertmanager (not run here) and with the rules file by its absolute path."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / rule) for rule in config["rule_files"]]
    del config["alerting"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(targets), "a job of deploy/prometheus.yml has no local target"
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": [targets[name]]}]
    return config


def _check_panels(prometheus: Prometheus, event_id: str, start: float, end: float) -> list[str]:
    known = prometheus.metric_names()
    failures = []
    for name, board in dashboards().items():
        for variable in board["templating"]["list"]:
            found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
            assert found is not None, f"{name}: ${variable['name']} is not a label_values query"
            metric, label = found.groups()
            values = prometheus.api(f"label/{label}/values", **{"match[]": metric})
            if event_id not in values:
                failures.append(f"{name}: variable ${variable['name']} does not offer the sale")
        for title, expr in targets(board):
            query = expr.replace("$event", event_id).replace("$__rate_interval", RATE_INTERVAL)
            missing = set(_METRIC.findall(query)) - known
            if missing:
                failures.append(f"{name} / {title}: no such metric {sorted(missing)} in {expr}")
                continue
            try:
                result = prometheus.query_range(query, start, end)
            except AssertionError as exc:
                failures.append(f"{name} / {title}: {expr}: {exc}")
                continue
            if not finite(result):
                failures.append(f"{name} / {title}: no data for {expr}")
    return failures


def _check_rules(prometheus: Prometheus) -> list[str]:
    """Every alert rule is loaded, has been evaluated without error, and names metrics
    Prometheus has (the unit tests' made-up series cannot tell a misspelt one)."""
    expected = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    exprs = {r["alert"]: r["expr"] for g in expected for r in g["rules"]}
    loaded = {
        rule["name"]: rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]
    }
    failures = []
    if set(loaded) != set(exprs):
        failures.append(f"rules loaded: {sorted(loaded)}, expected {sorted(exprs)}")
    known = prometheus.metric_names()
    for name, rule in loaded.items():
        if rule["health"] != "ok" or rule.get("lastError"):
            failures.append(f"rule {name}: {rule['health']} {rule.get('lastError')}")
    for name, expr in exprs.items():
        missing = set(_METRIC.findall(expr)) - known
        if missing:
            failures.append(f"rule {name}: no such metric {sorted(missing)}")
    return failures


def _wait_until(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.2)


# --- the sale ------------------------------------------------------------------------------


async def _sale(base: str, settings: Settings) -> str:
    """A small sale through the HTTP API; its event id once every fan has paid."""
    event_id = f"dash-{uuid.uuid4().hex[:10]}"
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        created = await http.post(
            "/v1/admin/events",
            headers=ADMIN,
            json={
                "id": event_id,
                "name": "Dashboards",
                "ticket_types": [
                    {"name": "ga", "quantity": 2 * FANS + 8, "price_minor": 1000, "currency": "EUR"}
                ],
                # Slow enough that the line stands for a few seconds of scrapes.
                "room": {"rate_per_second": 3, "max_active": 100},
            },
        )
        assert created.status_code == 201, created.text
        tokens = []
        for _ in range(FANS):
            joined = await http.post(
                f"/v1/events/{event_id}/queue", headers={"X-Forwarded-For": new_ip()}
            )
            assert joined.status_code == 201, joined.text
            tokens.append(joined.json()["visitor_token"])
            http.cookies.clear()
        ws_base = base.replace("http://", "ws://")
        await asyncio.gather(*(_fan(http, ws_base, event_id, token) for token in tokens))
    return event_id


async def _fan(http: httpx.AsyncClient, ws_base: str, event_id: str, token: str) -> None:
    """One fan: waits on the WebSocket for its pass, reserves two tickets and pays."""
    bearer = {"Authorization": f"Bearer {token}"}
    url = f"{ws_base}/v1/events/{event_id}/queue/ws"
    queue_pass = ""
    async with connect(url, additional_headers=bearer, open_timeout=10) as ws:
        while not queue_pass:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["type"] == "admitted":
                queue_pass = message["pass"]
    headers = {**bearer, "X-Queue-Pass": queue_pass}
    reserved = await http.post(
        f"/v1/events/{event_id}/reservations",
        json={"ticket_type": "ga", "quantity": 2},
        headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert reserved.status_code == 201, reserved.text
    hold_id = reserved.json()["id"]
    confirmed = await http.post(
        f"/v1/reservations/{hold_id}/confirm",
        json={"payment_method": "card"},
        headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert confirmed.status_code == 202, confirmed.text
    deadline = time.monotonic() + 30
    while True:
        current = (await http.get(f"/v1/reservations/{hold_id}", headers=bearer)).json()
        if current["order_status"] == "paid":
            return
        assert time.monotonic() < deadline, f"never paid: {current}"
        await asyncio.sleep(0.2)
