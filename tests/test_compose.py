"""docker-compose.yml is not run here (no Docker), so its commands are checked against the CLI."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import redis.exceptions
import yaml
from redis import Redis as SyncRedis

from stress.nodes import haproxy_binary
from tests.harness import ROOT, free_port
from waitroom.cli import build_parser
from waitroom.core.redis import cluster_seeds, is_cluster_url
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


# --- the scaled profile ------------------------------------------------------------------------

SCALED = {
    "api-1", "api-2", "api-3", "haproxy", "migrate-scaled", "workers-scaled",
    "redis-node-1", "redis-node-2", "redis-node-3", "redis-node-4", "redis-node-5",
    "redis-node-6", "redis-cluster-create", "postgres-primary", "postgres-replica",
}  # fmt: skip


def _unescaped(text: str) -> str:
    """A compose string as the container gets it (``$$`` is compose's escaped ``$``)."""
    return text.replace("$$", "$")


def _published(service: dict[str, Any]) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_the_scaled_profile_has_its_services_and_leaves_the_default_stack_alone() -> None:
    services = _compose()["services"]
    assert set(services) >= SCALED
    for name, service in services.items():
        if name in SCALED:
            assert service.get("profiles") == ["scaled"], name
        else:
            assert "profiles" not in service, f"{name} must run without a profile"
    # Published ports: the single stack's API on 8000, the scaled one's HAProxy on 8080,
    # nothing published twice, and the replicas only behind HAProxy.
    published = [p for s in services.values() for p in _published(s)]
    assert len(published) == len(set(published))
    assert _published(services["haproxy"]) == ["127.0.0.1:8080:8000"]
    assert _published(services["api"]) == ["127.0.0.1:8000:8000"]
    for name in ("api-1", "api-2", "api-3"):
        assert _published(services[name]) == []


def test_the_scaled_api_runs_three_replicas_on_the_redis_cluster() -> None:
    services = _compose()["services"]
    replicas = [services[f"api-{n}"] for n in (1, 2, 3)]
    # Alike but for the name HAProxy knows each by (the owner-affinity cookie, ADR 0017).
    names = [r["environment"]["WAITROOM_NODE_NAME"] for r in replicas]
    assert names == ["node1", "node2", "node3"]

    def unnamed(service: dict[str, Any]) -> dict[str, Any]:
        env = {k: v for k, v in service["environment"].items() if k != "WAITROOM_NODE_NAME"}
        return {**service, "environment": env}

    assert all(unnamed(r) == unnamed(replicas[0]) for r in replicas)
    haproxy = (ROOT / "deploy" / "haproxy.cfg").read_text()
    for name in names:
        assert re.search(rf"^\s*server {name} .* check cookie {name} agent-check ", haproxy, re.M)
    assert re.search(r"^\s*cookie waitroom_node$", haproxy, re.M)
    api = replicas[0]
    assert api["command"] == ["waitroom", "serve"]
    assert api["depends_on"] == {"migrate-scaled": {"condition": "service_completed_successfully"}}
    env = {k: str(v) for k, v in api["environment"].items()}
    assert env["WAITROOM_HOST"] == "0.0.0.0" and env["WAITROOM_PORT"] == "8000"
    # The queue WebSockets on their own port, which HAProxy's waitroom_ws backend names.
    assert env["WAITROOM_WS_PORT"] == "8001"
    # HAProxy's agent check (ADR 0022), on the port the balancer's servers name.
    assert env["WAITROOM_AGENT_PORT"] == "8002"
    url = env["WAITROOM_REDIS_URL"]
    assert is_cluster_url(url)
    seeds, _ = cluster_seeds(url)
    assert seeds == [(f"redis-node-{n}", 6379) for n in range(1, 7)]
    assert "@postgres-primary:5432/" in env["WAITROOM_DATABASE_URL"]
    # The migrations and the workers see the same settings as the replicas.
    for name in ("migrate-scaled", "workers-scaled"):
        other = {k: str(v) for k, v in services[name]["environment"].items()}
        assert {
            k: v
            for k, v in env.items()
            if k
            not in (
                "WAITROOM_HOST",
                "WAITROOM_PORT",
                "WAITROOM_WS_PORT",
                "WAITROOM_AGENT_PORT",
                "WAITROOM_NODE_NAME",
            )
        } == other
    # Every replica has the same run directory (its generated secrets) as the others.
    volumes = {tuple(services[n]["volumes"]) for n in ("api-1", "migrate-scaled", "workers-scaled")}
    assert volumes == {("waitroom-scaled-state:/var/lib/waitroom",)}


def test_the_scaled_settings_are_real_and_trust_only_haproxy() -> None:
    compose = _compose()
    env = compose["x-waitroom-scaled-env"]

    def resolved(value: object) -> str:
        text = str(value).replace("${POSTGRES_PASSWORD:-waitroom}", "pw")
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)

    settings = load_settings({k: resolved(v) for k, v in env.items()})
    lb = compose["services"]["haproxy"]["networks"]["scaled"]["ipv4_address"]
    address = ipaddress.ip_address(resolved(lb))
    assert settings.trusted_proxies == (f"{address}/32",)
    subnet = compose["networks"]["scaled"]["ipam"]["config"][0]["subnet"]
    assert address in ipaddress.ip_network(resolved(subnet))


