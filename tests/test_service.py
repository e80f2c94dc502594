"""Liveness, readiness with dependencies down, metrics, request ids and the OpenAPI document."""

from __future__ import annotations

import time

import httpx
import msgspec

from tests.harness import ADMIN_TOKEN, free_port, running
from tests.test_errors import assert_error
from waitroom.core.settings import Settings


def test_healthz_answers_without_dependencies(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {}}


def test_readyz_checks_redis_and_postgresql(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"redis": "ok", "postgresql": "ok"}}


def _assert_not_ready(response: httpx.Response, dependency: str) -> None:
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "not_ready"
    assert error["details"]["failing"] == [dependency]
    assert dependency in error["message"]


def test_readyz_names_redis_when_it_is_down(settings: Settings) -> None:
    down = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with running(down) as server:
        started = time.monotonic()
        response = httpx.get(server.url + "/readyz", timeout=10)
        assert time.monotonic() - started < 3
    _assert_not_ready(response, "redis")


def test_readyz_names_postgresql_when_the_database_url_is_wrong(settings: Settings) -> None:
    wrong = msgspec.structs.replace(
        settings, database_url="postgresql://postgres@127.0.0.1:5432/no_such_database_here"
    )
    with running(wrong) as server:
        response = httpx.get(server.url + "/readyz", timeout=10)
    _assert_not_ready(response, "postgresql")


def test_readyz_does_not_hang_on_a_silent_dependency(settings: Settings, silent_port: int) -> None:
    hanging = msgspec.structs.replace(
        settings,
        database_url=f"postgresql://postgres@127.0.0.1:{silent_port}/x",
        dependency_timeout_s=0.5,
    )
    with running(hanging) as server:
        started = time.monotonic()
        response = httpx.get(server.url + "/readyz", timeout=10)
        elapsed = time.monotonic() - started
    _assert_not_ready(response, "postgresql")
    assert elapsed < 3


def test_a_request_id_is_generated_and_echoed(client: httpx.Client) -> None:
    generated = client.get("/healthz").headers["X-Request-ID"]
    assert len(generated) == 32
    given = client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
    assert given == "abc-123"
    # A hostile id (too long, odd characters) is replaced rather than echoed into logs.
    hostile = client.get("/healthz", headers={"X-Request-ID": 'x"y' * 100}).headers["X-Request-ID"]
    assert hostile != 'x"y' * 100 and len(hostile) == 32


def test_metrics_are_labelled_by_route_template_not_raw_path(client: httpx.Client) -> None:
    for event_id in ("metrics-a", "metrics-b", "metrics-c"):
        client.get(f"/v1/events/{event_id}")
    client.get("/no/such/route/123")
    text = client.get("/metrics").text
    assert 'route="/v1/events/{event_id}"' in text
    assert "metrics-a" not in text and "metrics-b" not in text
    assert 'route="unmatched"' in text
    assert "/no/such/route/123" not in text
    assert "waitroom_http_request_duration_seconds_bucket" in text


def test_openapi_is_generated_from_the_wire_types(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    create = document["paths"]["/v1/admin/events"]["post"]
    schema_ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert schema_ref == "#/components/schemas/EventCreate"
    assert {"201", "400", "401", "409", "413", "415", "422"} <= set(create["responses"])
    ticket = document["components"]["schemas"]["TicketTypeSpec"]
    assert ticket["properties"]["quantity"]["minimum"] == 1
    assert "/v1/events/{event_id}" in document["paths"]
    assert "ErrorBody" in document["components"]["schemas"]


def test_the_server_shuts_down_cleanly(settings: Settings) -> None:
    with running(settings) as server:
        assert httpx.get(server.url + "/healthz").status_code == 200
    assert not server.thread.is_alive()


def test_readyz_answers_only_ok_down_or_timeout_never_exception_text(
    settings: Settings, silent_port: int
) -> None:
    broken = msgspec.structs.replace(
        settings,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        database_url=f"postgresql://postgres@127.0.0.1:{silent_port}/x",
        dependency_timeout_s=0.5,
    )
    with running(broken) as server:
        response = httpx.get(server.url + "/readyz", timeout=10)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["details"]["checks"] == {"redis": "down", "postgresql": "timeout"}
    assert error["message"] == "not ready: postgresql (timeout), redis (down)"
    for leak in ("Error", "refused", "127.0.0.1", str(silent_port)):
        assert leak not in response.text


ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_private_metrics_and_readiness_details_need_an_operators_token(
    settings: Settings,
) -> None:
    private = msgspec.structs.replace(settings, metrics_public=False)
    with running(private) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        assert_error(http.get("/metrics"), 401, "admin_token_invalid")
        assert_error(http.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
        metrics = http.get("/metrics", headers=ADMIN_HEADERS)
        assert metrics.status_code == 200
        assert "waitroom_http_requests_total" in metrics.text
        # A load balancer still gets its answer, without the names of what is behind it.
        plain = http.get("/readyz")
        assert (plain.status_code, plain.json()) == (200, {"status": "ready", "checks": {}})
        detailed = http.get("/readyz", headers=ADMIN_HEADERS)
        assert detailed.json() == {"status": "ready", "checks": {"redis": "ok", "postgresql": "ok"}}
        assert_error(http.get("/readyz", headers={"Authorization": "Bearer wrong"}), 401)


def test_private_readyz_says_not_ready_without_naming_the_dependency(settings: Settings) -> None:
    down = msgspec.structs.replace(
        settings, metrics_public=False, redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    with running(down) as server:
        response = httpx.get(server.url + "/readyz", timeout=10)
    error = assert_error(response, 503, "not_ready")
    assert error["message"] == "not ready"
    assert "redis" not in response.text


def test_operators_see_metrics_and_readiness_details_while_redis_is_down(
    settings: Settings,
) -> None:
    down = msgspec.structs.replace(
        settings,
        metrics_public=False,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        dependency_timeout_s=0.5,
    )
    with running(down) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/metrics", headers=ADMIN_HEADERS).status_code == 200
        detailed = http.get("/readyz", headers=ADMIN_HEADERS)
        error = assert_error(detailed, 503, "not_ready")
        assert error["details"]["checks"] == {"redis": "down", "postgresql": "ok"}
        # The throttle cannot count without Redis, but a wrong token is still no token.
        assert_error(http.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
