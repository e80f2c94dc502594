"""docker-compose.yml is not run here (no Docker), so its commands are checked against the CLI."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from tests.harness import ROOT
from waitroom.cli import build_parser
from waitroom.settings import load_settings


def _subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_every_waitroom_command_in_compose_is_a_real_subcommand() -> None:
    known = _subcommands()
    services = _compose()["services"]
    commands = [s["command"] for s in services.values() if s.get("image") == "waitroom:local"]
    assert commands, "compose runs no waitroom service"
    for command in commands:
        assert command[0] == "waitroom"
        assert command[1] in known, f"{command} is not a waitroom subcommand"
    # The parser accepts each command line as a whole, not only its first word.
    for command in commands:
        build_parser().parse_args(command[1:])


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