def test_haproxy_fronts_the_three_replicas_with_the_repositorys_config(tmp_path: Path) -> None:
    services = _compose()["services"]
    haproxy = services["haproxy"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    env = {k: str(v) for k, v in haproxy["environment"].items()}
    assert env["WAITROOM_LB_BIND"] == "0.0.0.0:8000"
    assert [env[f"WAITROOM_NODE{n}"] for n in (1, 2, 3)] == [f"api-{n}:8000" for n in (1, 2, 3)]
    # The WebSockets' backend reaches each replica on its WAITROOM_WS_PORT.
    assert [env[f"WAITROOM_NODE{n}_WS"] for n in (1, 2, 3)] == [f"api-{n}:8001" for n in (1, 2, 3)]
    assert set(haproxy["depends_on"]) == {"api-1", "api-2", "api-3"}
    config = (ROOT / "deploy" / "haproxy.cfg").read_text()
    # Each node in every backend: HTTP, long polls, reservations, payments, its WebSocket port.
    for n in (1, 2, 3):
        assert config.count(f"${{WAITROOM_NODE{n}-") == 4
        assert config.count(f"${{WAITROOM_NODE{n}_WS-") == 1
        # The agent check in each backend of the line (not the reservations'), on the port
        # the replicas answer it on.
        assert config.count(f"${{WAITROOM_NODE{n}_AGENT_PORT-") == 4
        assert env[f"WAITROOM_NODE{n}_AGENT_PORT"] == "8002"
    # The machine's HAProxy takes the file with the compose environment (the replicas'
    # names do not resolve here: those servers start without an address, as allowed).
    checked = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
        env={**os.environ, **env, "WAITROOM_LB_BIND": f"127.0.0.1:{free_port()}"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_redis_cluster_has_six_durable_nodes_and_their_options_are_real(
    tmp_path: Path,
) -> None:
    services = _compose()["services"]
    commands = [services[f"redis-node-{n}"]["command"] for n in range(1, 7)]
    for n, command in enumerate(commands, 1):

        def option(name: str, command: list[str] = command) -> str:
            return str(command[command.index(name) + 1])

        assert option("--cluster-enabled") == "yes"
        assert option("--cluster-announce-hostname") == f"redis-node-{n}"
        assert option("--appendonly") == "yes"
        assert option("--appendfsync") == "everysec"
        assert option("--maxmemory-policy") == "noeviction"
        assert services[f"redis-node-{n}"]["volumes"] == [f"redis-node-{n}-data:/data"]
    # The machine's redis-server (Redis 7, as the image) takes a node's options as written
    # (on free ports: the cluster bus's default, port + 10000, may be past 65535).
    port = free_port()
    argv = [
        "redis-server", *commands[0][1:], "--port", str(port), "--cluster-port",
        str(free_port()), "--dir", str(tmp_path),
    ]  # fmt: skip
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
        assert client.config_get("cluster-announce-hostname") == {
            "cluster-announce-hostname": "redis-node-1"
        }
        assert client.config_get("cluster-preferred-endpoint-type") == {
            "cluster-preferred-endpoint-type": "hostname"
        }
        client.close()
    finally:
        process.kill()
        process.wait()


def test_the_one_shot_cluster_creation_forms_three_primaries_with_a_replica_each() -> None:
    create = _compose()["services"]["redis-cluster-create"]
    assert create["restart"] == "no"
    assert set(create["depends_on"]) == {f"redis-node-{n}" for n in range(1, 7)}
    assert all(d == {"condition": "service_healthy"} for d in create["depends_on"].values())
    shell, flags, script = create["command"]
    assert (shell, flags) == ("sh", "-ec")
    assert "redis-cli --cluster create $$addresses --cluster-replicas 1 --cluster-yes" in script
    assert all(f"redis-node-{n}" in script for n in range(1, 7))
    _sh_parses(_unescaped(script))
    migrate = _compose()["services"]["migrate-scaled"]
    assert migrate["depends_on"]["redis-cluster-create"] == {
        "condition": "service_completed_successfully"
    }


def test_postgresql_streams_to_a_replica() -> None:
    compose = _compose()
    services = compose["services"]
    primary, replica = services["postgres-primary"], services["postgres-replica"]
    assert primary["image"].startswith("postgres:16") and replica["image"] == primary["image"]
    assert "wal_level=replica" in primary["command"]
    init = primary["configs"][0]
    assert init["target"].startswith("/docker-entrypoint-initdb.d/")
    script = compose["configs"][init["source"]]["content"]
    assert "CREATE ROLE replicator WITH REPLICATION" in script
    assert "host replication replicator all scram-sha-256" in script
    _sh_parses(_unescaped(script))
    assert replica["command"][:2] == ["sh", "-ec"]
    clone = replica["command"][2]
    assert "pg_basebackup --host postgres-primary --username replicator" in clone
    assert "--write-recovery-conf" in clone
    _sh_parses(_unescaped(clone))
    assert replica["depends_on"] == {"postgres-primary": {"condition": "service_healthy"}}
    assert {"postgres-primary-data", "postgres-replica-data"} <= set(compose["volumes"])


def _sh_parses(script: str) -> None:
    checked = subprocess.run(
        ["sh", "-n"], input=script, capture_output=True, text=True, timeout=10, check=False
    )
    assert checked.returncode == 0, checked.stderr


def _mounted(service: dict[str, Any], target: str) -> Path:
    """The repository file that ``service`` mounts at ``target``."""
    for volume in service["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            assert source.startswith("./"), f"{target} is not mounted from the repository"
            path: Path = ROOT / source
            return path
    raise AssertionError(f"nothing is mounted at {target}")


def test_traces_go_from_the_api_and_workers_through_the_collector_to_jaeger() -> None:
    compose = _compose()
    services = compose["services"]
    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    config_at = collector["command"][0].removeprefix("--config=")
    config = yaml.safe_load(_mounted(collector, config_at).read_text())
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    for name, service_name in (("api", "waitroom-api"), ("workers", "waitroom-workers")):
        env = services[name]["environment"]
        endpoint = re.sub(r"\$\{[A-Z_]+-([^}]*)\}", r"\1", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint == f"http://otel-collector:{http.rsplit(':', 1)[1]}"
        assert env["OTEL_SERVICE_NAME"] == service_name
        assert "otel-collector" in services[name]["depends_on"]
    # Every pipeline names receivers, processors and exporters that are configured, and the
    # exporters point at services of the stack on the ports those listen on.
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "logs"}
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline[kind]) <= set(config[kind]), (kind, pipeline)
    exporters = config["exporters"]
    assert pipelines["traces"]["exporters"] == ["otlp/jaeger"]
    assert exporters["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert _published(services["jaeger"]) == ["127.0.0.1:16686:16686"]


def test_the_containers_logs_are_shipped_to_loki_with_their_trace_ids() -> None:
    compose = _compose()
    services = compose["services"]
    collector = services["otel-collector"]
    config = yaml.safe_load(_mounted(collector, "/etc/otelcol-contrib/config.yaml").read_text())
    logs = config["service"]["pipelines"]["logs"]
    assert "filelog" in logs["receivers"] and logs["exporters"] == ["otlphttp/loki"]
    filelog = config["receivers"]["filelog"]
    (pattern,) = filelog["include"]
    assert any(
        v.startswith(f"{pattern.split('/*')[0]}:") and v.endswith(":ro")
        for v in collector["volumes"]
    )
    # Our JSON line's trace and span ids become the log record's (the names logs.py writes).
    (trace,) = [op for op in filelog["operators"] if op["type"] == "trace_parser"]
    assert trace["trace_id"]["parse_from"] == "attributes.trace_id"
    assert trace["span_id"]["parse_from"] == "attributes.span_id"
    loki = services["loki"]
    loki_config = yaml.safe_load(_mounted(loki, "/etc/loki/loki.yml").read_text())
    port = loki_config["server"]["http_listen_port"]
    assert config["exporters"]["otlphttp/loki"]["endpoint"] == f"http://loki:{port}/otlp"
    assert loki_config["limits_config"]["allow_structured_metadata"] is True
    assert "loki-data" in compose["volumes"]
    # Grafana has both as data sources, a log line's trace_id linking to Jaeger.
    sources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/tracing.yml").read_text()
    )["datasources"]
    by_type = {s["type"]: s for s in sources}
    assert by_type["loki"]["url"] == f"http://loki:{port}"
    assert by_type["jaeger"]["url"] == "http://jaeger:16686"
    (derived,) = by_type["loki"]["jsonData"]["derivedFields"]
    assert derived["datasourceUid"] == by_type["jaeger"]["uid"]
