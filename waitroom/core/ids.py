"""The documented forms of the ids in URL paths, checked before any of them reaches a store.

Every path parameter of the HTTP API is one of the :data:`PATH_PARAMS` below. The app checks
each one against its form before the handler runs (:func:`check_path_params`, wired in by
:func:`guard`), and the OpenAPI document publishes the same pattern and length
(:meth:`IdForm.schema`), so clients and fuzzers know the form and the server enforces exactly
what it documents. An id that is not of its form cannot name anything: it is answered with the
same 404 (and code) as a well-formed id that names nothing, without a Redis or PostgreSQL
round trip, so a hostile id (a NUL byte, a megabyte, a ``}`` that would move a Redis key out
of its hash slot, a trailing newline) never gets further than a regular expression.

The patterns end with :data:`END` rather than ``$``: in Python's ``re`` (and msgspec, which
uses it) ``$`` also matches just before a final newline, so ``"evt-1\\n"`` passed a check
written ``^...$`` and then failed in PostgreSQL with a 500. ``(?![\\s\\S])`` ("no character
follows") means end of string in Python and in ECMA-262, the dialect of JSON Schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from waitroom.core.errors import NotFound

#: End of the string, in Python's ``re`` and in ECMA-262 alike (see the module docstring).
END = r"(?![\s\S])"


@dataclass(frozen=True, slots=True)
class IdForm:
    """The documented form of one kind of id, and the 404 an id of another form gets."""

    #: The path parameter's name in route templates (``{event_id}``).
    name: str
    #: Anchored regular expression, valid in Python and ECMA-262 (JSON Schema).
    pattern: str
    max_length: int
    description: str
    #: Error code of the 404 (the same as for a well-formed id that names nothing).
    code: str
    #: What the id names, for the error message ("event", "reservation"...).
    noun: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def matches(self, value: str) -> bool:
        """Whether ``value`` is of this form (the length first: a megabyte is not scanned)."""
        return len(value) <= self.max_length and self._regex.match(value) is not None

    def not_found(self) -> NotFound:
        """The 404 of an id that is not of this form; the id is not echoed (it may be hostile)."""
        return NotFound(
            f"no {self.noun} with this id: {self.description}",
            code=self.code,
            details={"parameter": self.name},
        )

    def check(self, value: str) -> str:
        """``value`` if it is of this form; :meth:`not_found` otherwise."""
        if not self.matches(value):
            raise self.not_found()
        return value

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the parameter, for the OpenAPI document."""
        return {
            "type": "string",
            "pattern": self.pattern,
            "maxLength": self.max_length,
            "description": self.description,
        }


#: ``events.id`` in PostgreSQL (its CHECK constraint) and in the Redis hash tags.
EVENT_ID = IdForm(
    name="event_id",
    pattern=r"^[a-z0-9][a-z0-9_-]{0,62}" + END,
    max_length=63,
    description="lowercase letters, digits, '-' and '_', starting with a letter or digit;"
    " at most 63 characters",
    code="event_not_found",
    noun="event",
)
#: A hold id: a UUID, with or without hyphens, either case (as ``uuid.UUID`` reads it).
RESERVATION_ID = IdForm(
    name="reservation_id",
    pattern=r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
    + END,
    max_length=36,
    description="a UUID, as returned by reserve",
    code="hold_not_found",
    noun="reservation",
)
#: A queue pass's ``jti``: 128 random bits in URL-safe base64 (22 characters) when issued here.
PASS_JTI = IdForm(
    name="jti",
    pattern=r"^[A-Za-z0-9_-]{1,64}" + END,
    max_length=64,
    description="the pass's jti claim: URL-safe base64 letters, digits, '-' and '_'",
    code="pass_not_found",
    noun="queue pass",
)

#: A ticket's ``code`` (``randomness.token_urlsafe(18)`` when issued here: 24 characters).
TICKET_CODE = IdForm(
    name="ticket_code",
    pattern=r"^[A-Za-z0-9_-]{16,64}" + END,
    max_length=64,
    description="a ticket's code: 16 to 64 URL-safe base64 letters, digits, '-' and '_'",
    code="ticket_not_found",
    noun="ticket",
)

_UUID = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}" + END
#: An order's id (a UUID).
ORDER_ID = IdForm(
    name="order_id",
    pattern=_UUID,
    max_length=36,
    description="a UUID, as GET /v1/orders lists it",
    code="order_not_found",
    noun="order",
)
#: A refund's id (a UUID).
REFUND_ID = IdForm(
    name="refund_id",
    pattern=_UUID,
    max_length=36,
    description="a UUID, as a refund request returns it",
    code="refund_not_found",
    noun="refund",
)

#: Every path parameter the API has, by name. A route with a parameter not listed here is
#: refused when the app is built (:func:`forms_of`), so a new route cannot skip the check.
PATH_PARAMS: Mapping[str, IdForm] = {
    form.name: form
    for form in (EVENT_ID, RESERVATION_ID, PASS_JTI, TICKET_CODE, ORDER_ID, REFUND_ID)
}

_TEMPLATE_PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")


def param_names(path: str) -> list[str]:
    """The parameter names of a route template, in order (``{name}`` or ``{name:convertor}``)."""
    return _TEMPLATE_PARAM.findall(path)


def forms_of(path: str) -> tuple[IdForm, ...]:
    """The forms of ``path``'s parameters; ``LookupError`` for a parameter without one."""
    forms = []
    for name in param_names(path):
        form = PATH_PARAMS.get(name)
        if form is None:
            raise LookupError(
                f"route {path!r}: path parameter {name!r} has no documented form in"
                " waitroom.core.ids.PATH_PARAMS"
            )
        forms.append(form)
    return tuple(forms)


def check_path_params(forms: tuple[IdForm, ...], params: Mapping[str, Any]) -> None:
    """Raise the 404 of the first parameter in ``params`` that is not of its form."""
    for form in forms:
        value = params.get(form.name)
        if not isinstance(value, str) or not form.matches(value):
            raise form.not_found()
