"""The whole API fuzzed from its own OpenAPI document (schemathesis), against a real server.

Every operation of ``/openapi.json`` gets requests generated from its declared parameters
and body, both ones that fit the document (positive) and ones that break it (negative: ids
off their pattern, wrong types, missing fields), once with generated ids and once with the
id of a real event (so that the requests get past the 404 and into Redis and PostgreSQL).
Operators' routes carry the admin token, the fans' a real visitor token. Whatever comes
back: never a 5xx, and every error is the documented body with a status the operation
documents. Bounded: a few examples per operation and mode, and a time budget for all.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hyp_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from tests.admission.support import create_event, join
from tests.harness import ServerThread, running
from tests.test_errors import ADMIN
from waitroom.core.errors import ErrorBody
from waitroom.core.settings import Settings

#: Examples per operation, generation mode and kind of ids.
EXAMPLES = 12
#: Wall-clock budget of the whole fuzz run (the test stops generating past it).
BUDGET_S = 50.0
#: Ids the generator seldom comes up with, sent as every path parameter of every route
#: (with generated everything else): the forms that once reached PostgreSQL and gave 500s.
HOSTILE_IDS = ("\x00", "a\x00b", "evt-1\n", "x" * 2000, "\u00e9v\u00e9nement", "a}b{c", "..")

_error_decoder = msgspec.json.Decoder(ErrorBody)


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[ServerThread]:
    """A server of its own: the fuzzer changes admission settings and fills lines."""
    with running(settings) as srv:
        yield srv


def _header(response: Any, name: str) -> str:
    """A header of a schemathesis response (its headers map names to lists of values)."""
    for key, values in response.headers.items():
        if key.lower() == name:
            return str(values[0]) if isinstance(values, list) else str(values)
    return ""


def _problem(response: Any, documented: set[str]) -> str | None:
    """What is wrong with ``response``, or None."""
    status = response.status_code
    if status >= 500:
        return f"server error {status}: {response.text[:300]}"
    if status < 400:
        return None
    if status not in (405,) and str(status) not in documented:
        return f"undocumented status {status}: {response.text[:300]}"
    content_type = _header(response, "content-type")
    if not content_type.startswith("application/json"):
        return f"error {status} is not JSON: {content_type!r}"
    try:
        body = _error_decoder.decode(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return f"error {status} without the documented body ({exc}): {response.text[:300]}"
    if not body.error.code or not body.error.message:
        return f"error {status} with an empty code or message: {response.text[:300]}"
    if status in (429, 503) and not _header(response, "retry-after"):
        return f"{status} without Retry-After"
    return None


def _fuzz(
    strategy: Any,
    base_url: str,
    headers: dict[str, str],
    documented: set[str],
    label: str,
    problems: dict[str, str],
    deadline: float,
    examples: int,
) -> None:
    """Send the cases of ``strategy``; the first problem found is kept under ``label``."""

    @hyp_settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def probe(case: Any) -> None:
        if label in problems or time.monotonic() > deadline:
            return
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        problem = _problem(response, documented)
        if problem is not None:
            problems[label] = f"{problem}\n    {case.as_curl_command(headers=headers)}"

    # Unsatisfiable: nothing of this operation can be made invalid (no parameters, no body).
    with contextlib.suppress(Unsatisfiable):
        probe()


def test_no_request_the_document_describes_gets_a_5xx_or_an_undocumented_error(
    server: ServerThread,
) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        document: dict[str, Any] = client.get("/openapi.json").json()
        with httpx.Client(base_url=server.url, timeout=10, headers=ADMIN) as admin:
            event_id = create_event(admin, prefix="fuzz")
        _, token = join(client, event_id)
    schema = schemathesis.openapi.from_dict(document)
    fan = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.9"}
    deadline = time.monotonic() + BUDGET_S
    problems: dict[str, str] = {}
    operations = 0

    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        operations += 1
        raw = document["paths"][operation.path][operation.method.lower()]
        if any("text/event-stream" in r.get("content", {}) for r in raw["responses"].values()):
            # A live stream never ends by itself, so a fuzzed request would only wait for its
            # timeout; its refusals are tested in tests/test_console.py.
            continue
        documented = set(raw["responses"])
        headers = ADMIN if "operators" in raw.get("tags", ()) else fan
        names = [p["name"] for p in raw.get("parameters", ()) if p["in"] == "path"]
        variants: list[tuple[GenerationMode, dict[str, str] | None, int]] = []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            variants.append((mode, None, EXAMPLES))
            if "event_id" in names:
                variants.append((mode, {"event_id": event_id}, EXAMPLES))
        variants += [
            (GenerationMode.POSITIVE, dict.fromkeys(names, hostile), 2)
            for hostile in HOSTILE_IDS
            if names
        ]
        for mode, fixed, examples in variants:
            if time.monotonic() > deadline:
                break
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed)
            label = f"{operation.method} {operation.path} {mode.value} {fixed!r}"[:200]
            _fuzz(strategy, server.url, headers, documented, label, problems, deadline, examples)
    assert operations >= 20
    assert not problems, "\n".join(f"{k}: {v}" for k, v in sorted(problems.items()))
    assert time.monotonic() <= deadline + 15, "the fuzz run overran its budget"
