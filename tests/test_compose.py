"""docker-compose.yml is not run here (no Docker), so its commands are checked against the CLI."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path
from typing import Any

import redis.exceptions
import yaml
from redis import Redis as SyncRedis

from tests.harness import ROOT, free_port
from waitroom.cli import build_parser
from waitroom.core.settings import load_settings
from workers import mock_provider


def _subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


#: Modules of the image that compose runs with ``python -m``, and their command-line parsers.
_MODULE_PARSERS = {"workers.mock_provider": mock_provider.build_parser}


def test_every_waitroom_command_in_compose_is_a_real_subcommand() -> None:
    known = _subcommands()
    services = _compose()["services"]
    commands = [s["command"] for s in services.values() if s.get("image") == "waitroom:local"]
    assert commands, "compose runs no waitroom service"
    waitroom_commands = [c for c in commands if c[0] == "waitroom"]
    for command in waitroom_commands:
        assert command[1] in known, f"{command} is not a waitroom subcommand"
    # The parser accepts each command line as a whole, not only its first word.
    for command in waitroom_commands:
        build_parser().parse_args(command[1:])
    for command in commands:
        if command[0] == "waitroom":
            continue
        assert command[:2] == ["python", "-m"], f"{command}: neither waitroom nor python -m"
        assert command[2] in _MODULE_PARSERS, f"{command[2]} is not a runnable module of ours"
        _MODULE_PARSERS[command[2]]().parse_args(command[3:])


def test_compose_runs_the_workers_and_the_mock_provider() -> None:
    services = _compose()["services"]
    assert services["workers"]["command"] == ["waitroom", "workers"]
    assert "migrate" in services["workers"]["depends_on"]
    assert services["mock-provider"]["command"][:3] == ["python", "-m", "workers.mock_provider"]
    assert _compose()["x-waitroom-env"]["WAITROOM_PAYMENT_URL"].endswith(
        "http://mock-provider:8090}"
    )


def test_compose_runs_the_documented_stack_with_health_checks() -> None:
    services = _compose()["services"]
    assert {"redis", "postgres", "migrate", "api", "prometheus", "grafana"} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "healthcheck" in services["redis"] and "healthcheck" in services["postgres"]
    assert services["migrate"]["command"] == ["waitroom", "migrate"]
    assert services["api"]["command"][:2] == ["waitroom", "serve"]


def test_compose_sets_only_settings_the_loader_knows() -> None:
    environment = _compose()["x-waitroom-env"]
    resolved = {
        k: str(v).replace("${POSTGRES_PASSWORD:-waitroom}", "pw") for k, v in environment.items()
    }
    resolved = {
        k: v.split(":-", 1)[-1].rstrip("}") if v.startswith("${") else v
        for k, v in resolved.items()
    }
    load_settings(resolved)  # raises on an unknown or malformed WAITROOM_* variable


def test_compose_runs_redis_durably_with_a_replica_and_the_options_are_real(
    tmp_path: Path,
) -> None:
    services = _compose()["services"]
    primary, replica = services["redis"]["command"], services["redis-replica"]["command"]
    for command in (primary, replica):

        def option(name: str, command: list[str] = command) -> str:
            return command[command.index(name) + 1]

        assert option("--appendonly") == "yes"
        assert option("--appendfsync") == "everysec"
        assert option("--maxmemory-policy") == "noeviction"
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    # The machine's redis-server takes the primary's options as written (the same major
    # version as the image): start it with them on a free port and read them back.
    port = free_port()
    argv = ["redis-server", *primary[1:], "--port", str(port), "--dir", str(tmp_path)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = SyncRedis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
    finally:
        process.kill()
        process.wait()
