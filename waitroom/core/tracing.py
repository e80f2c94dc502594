"""OpenTelemetry traces, optional: on only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

:func:`configure_tracing` runs once at the process edge (the server's app factory, the
workers' command). Until it has, and after :func:`shutdown_tracing`, :func:`span` returns one
shared null object: no span, no context, no allocation, so the hot paths cost a global
lookup and a call with tracing off. On, spans go through the SDK's batch processor (a
background thread) to the OTLP/HTTP exporter, which reads the standard ``OTEL_*`` variables
(headers, timeouts, ``.../v1/traces`` appended to the endpoint).

The provider is ours, not the SDK's global one: a process (or a test) may configure and shut
tracing down more than once, which the global provider refuses.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"

_propagator = TraceContextTextMapPropagator()


class SpanLike(Protocol):
    """What instrumented code may do with the span it is in (a real span or the null one)."""

    def set_attribute(self, key: str, value: Any) -> None: ...

    def update_name(self, name: str) -> None: ...


class _NullSpan:
    """The span of code running with tracing off: its own context manager, doing nothing."""

    __slots__ = ()

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def update_name(self, name: str) -> None:
        return None


NULL_SPAN = _NullSpan()

#: The tracer while tracing is on, else None (checked by every call below).
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def enabled() -> bool:
    """Whether tracing is on in this process."""
    return _tracer is not None


def configure_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; whether it is on."""
    global _tracer, _provider
    env = os.environ if environ is None else environ
    endpoint = env.get(ENDPOINT_VARIABLE, "").strip()
    if not endpoint or _tracer is not None:
        return _tracer is not None
    # Imported here: the exporter pulls in requests and protobuf, which a process with
    # tracing off never needs.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    name = env.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    _provider = provider
    _tracer = provider.get_tracer("waitroom")
    return True


def flush_tracing(timeout_ms: int = 5000) -> None:
    """Export every finished span now (tests, and before a process exits)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def shutdown_tracing() -> None:
    """Export what is left and turn tracing off."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def span(
    name: str, links: Sequence[Link] | None = None, **attributes: Any
) -> AbstractContextManager[SpanLike]:
    """A span named ``name``, child of the current one; the shared null span when off."""
    tracer = _tracer
    if tracer is None:
        return NULL_SPAN
    return tracer.start_as_current_span(name, attributes=attributes, links=links)


def server_span(
    name: str, headers: Iterable[tuple[bytes, bytes]]
) -> AbstractContextManager[SpanLike]:
    """The span of one request, continuing the client's W3C ``traceparent`` when it sent one."""
    tracer = _tracer
    if tracer is None:
        return NULL_SPAN
    carrier: dict[str, str] = {}
    for key, value in headers:
        if key in (b"traceparent", b"tracestate"):
            carrier[key.decode()] = value.decode("latin-1")
    parent = _propagator.extract(carrier) if carrier else otel_context.Context()
    return tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER)


def detached() -> contextvars.Context:
    """A copy of the current context outside any span, for a task that outlives the caller
    (an actor started by the first ask must not run inside that ask's span for good)."""
    copy = contextvars.copy_context()
    if _tracer is not None:
        copy.run(otel_context.attach, otel_context.Context())
    return copy


def current_link() -> Link | None:
    """A link to the current span (for work done later in another task), or None."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return Link(context) if context.is_valid else None


def recording() -> bool:
    """Whether the current span is recorded (tracing on, inside a span, sampled in): only
    then is it worth keeping its ``traceparent`` for a later link."""
    return _tracer is not None and trace.get_current_span().is_recording()


def traceparent() -> str:
    """The current span as a W3C ``traceparent`` value, or "" (tracing off, or no span)."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def link_from(value: str) -> Link | None:
    """A link to the span a ``traceparent`` value names, or None (off, empty or malformed)."""
    if _tracer is None or not value:
        return None
    context = trace.get_current_span(_propagator.extract({"traceparent": value}))
    span_context = context.get_span_context()
    return Link(span_context) if span_context.is_valid else None


def add_links(values: Iterable[str | None]) -> int:
    """Link the current span to the spans these ``traceparent`` values name (empty, None or
    malformed ones skipped); how many were linked. The SDK keeps at most 128 links a span."""
    if _tracer is None:
        return 0
    current = trace.get_current_span()
    linked = 0
    for value in values:
        link = link_from(value or "")
        if link is not None:
            current.add_link(link.context)
            linked += 1
    return linked


def current_ids() -> tuple[str, str] | None:
    """The current trace and span ids in hex, or None outside any (recorded) span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
