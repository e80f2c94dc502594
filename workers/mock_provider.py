"""A mock payment provider: its own small HTTP service, so payments take the real code path.

Run it with ``python -m workers.mock_provider --host 127.0.0.1 --port 8090``; tests start
:func:`create_app` in-process on port 0. It keeps everything in memory.

API (JSON; errors use waitroom's error body):

- ``POST /v1/charges`` ``{"amount_minor", "currency", "method", "reference"}`` with the header
  ``Idempotency-Key`` (required) → 201 ``{"id", "status": "succeeded"|"declined",
  "amount_minor", "currency", "reference", "refunded"}``. The same key again answers the same
  charge with 200 and never charges twice; the same key with a different body is 422
  ``idempotency_key_reused``. A declined charge is recorded too, so its key stays declined.
- ``GET /v1/charges/{id}`` → the charge.
- ``GET /v1/charges?idempotency_key=KEY`` → the charge made under ``KEY`` (declined ones
  included), or 404 ``charge_not_found`` when no request under it has charged (yet: a request
  still in flight may charge later, so a reconciler asks only once its own requests are long
  over). What real providers offer to find out what a request whose answer was lost did.
- ``POST /v1/refunds`` ``{"charge_id"}`` → 201 ``{"id", "charge_id", "amount_minor", "status"}``;
  a charge is refunded at most once (a second refund answers the first with 200).
- ``POST /v1/refunds`` ``{"charge_id", "amount_minor"}`` with ``Idempotency-Key`` (required
  then): a partial refund, any number per charge while they sum to at most the charge (409
  ``refund_exceeds_charge`` past it). The same key again answers the same refund with 200 and
  never refunds twice; the same key with a different body is 422 ``idempotency_key_reused``.
  A charge refunded in full this way counts as refunded.
- ``GET /v1/refunds?idempotency_key=KEY`` → the refund made under ``KEY``, or 404
  ``refund_not_found``: how a refund whose answer was lost is reconciled.
- ``GET /v1/stats`` → counts that let tests prove no double charge: ``charges``,
  ``succeeded``, ``declined``, ``refunds``, ``attempts`` (requests per idempotency key),
  ``captured_by_reference`` (succeeded, unrefunded charges per reference),
  ``refunds_by_reference`` and ``lookups`` (charges looked up by key), ``refund_attempts``
  (partial refund requests per key) and ``refunded_minor_by_reference`` (money given back).
- ``GET|POST /v1/control`` → read or replace the behaviour (fields of :class:`Control`):
  latency, random decline / error (503) / hang rates, methods that always decline, and for
  partial refunds ``refund_errors`` (the next N requests answer 503 without refunding) and
  ``refund_hangs`` (the next N requests refund, or find their refund, then hang).

Deterministic payment methods, for tests, acting on the *first* request of a key only:

- ``card_declined``: always declines (every request, not just the first).
- ``card_errors_once``: the first request answers 503 without charging.
- ``card_hangs_once``: the first request charges, then hangs far past any client timeout
  (until the client gives up or ``hang_s`` passes): the charge went through but its answer
  was lost, which is exactly what an idempotent retry must survive.
- ``card_slow``: sleeps ``slow_ms`` before answering (each request).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec
import uvicorn
from msgspec import Meta
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from waitroom.core.errors import (
    BadRequest,
    Conflict,
    NotFound,
    Unavailable,
    ValidationFailed,
    WaitroomError,
)
from waitroom.core.http import JSONResponse, decode_json, error_response, read_body
from waitroom.core.logs import configure_logging

log = logging.getLogger("waitroom.mock_provider")

MAX_BODY = 16 * 1024
Rate = Annotated[float, Meta(ge=0.0, le=1.0)]


class ChargeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/charges``."""

    amount_minor: Annotated[int, Meta(ge=0)]
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")]
    method: Annotated[str, Meta(min_length=1, max_length=100)]
    reference: Annotated[str, Meta(max_length=200)] = ""


class Charge(msgspec.Struct, frozen=True):
    """A charge as the provider answers it."""

    id: str
    status: Literal["succeeded", "declined"]
    amount_minor: int
    currency: str
    reference: str
    method: str
    refunded: bool = False


class RefundRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/refunds``; with ``amount_minor``, a partial refund (keyed)."""

    charge_id: Annotated[str, Meta(min_length=1, max_length=100)]
    amount_minor: Annotated[int, Meta(ge=1)] | None = None


class Refund(msgspec.Struct, frozen=True):
    """A refund of a whole charge."""

    id: str
    charge_id: str
    amount_minor: int
    status: Literal["succeeded"] = "succeeded"


class Control(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the provider behaves; ``POST /v1/control`` replaces it as a whole."""

    #: Added to every charge and refund request.
    latency_ms: Annotated[int, Meta(ge=0, le=600_000)] = 0
    #: Share of new charges that are declined.
    decline_rate: Rate = 0.0
    #: Share of requests answered 503 without doing anything.
    error_rate: Rate = 0.0
    #: Share of new charges that are made, then answered only after ``hang_s``.
    hang_rate: Rate = 0.0
    #: How long a hanging request hangs unless its client gives up first.
    hang_s: Annotated[float, Meta(gt=0, le=3600)] = 300.0
    #: Delay of the ``card_slow`` method.
    slow_ms: Annotated[int, Meta(ge=0, le=600_000)] = 1_000
    #: Methods that always decline (besides ``card_declined``).
    decline_methods: tuple[str, ...] = ()
    #: Seed of the random draws of the rates (None: unpredictable).
    seed: int | None = None
    #: The next N partial refund requests answer 503 without refunding.
    refund_errors: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    #: The next N partial refund requests refund (or find their refund), then hang.
    refund_hangs: Annotated[int, Meta(ge=0, le=1_000_000)] = 0


class Stats(msgspec.Struct, frozen=True):
    """Body of ``GET /v1/stats``."""

    charges: int
    succeeded: int
    declined: int
    refunds: int
    #: Charge requests received per idempotency key, errors and replays included.
    attempts: dict[str, int]
    #: Succeeded, unrefunded charges per reference: more than 1 is a double charge.
    captured_by_reference: dict[str, int]
    #: Requests of ``GET /v1/charges?idempotency_key=``.
    lookups: int = 0
    #: Refunds per reference.
    refunds_by_reference: dict[str, int] = {}
    #: Partial refund requests received per idempotency key, errors and replays included.
    refund_attempts: dict[str, int] = {}
    #: Money given back per reference (whole and partial refunds).
    refunded_minor_by_reference: dict[str, int] = {}


@dataclass
class Provider:
    """The provider's in-memory state. Only touched from the event loop, so it needs no lock."""

    control: Control = field(default_factory=Control)
    rng: random.Random = field(default_factory=random.Random)
    charges: dict[str, Charge] = field(default_factory=dict)
    by_key: dict[str, tuple[ChargeRequest, str]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    refunds: dict[str, Refund] = field(default_factory=dict)  # by charge id
    lookups: int = 0
    #: Partial refunds by idempotency key, with the request that made each.
    partial: dict[str, tuple[RefundRequest, Refund]] = field(default_factory=dict)
    refund_attempts: dict[str, int] = field(default_factory=dict)
    refund_errors_left: int = 0
    refund_hangs_left: int = 0

    def configure(self, control: Control) -> None:
        self.control = control
        self.rng = random.Random(control.seed)
        self.refund_errors_left = control.refund_errors
        self.refund_hangs_left = control.refund_hangs

    def refunded_minor(self, charge_id: str) -> int:
        """Money given back of one charge so far."""
        whole = self.refunds.get(charge_id)
        given = sum(r.amount_minor for _, r in self.partial.values() if r.charge_id == charge_id)
        return given + (whole.amount_minor if whole is not None else 0)

    def stats(self) -> Stats:
        captured: dict[str, int] = {}
        refunded: dict[str, int] = {}
        for charge in self.charges.values():
            if charge.status == "succeeded" and not charge.refunded:
                captured[charge.reference] = captured.get(charge.reference, 0) + 1
            if charge.refunded:
                refunded[charge.reference] = refunded.get(charge.reference, 0) + 1
        return Stats(
            charges=len(self.charges),
            succeeded=sum(c.status == "succeeded" for c in self.charges.values()),
            declined=sum(c.status == "declined" for c in self.charges.values()),
            refunds=len(self.refunds) + len(self.partial),
            attempts=dict(self.attempts),
            captured_by_reference=captured,
            lookups=self.lookups,
            refunds_by_reference=refunded,
            refund_attempts=dict(self.refund_attempts),
            refunded_minor_by_reference=self._refunded_by_reference(),
        )

    def _refunded_by_reference(self) -> dict[str, int]:
        given: dict[str, int] = {}
        for refund in [*self.refunds.values(), *(r for _, r in self.partial.values())]:
            reference = self.charges[refund.charge_id].reference
            given[reference] = given.get(reference, 0) + refund.amount_minor
        return given


def _provider(request: Request) -> Provider:
    provider: Provider = request.app.state.provider
    return provider


async def _pause(control: Control, method: str | None = None) -> None:
    delay_ms = control.latency_ms + (control.slow_ms if method == "card_slow" else 0)
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)


