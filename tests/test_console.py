"""The operators' console API: the live stream of a sale and the audit trail (issue 16, item 5).

The module's server runs without admission loops (tests/conftest.py): fans who join stay in
line, so the stream's figures are exactly what the tests put there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.admission.support import create_event, join, wait_for
from tests.harness import ADMIN_TOKEN, ServerThread, run_cli
from tests.test_errors import ADMIN, assert_error
from waitroom import console
from waitroom.core.settings import Settings

BAD_TOKENS = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {ADMIN_TOKEN}"},
    {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
]

Event = tuple[str, Any]


def parse_block(block: str) -> Event | None:
    """``(event type, decoded data)`` of one Server-Sent Event, None for a bare field block."""
    kind, data = "message", []
    for line in block.split("\n"):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
    return (kind, json.loads("\n".join(data))) if data else None


class Stream:
    """An open live stream, read event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.raw = ""
        self._chunks = response.iter_text()
        self._buffer = ""

    def next(self) -> Event:
        while "\n\n" not in self._buffer:
            chunk = next(self._chunks)
            self.raw += chunk
            self._buffer += chunk
        block, self._buffer = self._buffer.split("\n\n", 1)
        event = parse_block(block)
        return event if event is not None else self.next()

    def sample_where(self, predicate: Any, limit: int = 15) -> dict[str, Any]:
        """The first ``sample`` (within ``limit`` events) that ``predicate`` accepts."""
        for _ in range(limit):
            kind, data = self.next()
            if kind == "sample" and predicate(data):
                sample: dict[str, Any] = data
                return sample
        raise AssertionError(f"no such sample in {limit} events")


@contextmanager
def live(server: ServerThread, event_id: str) -> Iterator[Stream]:
    with (
        httpx.Client(base_url=server.url, headers=ADMIN, timeout=httpx.Timeout(10, read=5)) as c,
        c.stream("GET", f"/v1/admin/events/{event_id}/live") as response,
    ):
        assert response.status_code == 200, response.read()
        yield Stream(response)


def wait_for_no_streams() -> None:
    """Streams of earlier tests are closed (their slots given back) before a test counts."""
    wait_for(lambda: console.SLOTS.open == 0, timeout=10)


# --- the live stream -----------------------------------------------------------------------------


@pytest.mark.parametrize("headers", BAD_TOKENS)
def test_the_live_stream_needs_an_operators_token(
    client: httpx.Client, admin: httpx.Client, headers: dict[str, str]
) -> None:
    event_id = create_event(admin, prefix="con")
    response = client.get(f"/v1/admin/events/{event_id}/live", headers=headers)
    assert_error(response, 401, "admin_token_invalid")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("event_id", ["no-such-event", "Not_An_Id", "x" * 70])
def test_an_unknown_event_has_neither_stream_nor_audit_trail(
    admin: httpx.Client, event_id: str
) -> None:
    assert_error(admin.get(f"/v1/admin/events/{event_id}/live"), 404, "event_not_found")
    assert_error(admin.get(f"/v1/admin/events/{event_id}/audit"), 404, "event_not_found")


