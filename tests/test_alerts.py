"""The alert rules (deploy/prometheus/alerts.yml), their unit tests, Prometheus's and
Alertmanager's configurations, checked with Debian's promtool and amtool.

Whether the rules load and evaluate in a real Prometheus on real metrics, and whether every
metric they name exists, is tests/test_dashboards.py's to check.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import ROOT
from tests.metrics_support import DEPLOY, debian_binary

# The first test may install Debian's packages, longer than a test usually may take.
pytestmark = pytest.mark.timeout(600)

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_finds_the_alert_rules_valid() -> None:
    checked = run(debian_binary("promtool"), "check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_every_alert_rule_passes_its_unit_tests() -> None:
    assert RULE_TESTS
    tested = run(debian_binary("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_rule_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert spec["rule_files"] == ["../alerts.yml"], path
        for test in spec["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names == fired, f"rules without a test that fires them: {names - fired}"
    assert names == quiet, f"rules without a test where they stay quiet: {names - quiet}"


def test_every_alert_says_how_bad_it_is_and_where_its_runbook_section_is() -> None:
    anchors = {_anchor(line) for line in RUNBOOK.read_text().splitlines() if line.startswith("#")}
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook"] == f"docs/runbook.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in anchors, f"docs/runbook.md has no {rule['alert']} section"


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-")


def test_prometheus_loads_the_rules_and_sends_alerts_to_alertmanager() -> None:
    config_file = DEPLOY / "prometheus.yml"
    checked = run(debian_binary("promtool"), "check", "config", str(config_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(config_file.read_text())
    # Relative to the configuration file: the same path in docker-compose.yml's container.
    assert config["rule_files"] == ["prometheus/alerts.yml"]
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"waitroom-api", "waitroom-workers", "redis"}


def test_alertmanager_takes_its_configuration_and_routes_to_receivers_it_has() -> None:
    config_file = DEPLOY / "alertmanager.yml"
    checked = run(debian_binary("amtool"), "check-config", str(config_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(config_file.read_text())
    receivers = {r["name"] for r in config["receivers"]}
    route = config["route"]
    assert route["receiver"] in receivers
    assert {r["receiver"] for r in route["routes"]} <= receivers
    # Every severity the rules use reaches someone.
    routed = {"warning"} | {m.split('"')[1] for r in route["routes"] for m in r["matchers"]}
    assert {rule["labels"]["severity"] for rule in rules()} <= routed


def test_compose_runs_alertmanager_and_prometheus_with_these_files() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    prometheus, alertmanager = services["prometheus"], services["alertmanager"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    # rule_files names prometheus/alerts.yml next to /etc/prometheus/prometheus.yml.
    assert "./deploy/prometheus:/etc/prometheus/prometheus:ro" in prometheus["volumes"]
    assert "alertmanager" in prometheus["depends_on"]
    assert (
        "./deploy/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
        in (alertmanager["volumes"])
    )
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    assert alertmanager["ports"] == ["127.0.0.1:9093:9093"]
    # The Redis job scrapes the exporter the stack runs, against the stack's Redis.
    exporter = services["redis-exporter"]
    assert exporter["environment"]["REDIS_ADDR"] == "redis://redis:6379"
    # redis_total_system_memory_bytes, which WaitroomRedisMemoryHigh reads without maxmemory.
    assert exporter["environment"]["REDIS_EXPORTER_INCL_SYSTEM_METRICS"] == "true"
    assert Path(ALERTS).is_file()