async def _hang(request: Request, seconds: float) -> None:
    """Sleep ``seconds``, or until the client has hung up (so shutdown is never held up)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if await request.is_disconnected():
            return


def _unavailable() -> Unavailable:
    return Unavailable("the provider is temporarily unavailable", retry_after=1)


async def create_charge(request: Request) -> Response:
    """``POST /v1/charges``: charge once per ``Idempotency-Key``."""
    provider = _provider(request)
    key = request.headers.get("idempotency-key", "").strip()
    if not key or len(key) > 200:
        raise BadRequest(
            "send an Idempotency-Key header (1-200 characters)", code="idempotency_key_missing"
        )
    body = decode_json(await read_body(request, MAX_BODY), ChargeRequest)
    attempt = provider.attempts[key] = provider.attempts.get(key, 0) + 1
    control = provider.control
    await _pause(control, body.method)
    first = attempt == 1
    if (body.method == "card_errors_once" and first) or provider.rng.random() < control.error_rate:
        raise _unavailable()
    known = provider.by_key.get(key)
    if known is not None:
        if known[0] != body:
            raise ValidationFailed(
                "this Idempotency-Key was used for a different charge",
                code="idempotency_key_reused",
            )
        return JSONResponse(provider.charges[known[1]], status_code=200)
    declined = (
        body.method == "card_declined"
        or body.method in control.decline_methods
        or provider.rng.random() < control.decline_rate
    )
    charge = Charge(
        id="ch_" + secrets.token_hex(12),
        status="declined" if declined else "succeeded",
        amount_minor=body.amount_minor,
        currency=body.currency,
        reference=body.reference,
        method=body.method,
    )
    provider.charges[charge.id] = charge
    provider.by_key[key] = (body, charge.id)
    if (body.method == "card_hangs_once" and first) or provider.rng.random() < control.hang_rate:
        await _hang(request, control.hang_s)
    return JSONResponse(charge, status_code=201)


async def find_charge(request: Request) -> Response:
    """``GET /v1/charges?idempotency_key=KEY``: the charge a key made, if any."""
    provider = _provider(request)
    key = request.query_params.get("idempotency_key", "").strip()
    if not key or len(key) > 200:
        raise BadRequest(
            "give the idempotency_key query parameter (1-200 characters)",
            code="idempotency_key_missing",
        )
    provider.lookups += 1
    control = provider.control
    await _pause(control)
    if provider.rng.random() < control.error_rate:
        raise _unavailable()
    known = provider.by_key.get(key)
    if known is None:
        raise NotFound("no charge was made with this key", code="charge_not_found")
    return JSONResponse(provider.charges[known[1]])


async def get_charge(request: Request) -> Response:
    """``GET /v1/charges/{id}``."""
    charge = _provider(request).charges.get(request.path_params["charge_id"])
    if charge is None:
        raise NotFound("no such charge", code="charge_not_found")
    return JSONResponse(charge)


async def create_refund(request: Request) -> Response:
    """``POST /v1/refunds``: refund a whole succeeded charge, at most once."""
    provider = _provider(request)
    body = decode_json(await read_body(request, MAX_BODY), RefundRequest)
    if body.amount_minor is not None:
        return await _partial_refund(request, provider, body)
    control = provider.control
    await _pause(control)
    if provider.rng.random() < control.error_rate:
        raise _unavailable()
    charge = provider.charges.get(body.charge_id)
    if charge is None:
        raise NotFound("no such charge", code="charge_not_found")
    done = provider.refunds.get(charge.id)
    if done is not None:
        return JSONResponse(done, status_code=200)
    if charge.status != "succeeded":
        raise Conflict("a declined charge has nothing to refund", code="charge_declined")
    # Whatever partial refunds gave back already is not given twice.
    left = charge.amount_minor - provider.refunded_minor(charge.id)
    if left <= 0:
        raise Conflict("this charge was refunded in full", code="refund_exceeds_charge")
    refund = Refund(id="re_" + secrets.token_hex(12), charge_id=charge.id, amount_minor=left)
    provider.refunds[charge.id] = refund
    provider.charges[charge.id] = msgspec.structs.replace(charge, refunded=True)
    return JSONResponse(refund, status_code=201)


async def _partial_refund(request: Request, provider: Provider, body: RefundRequest) -> Response:
    """A partial refund under an ``Idempotency-Key``: at most once per key."""
    key = request.headers.get("idempotency-key", "").strip()
    if not key or len(key) > 200:
        raise BadRequest(
            "send an Idempotency-Key header (1-200 characters)", code="idempotency_key_missing"
        )
    provider.refund_attempts[key] = provider.refund_attempts.get(key, 0) + 1
    control = provider.control
    await _pause(control)
    if provider.refund_errors_left > 0:
        provider.refund_errors_left -= 1
        raise _unavailable()
    known = provider.partial.get(key)
    if known is not None:
        if known[0] != body:
            raise ValidationFailed(
                "this Idempotency-Key was used for a different refund",
                code="idempotency_key_reused",
            )
        await _maybe_hang(request, provider)
        return JSONResponse(known[1], status_code=200)
    charge = provider.charges.get(body.charge_id)
    if charge is None:
        raise NotFound("no such charge", code="charge_not_found")
    if charge.status != "succeeded":
        raise Conflict("a declined charge has nothing to refund", code="charge_declined")
    assert body.amount_minor is not None
    left = charge.amount_minor - provider.refunded_minor(charge.id)
    if body.amount_minor > left:
        raise Conflict(
            "the refunds of this charge would give back more than it took",
            code="refund_exceeds_charge",
            details={"left_minor": left},
        )
    refund = Refund(
        id="re_" + secrets.token_hex(12), charge_id=charge.id, amount_minor=body.amount_minor
    )
    provider.partial[key] = (body, refund)
    if body.amount_minor == left:
        provider.charges[charge.id] = msgspec.structs.replace(charge, refunded=True)
    await _maybe_hang(request, provider)
    return JSONResponse(refund, status_code=201)


async def _maybe_hang(request: Request, provider: Provider) -> None:
    """The refund is made; its answer is lost (the client gives up first), while hangs last."""
    if provider.refund_hangs_left > 0:
        provider.refund_hangs_left -= 1
        await _hang(request, provider.control.hang_s)


async def find_refund(request: Request) -> Response:
    """``GET /v1/refunds?idempotency_key=KEY``: the partial refund a key made, if any."""
    provider = _provider(request)
    key = request.query_params.get("idempotency_key", "").strip()
    if not key or len(key) > 200:
        raise BadRequest(
            "give the idempotency_key query parameter (1-200 characters)",
            code="idempotency_key_missing",
        )
    provider.lookups += 1
    known = provider.partial.get(key)
    if known is None:
        raise NotFound("no refund was made with this key", code="refund_not_found")
    return JSONResponse(known[1])


async def stats(request: Request) -> Response:
    """``GET /v1/stats``."""
    return JSONResponse(_provider(request).stats())


async def behaviour(request: Request) -> Response:
    """``GET /v1/control`` reads the behaviour; ``POST`` replaces it (absent fields: defaults)."""
    provider = _provider(request)
    if request.method == "POST":
        provider.configure(decode_json(await read_body(request, MAX_BODY), Control))
        log.info("behaviour changed", extra={"control": msgspec.to_builtins(provider.control)})
    return JSONResponse(provider.control)


async def _on_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WaitroomError)
    return error_response(exc)


def create_app(control: Control | None = None) -> Starlette:
    """The provider as an ASGI app with fresh state (``app.state.provider``)."""
    app = Starlette(
        routes=[
            Route("/v1/charges", create_charge, methods=["POST"]),
            Route("/v1/charges", find_charge, methods=["GET"]),
            Route("/v1/charges/{charge_id}", get_charge, methods=["GET"]),
            Route("/v1/refunds", create_refund, methods=["POST"]),
            Route("/v1/refunds", find_refund, methods=["GET"]),
            Route("/v1/stats", stats, methods=["GET"]),
            Route("/v1/control", behaviour, methods=["GET", "POST"]),
        ],
        exception_handlers={WaitroomError: _on_error},
    )
    provider = Provider()
    provider.configure(control or Control())
    app.state.provider = provider
    return app


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m workers.mock_provider``."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.mock_provider", description="waitroom's mock payment provider"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--latency-ms", type=int, default=0, help="added to every request")
    parser.add_argument("--decline-rate", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--hang-rate", type=float, default=0.0)
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the provider until interrupted."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    start = msgspec.convert(
        {
            "latency_ms": args.latency_ms,
            "decline_rate": args.decline_rate,
            "error_rate": args.error_rate,
            "hang_rate": args.hang_rate,
        },
        Control,
    )
    uvicorn.run(
        create_app(start),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