def test_the_stream_sends_the_sale_once_a_second_as_it_changes(
    server: ServerThread, client: httpx.Client, admin: httpx.Client
) -> None:
    event_id = create_event(admin, rate=7.5, max_active=40, quantity=120, prefix="con")
    with live(server, event_id) as stream:
        headers = stream.response.headers
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-store"
        assert headers["x-accel-buffering"] == "no"
        kind, first = stream.next()
        assert stream.raw.startswith(f"retry: {console.RETRY_MS}\n")
        assert kind == "sample" and first["seq"] == 1
        a = first["admission"]
        assert a["event_id"] == event_id and a["fans_waiting"] == 0
        assert (a["rate_per_second"], a["max_active"], a["paused"]) == (7.5, 40, False)
        assert first["ticket_types"] == [
            {"name": "ga", "quantity": 120, "held": 0, "sold": 0, "available": 120}
        ]
        assert (first["quantity"], first["held"], first["sold"], first["available"]) == (
            120,
            0,
            0,
            120,
        )

        for _ in range(3):
            join(client, event_id)
        waiting = stream.sample_where(lambda s: s["admission"]["fans_waiting"] == 3)
        assert waiting["seq"] > 1

        paused = admin.patch(
            f"/v1/admin/events/{event_id}/admission",
            json={"paused": True, "rate_per_second": 12},
        )
        assert paused.status_code == 200, paused.text
        now_paused = stream.sample_where(lambda s: s["admission"]["paused"])
        assert now_paused["admission"]["rate_per_second"] == 12
        assert now_paused["admission"]["last_fan_wait_s"] is None  # no estimate while paused

        # One sample a second, whatever the client does: seq counts them, `at` spaces them.
        a, b = stream.sample_where(lambda s: True), stream.sample_where(lambda s: True)
        assert b["seq"] == a["seq"] + 1
        gap = (
            datetime.fromisoformat(b["admission"]["at"])
            - datetime.fromisoformat(a["admission"]["at"])
        ).total_seconds()
        assert 0.7 <= gap <= 2.5, gap


