"""Traces and logs of a sale: join → admission → reserve → actor commit → payment → paid.

Tracing is configured through the same call as the server's (waitroom.core.tracing) and
exports over OTLP/HTTP to a real receiver in this process that decodes the protobuf; the
server, the payment workers and the mock provider are the module's real ones.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.admission.support import create_event, join
from tests.checkout.test_checkout import Fan
from tests.queue_support import new_ip
from waitroom.core import tracing
from waitroom.core.logs import JSONFormatter


class Span:
    """One received span, ids in hex."""

    def __init__(self, raw: Any) -> None:
        self.name: str = raw.name
        self.trace_id = raw.trace_id.hex()
        self.span_id = raw.span_id.hex()
        self.parent_id = raw.parent_span_id.hex()
        self.links = [(link.trace_id.hex(), link.span_id.hex()) for link in raw.links]
        self.attributes = {a.key: a.value for a in raw.attributes}


class Receiver:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) on a free port."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.paths: list[str] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    receiver.paths.append(self.path)
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            receiver.spans.extend(Span(s) for s in scope.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Lines(logging.Handler):
    """The JSON log lines written while it is attached, formatted as the server formats them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JSONFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    value = Receiver()
    try:
        yield value
    finally:
        tracing.shutdown_tracing()
        value.close()


@pytest.fixture
def lines() -> Iterator[Lines]:
    """Every request's access line (DEBUG) of the server, captured as JSON."""
    handler = Lines()
    logger = logging.getLogger("waitroom.core.http")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def wait_for_spans(receiver: Receiver, *names: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tracing.flush_tracing()
        if all(receiver.named(name) for name in names):
            return
        time.sleep(0.2)
    seen = sorted({s.name for s in receiver.spans})
    raise AssertionError(f"spans {names} not all exported; seen {seen}")


def test_with_tracing_on_a_sale_is_one_trace_per_request_with_the_actor_and_payment_linked(
    client: httpx.Client, admin: httpx.Client, receiver: Receiver, lines: Lines
) -> None:
    assert tracing.configure_tracing("waitroom-test", {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    event_id = create_event(admin, rate=50, quantity=10, prefix="tr")

    # A join continuing the client's own trace (W3C traceparent).
    client_trace, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    joined = client.post(
        f"/v1/events/{event_id}/queue",
        headers={"traceparent": f"00-{client_trace}-{client_span}-01", "X-Forwarded-For": new_ip()},
    )
    assert joined.status_code == 201, joined.text
    client.cookies.clear()

    fan = Fan(client, event_id)
    fan.wait_for_pass()
    reserved = fan.reserve(quantity=1)
    assert reserved.status_code == 201, reserved.text
    hold = reserved.json()
    assert fan.confirm(hold["id"]).status_code == 202
    fan.wait_until(hold["id"], lambda r: r["order_status"] == "paid")

    wait_for_spans(
        receiver,
        "POST /v1/events/{event_id}/queue",
        "POST /v1/events/{event_id}/reservations",
        "inventory.ask",
        "inventory.commit",
        "admission.admit",
        "payment.attempt",
        "POST /v1/reservations/{reservation_id}/confirm",
    )
    assert set(receiver.paths) == {"/v1/traces"}
    by_id = {s.span_id: s for s in receiver.spans}

    (continued,) = [
        s for s in receiver.named("POST /v1/events/{event_id}/queue") if s.trace_id == client_trace
    ]
    assert continued.parent_id == client_span
    assert continued.attributes["http.route"].string_value == "/v1/events/{event_id}/queue"

    (reserve,) = receiver.named("POST /v1/events/{event_id}/reservations")
    asks = [s for s in receiver.named("inventory.ask") if s.parent_id == reserve.span_id]
    assert len(asks) == 1 and asks[0].trace_id == reserve.trace_id
    commits = [
        s
        for s in receiver.named("inventory.commit")
        if (asks[0].trace_id, asks[0].span_id) in s.links
    ]
    assert len(commits) == 1, "the group commit links to the ask it made durable"

    # The admission tick that admitted each fan links to the fan's join, in another task
    # (the event's admission loop) and another trace.
    joins = receiver.named("POST /v1/events/{event_id}/queue")
    assert len(joins) == 2
    admits = receiver.named("admission.admit")
    for join_span in joins:
        linking = [a for a in admits if (join_span.trace_id, join_span.span_id) in a.links]
        assert len(linking) == 1, "the tick that admitted the fan links to the fan's join"
        assert linking[0].trace_id != join_span.trace_id

    # The payment worker's attempt: the inventory ask that marks the hold paid is its child.
    attempts = [s for s in receiver.named("payment.attempt") if s.attributes["outcome"]]
    assert attempts and attempts[0].attributes["outcome"].string_value == "succeeded"
    paid_asks = [s for s in receiver.named("inventory.ask") if s.parent_id == attempts[0].span_id]
    assert paid_asks and all(by_id.get(s.parent_id) is attempts[0] for s in paid_asks)
    # ... and links to the confirm request that asked for the payment.
    (confirm,) = receiver.named("POST /v1/reservations/{reservation_id}/confirm")
    assert (confirm.trace_id, confirm.span_id) in attempts[0].links

    # The access log line of the reservation carries its trace and span ids.
    (reserve_line,) = [
        line
        for line in lines.lines
        if line["msg"] == "request" and line["route"] == "/v1/events/{event_id}/reservations"
    ]
    assert reserve_line["trace_id"] == reserve.trace_id
    assert reserve_line["span_id"] == reserve.span_id
    join_lines = [
        line
        for line in lines.lines
        if line["msg"] == "request" and line.get("trace_id") == client_trace
    ]
    assert len(join_lines) == 1


def test_with_tracing_off_nothing_is_exported_and_log_lines_carry_no_trace_id(
    client: httpx.Client, admin: httpx.Client, receiver: Receiver, lines: Lines
) -> None:
    assert not tracing.configure_tracing("waitroom-test", {})
    assert not tracing.enabled()
    assert tracing.span("anything", key=1) is tracing.NULL_SPAN
    event_id = create_event(admin, rate=50, quantity=10, prefix="tr")
    join(client, event_id)
    joined = client.post(
        f"/v1/events/{event_id}/queue",
        headers={
            "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
            "X-Forwarded-For": new_ip(),
        },
    )
    assert joined.status_code == 201, joined.text
    client.cookies.clear()
    tracing.flush_tracing()
    time.sleep(0.6)  # longer than the batch processor's delay, had one been running
    assert receiver.spans == [] and receiver.paths == []
    requests = [line for line in lines.lines if line["msg"] == "request"]
    assert len(requests) >= 2
    assert all(line["trace_id"] is None and line["span_id"] is None for line in requests)
