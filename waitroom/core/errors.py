"""The one exception tree of waitroom and the error body it maps to.

Every failure a client can cause or see is a :class:`WaitroomError`. Each subclass fixes the
HTTP status; the instance carries a stable machine-readable ``code`` (``sold_out``,
``pass_expired``...), a human message and optional ``details``. The HTTP layer renders any of
them as ``{"error": {"code", "message", "details"}}``; the CLI prints the message on one line.

Tree (every subclass in the project, wherever it is defined)::

    WaitroomError (500 internal)
    ├── SettingsError            bad WAITROOM_* value; stops the process at start
    ├── SchemaError              database schema behind or drifted; stops the process
    ├── BadRequest (400)         malformed body
    ├── Unauthorized (401)       no or invalid identity / admin token
    ├── Forbidden (403)          missing, invalid, revoked or spent pass
    ├── NotFound (404)           unknown route or id
    ├── MethodNotAllowed (405)
    ├── Conflict (409)           sold out, per-fan limit, already confirmed...
    │   └── PaymentRefused       inventory.orders: a confirm that cannot start a payment
    ├── Gone (410)               expired hold or pass
    ├── PayloadTooLarge (413)
    ├── UnsupportedMediaType (415)
    ├── ValidationFailed (422)   well-formed body with a bad field (``field`` names it)
    ├── Fenced (503)             inventory.store: this process lost the event's ownership
    ├── RateLimited (429)        carries Retry-After
    └── Unavailable (503)        a dependency is down; carries Retry-After
        └── ActorStopped         inventory.actor: the event's actor is not running

Two exceptions stay outside the tree on purpose: ``CLIError`` (waitroom.cli, a usage error
printed as one line) and the payment workers' private ``_Transient``/``_Permanent`` (retry
classification, never shown to a client). Anything else that escapes a handler is a 500 with
a request id, or a 503 when it is a dependency's failure (:func:`waitroom.core.http.dependency_error`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


class ErrorDetail(msgspec.Struct, frozen=True):
    """The inside of an error body."""

    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorBody(msgspec.Struct, frozen=True):
    """``{"error": {...}}``: the body of every 4xx and 5xx answer."""

    error: ErrorDetail


class WaitroomError(Exception):
    """Root of every error waitroom raises on purpose."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        """The error body this error is rendered as."""
        return ErrorBody(ErrorDetail(self.code, self.message, self.details))


class SettingsError(WaitroomError):
    """A ``WAITROOM_*`` variable has a value the process cannot run with."""

    default_code = "bad_setting"

    def __init__(self, message: str, *, variable: str) -> None:
        super().__init__(message, details={"variable": variable})
        self.variable = variable


class SchemaError(WaitroomError):
    """The database's schema does not match this release's migrations; stops the process."""

    default_code = "schema_mismatch"


class BadRequest(WaitroomError):
    status = 400
    default_code = "malformed_body"


class Unauthorized(WaitroomError):
    status = 401
    default_code = "unauthorized"


class Forbidden(WaitroomError):
    status = 403
    default_code = "forbidden"


class NotFound(WaitroomError):
    status = 404
    default_code = "not_found"


class MethodNotAllowed(WaitroomError):
    status = 405
    default_code = "method_not_allowed"


class Conflict(WaitroomError):
    status = 409
    default_code = "conflict"


class Gone(WaitroomError):
    status = 410
    default_code = "gone"


class PayloadTooLarge(WaitroomError):
    status = 413
    default_code = "body_too_large"


class UnsupportedMediaType(WaitroomError):
    status = 415
    default_code = "unsupported_media_type"


class ValidationFailed(WaitroomError):
    status = 422
    default_code = "validation_failed"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code, details={"field": field} if field else None)
        self.field = field


class _RetryAfter(WaitroomError):
    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # Retry-After is whole seconds; never 0, or clients retry in a hot loop.
        seconds = max(1, int(retry_after + 0.999))
        super().__init__(
            message,
            code=code,
            details={**(details or {}), "retry_after_s": seconds},
            headers={**(headers or {}), "Retry-After": str(seconds)},
        )
        self.retry_after = seconds


class RateLimited(_RetryAfter):
    status = 429
    default_code = "rate_limited"


class Unavailable(_RetryAfter):
    status = 503
    default_code = "unavailable"