def test_streams_are_bounded_in_number_and_in_time(
    server: ServerThread, admin: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    event_id = create_event(admin, prefix="con")
    wait_for_no_streams()
    monkeypatch.setattr(console, "MAX_STREAMS", 2)
    for _ in range(3):  # refused streams hold no slot
        assert_error(admin.get("/v1/admin/events/no-such-event/live"), 404, "event_not_found")
    assert console.SLOTS.open == 0
    with live(server, event_id) as one, live(server, event_id) as two:
        assert one.next()[0] == two.next()[0] == "sample"
        refused = admin.get(f"/v1/admin/events/{event_id}/live")
        error = assert_error(refused, 429, "too_many_streams")
        assert int(refused.headers["retry-after"]) >= 1 and error["details"]["retry_after_s"] >= 1
    # A client that goes away gives its slot back.
    wait_for_no_streams()

    monkeypatch.setattr(console, "MAX_DURATION_S", 2.5)
    started = time.monotonic()
    with live(server, event_id) as stream:
        events: list[Event] = []
        while not events or events[-1][0] != "end":
            events.append(stream.next())
        assert events[-1] == ("end", {"reason": "max_duration"})
        assert [kind for kind, _ in events[:-1]] == ["sample"] * 3  # at 0, 1 and 2 s
        # ...and the server ends the response.
        with pytest.raises(StopIteration):
            stream.next()
    assert time.monotonic() - started < 6
    wait_for_no_streams()


def test_a_deleted_event_ends_its_streams(
    server: ServerThread, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, prefix="con")
    with live(server, event_id) as stream:
        assert stream.next()[0] == "sample"
        deleted = run_cli(settings, "event", "delete", event_id)
        assert deleted.returncode == 0, deleted.stderr
        events = [stream.next()]
        while events[-1][0] == "sample":
            events.append(stream.next())
        kind, body = events[-1]
        assert kind == "problem" and body["error"]["code"] == "event_not_found"
        assert stream.next() == ("end", {"reason": "event_gone"})


# --- the audit trail -----------------------------------------------------------------------------


@pytest.mark.parametrize("headers", BAD_TOKENS)
def test_the_audit_trail_needs_an_operators_token(
    client: httpx.Client, admin: httpx.Client, headers: dict[str, str]
) -> None:
    event_id = create_event(admin, prefix="con")
    response = client.get(f"/v1/admin/events/{event_id}/audit", headers=headers)
    assert_error(response, 401, "admin_token_invalid")


def test_the_audit_trail_says_who_changed_what_from_where_newest_first(
    admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=10, prefix="con")
    patched = admin.patch(
        f"/v1/admin/events/{event_id}/admission",
        json={"rate_per_second": 25},
        headers={"X-Request-ID": "req-console-audit-1", "X-Forwarded-For": "198.51.100.7"},
    )
    assert patched.status_code == 200, patched.text
    from_cli = run_cli(settings, "admission", "pause", event_id)
    assert from_cli.returncode == 0, from_cli.stderr

    response = admin.get(f"/v1/admin/events/{event_id}/audit")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    page = response.json()
    assert page["event_id"] == event_id and page["next_before"] is None
    paused, rated, created = page["entries"]
    assert [e["action"] for e in page["entries"]] == [
        "admission.update",
        "admission.update",
        "event.create",
    ]
    assert paused["actor"].startswith("cli:") and paused["client_address"] is None
    assert (paused["old"]["paused"], paused["new"]["paused"]) == (False, True)
    assert rated["actor"] == "admin:admin"
    assert rated["client_address"] == "198.51.100.7"
    assert rated["request_id"] == "req-console-audit-1"
    assert (rated["old"]["rate_per_second"], rated["new"]["rate_per_second"]) == (10, 25)
    assert created["new"]["id"] == event_id
    assert paused["id"] > rated["id"] > created["id"]
    assert datetime.fromisoformat(paused["at"]) >= datetime.fromisoformat(created["at"])


def test_the_audit_trail_comes_in_pages(admin: httpx.Client) -> None:
    event_id = create_event(admin, prefix="con")
    for rate in range(1, 6):
        patched = admin.patch(
            f"/v1/admin/events/{event_id}/admission", json={"rate_per_second": rate}
        )
        assert patched.status_code == 200, patched.text
    everything = admin.get(f"/v1/admin/events/{event_id}/audit").json()["entries"]
    assert len(everything) == 6  # created, then five changes

    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 2}
    pages = 0
    while True:
        page = admin.get(f"/v1/admin/events/{event_id}/audit", params=params).json()
        pages += 1
        assert len(page["entries"]) <= 2
        seen += page["entries"]
        if page["next_before"] is None:
            break
        assert page["next_before"] == page["entries"][-1]["id"]
        params["before"] = page["next_before"]
    assert pages == 3 and seen == everything
    assert [e["new"]["rate_per_second"] for e in seen[:5]] == [5, 4, 3, 2, 1]
    # Past the oldest entry: an empty page, not a 404.
    tail = admin.get(f"/v1/admin/events/{event_id}/audit", params={"before": seen[-1]["id"]}).json()
    assert tail["entries"] == [] and tail["next_before"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": console.AUDIT_PAGE_MAX + 1}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1e3"}, "limit"),
        ({"before": 0}, "before"),
        ({"before": "-5"}, "before"),
        ({"before": str(2**63)}, "before"),
    ],
)
def test_bad_paging_is_a_422_naming_the_parameter(
    admin: httpx.Client, params: dict[str, Any], field: str
) -> None:
    event_id = create_event(admin, prefix="con")
    error = assert_error(
        admin.get(f"/v1/admin/events/{event_id}/audit", params=params), 422, "validation_failed"
    )
    assert error["details"]["field"] == field


def test_a_deleted_events_trail_stays_readable(admin: httpx.Client, settings: Settings) -> None:
    event_id = create_event(admin, prefix="con")
    deleted = run_cli(settings, "event", "delete", event_id)
    assert deleted.returncode == 0, deleted.stderr
    assert_error(admin.get(f"/v1/admin/events/{event_id}/live"), 404, "event_not_found")
    entries = admin.get(f"/v1/admin/events/{event_id}/audit").json()["entries"]
    assert [e["action"] for e in entries] == ["event.delete", "event.create"]


# --- described in the API's document --------------------------------------------------------


def test_the_openapi_document_describes_both_routes(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    stream = paths["/v1/admin/events/{event_id}/live"]["get"]
    trail = paths["/v1/admin/events/{event_id}/audit"]["get"]
    for op in (stream, trail):
        assert op["security"] == [{"admin": []}] and "operators" in op["tags"]
        assert {"401", "404", "429", "503"} <= set(op["responses"])
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert "422" in trail["responses"]
    query = {p["name"]: p for p in trail["parameters"] if p["in"] == "query"}
    assert query["limit"]["schema"]["maximum"] == console.AUDIT_PAGE_MAX
    assert query["before"]["schema"]["minimum"] == 1
