"""Who a fan is: a user of the host site, or an anonymous visitor we issued a token to.

Two modes, chosen by settings:

- **Host-site users** (``WAITROOM_USER_JWT_PUBLIC_KEY`` set): every fan presents the host
  site's JWT as ``Authorization: Bearer <jwt>``. It is verified with that public key and the
  one configured algorithm (``WAITROOM_USER_JWT_ALGORITHM``; the token's own ``alg`` header is
  never trusted), must carry ``exp`` and ``sub``, and must match the configured issuer and
  audience when those are set. The fan id is ``"u:" + sub``.
- **Anonymous visitors** (otherwise): the first join without an identity issues a visitor
  token, an HS256 JWT ``{sub: "v_<128 random bits>", iat, exp: +7 days, typ: "visitor"}``
  signed with a secret only the servers know. It is returned in the join body and set as the
  ``wr_visitor`` cookie (HttpOnly, SameSite=Lax; ``__Host-wr_visitor`` and Secure when
  ``WAITROOM_COOKIE_SECURE``, both names read). The fan id is the ``sub``. Visitor tokens
  are standard JWTs, built and checked here with ``hmac`` (a generic JWT library spent most
  of a join's CPU time on them); the header must be exactly ``{"alg":"HS256","typ":"JWT"}``.

A token is read from ``Authorization: Bearer``, then the cookie; never from the URL, where
proxies, logs and browser histories keep it (the queue WebSocket takes a one-time ticket
instead: :mod:`waitroom.line.wsgate`). A token that is present
but forged, malformed, of another algorithm (``none`` included) or expired is a 401
(``identity_invalid`` / ``identity_expired``), never silently replaced: a fan must not lose
a place because a token went bad without being told.

The visitor secret comes from ``WAITROOM_VISITOR_SECRET_FILE``, or is generated once into
``<run_dir>/visitor-secret`` (every worker process of a host reads the same file).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
import msgspec
from starlette.requests import HTTPConnection

from waitroom.core import keyfiles, randomness
from waitroom.core.errors import SettingsError, Unauthorized
from waitroom.core.settings import Settings

log = logging.getLogger("waitroom.line.identity")

VISITOR_COOKIE = "wr_visitor"
#: The cookie's name when cookies are secure (``WAITROOM_COOKIE_SECURE``): the ``__Host-``
#: prefix makes browsers refuse it unless it is Secure, has Path=/ and no Domain, so no
#: other host of the site (nor plain http) can plant or overwrite a fan's identity.
SECURE_VISITOR_COOKIE = "__Host-wr_visitor"
#: Read in this order: the secure name first, so a leftover plain cookie never wins.
_COOKIE_NAMES = (SECURE_VISITOR_COOKIE, VISITOR_COOKIE)
VISITOR_TTL_S = 7 * 24 * 3600
VISITOR_ALGORITHM = "HS256"
#: Clock skew tolerated on a host site's tokens (their clock is not ours).
USER_LEEWAY_S = 30
#: Longest token looked at; anything bigger is refused before any parsing.
MAX_TOKEN_CHARS = 4096
#: Fan ids end up in PostgreSQL (holds.fan_id is at most 200 characters).
MAX_FAN_ID_CHARS = 200
_VISITOR_SUB = re.compile(r"^v_[0-9a-f]{32}$")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


#: The one header a visitor token may have. Comparing it byte for byte pins the algorithm
#: (``none``, ``HS512``, extra parameters such as ``kid``: all refused before any crypto).
_VISITOR_HEADER = _b64(b'{"alg":"HS256","typ":"JWT"}')


class _VisitorClaims(msgspec.Struct, frozen=True):
    sub: str
    exp: int | float
    typ: str = ""
    iat: int | float | None = None


_visitor_claims = msgspec.json.Decoder(_VisitorClaims)
_encode_claims = msgspec.json.Encoder().encode
_SECRET_NAME = "visitor-secret"
_MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Identity:
    """A fan as established for one request."""

    fan_id: str
    kind: Literal["user", "visitor"]
    #: Where the token came from: "header", "cookie", or "issued" by this request.
    source: str
    token: str


def _bearer_challenge(error: str) -> dict[str, str]:
    return {"WWW-Authenticate": f'Bearer realm="waitroom", error="{error}"'}


def missing() -> Unauthorized:
    """The 401 for a route that needs an identity when none was presented."""
    return Unauthorized(
        "no identity: join the queue first, or send 'Authorization: Bearer <token>'",
        code="identity_missing",
        headers={"WWW-Authenticate": 'Bearer realm="waitroom"'},
    )


def _invalid(message: str) -> Unauthorized:
    return Unauthorized(
        message, code="identity_invalid", headers=_bearer_challenge("invalid_token")
    )


def _expired() -> Unauthorized:
    return Unauthorized(
        "the identity token has expired",
        code="identity_expired",
        headers=_bearer_challenge("invalid_token"),
    )


class Identities:
    """Verifies fans' tokens and issues visitor tokens; one per process, built at start-up."""

    def __init__(
        self,
        *,
        visitor_secret: bytes | None = None,
        user_key: Any = None,
        user_algorithm: str = "RS256",
        user_issuer: str | None = None,
        user_audience: str | None = None,
    ) -> None:
        if (visitor_secret is None) == (user_key is None):
            raise ValueError("give exactly one of visitor_secret and user_key")
        self._secret = visitor_secret
        self._user_key = user_key
        self._algorithm = user_algorithm
        self._issuer = user_issuer
        self._audience = user_audience

    @classmethod
    def from_settings(cls, settings: Settings) -> Identities:
        """Users' tokens when a public key is configured, else visitors with our secret."""
        if settings.user_jwt_public_key is not None:
            return cls(
                user_key=load_user_key(settings.user_jwt_public_key, settings.user_jwt_algorithm),
                user_algorithm=settings.user_jwt_algorithm,
                user_issuer=settings.user_jwt_issuer,
                user_audience=settings.user_jwt_audience,
            )
        return cls(visitor_secret=load_visitor_secret(settings))

    @property
    def anonymous(self) -> bool:
        """True when fans are anonymous visitors (no host-site users configured)."""
        return self._secret is not None

    def issue_visitor(self, now: float) -> Identity:
        """A new anonymous visitor and its signed token."""
        assert self._secret is not None, "visitor tokens exist only in anonymous mode"
        sub = "v_" + randomness.token_hex(16)
        issued = int(now)
        # The token is a standard compact JWT (any JWT library verifies it with the secret);
        # it is built here because a generic library spends most of a join's CPU on it.
        claims = {"sub": sub, "iat": issued, "exp": issued + VISITOR_TTL_S, "typ": "visitor"}
        signing_input = _VISITOR_HEADER + b"." + _b64(_encode_claims(claims))
        signature = hmac.digest(self._secret, signing_input, "sha256")  # one-shot, in C
        return Identity(sub, "visitor", "issued", (signing_input + b"." + _b64(signature)).decode())

    def verify(self, token: str, now: float, *, source: str = "header") -> Identity:
        """The fan ``token`` proves, or a 401 saying why not."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise _invalid("the identity token is malformed")
        if self._secret is not None:
            return self._verify_visitor(token, now, source)
        claims = self._decode(
            token,
            self._user_key,
            self._algorithm,
            now,
            leeway=USER_LEEWAY_S,
            issuer=self._issuer,
            audience=self._audience,
        )
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_FAN_ID_CHARS - 2:
            raise _invalid(f"the token's sub must be 1 to {MAX_FAN_ID_CHARS - 2} characters")
        return Identity("u:" + sub, "user", source, token)

    def _verify_visitor(self, token: str, now: float, source: str) -> Identity:
        assert self._secret is not None
        try:
            header, payload, signature = token.encode("ascii").split(b".")
        except (UnicodeEncodeError, ValueError):
            raise _invalid("the identity token is malformed") from None
        if header != _VISITOR_HEADER:
            raise _invalid("the identity token is invalid")
        expected = _b64(hmac.digest(self._secret, header + b"." + payload, "sha256"))  # in C
        # compare_digest: the time taken must not tell how much of a forged signature matched.
        if not hmac.compare_digest(expected, signature):
            raise _invalid("the identity token is invalid")
        try:
            claims = _visitor_claims.decode(
                base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))
            )
        except (binascii.Error, msgspec.DecodeError, msgspec.ValidationError):
            raise _invalid("the identity token's claims are malformed") from None
        if claims.typ != "visitor" or not _VISITOR_SUB.match(claims.sub):
            raise _invalid("the token is not a visitor token")
        if now >= claims.exp:
            raise _expired()
        return Identity(claims.sub, "visitor", source, token)

    def _decode(
        self,
        token: str,
        key: Any,
        algorithm: str,
        now: float,
        *,
        leeway: int,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> dict[str, Any]:
        # Times are checked below against the caller's `now` (PyJWT would read the clock
        # itself); the signature, the pinned algorithm, iss and aud are checked by PyJWT.
        options: dict[str, Any] = {
            "require": ["exp", "sub"],
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": audience is not None,
            "verify_iss": issuer is not None,
        }
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                options=options,  # type: ignore[arg-type]
                issuer=issuer,
                audience=audience,
            )
        except jwt.InvalidAudienceError:
            raise _invalid("the identity token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise _invalid("the identity token is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"the identity token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError:
            raise _invalid("the identity token is invalid") from None
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise _invalid("the identity token's exp is not a number")
        if now >= exp + leeway:
            raise _expired()
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and now + leeway < nbf:
            raise _invalid("the identity token is not valid yet")
        return claims

    def resolve(self, conn: HTTPConnection, now: float) -> Identity | None:
        """The fan behind ``conn``, ``None`` when it presents no token, 401 when a bad one.

        A visitor cookie that fails is answered with the cookie cleared, so a browser is not
        stuck sending it.
        """
        header = conn.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _invalid("send the identity as 'Authorization: Bearer <token>'")
            return self.verify(token.strip(), now, source="header")
        if self._secret is not None:
            # Both names: a deployment that turns secure cookies on keeps its fans' places.
            for name in _COOKIE_NAMES:
                token = conn.cookies.get(name, "")
                if not token:
                    continue
                try:
                    return self.verify(token, now, source="cookie")
                except Unauthorized as exc:
                    exc.headers["Set-Cookie"] = clear_cookie_header(name)
                    raise
        return None


def visitor_cookie_header(token: str, *, secure: bool) -> str:
    """``Set-Cookie`` value that stores a visitor token for the token's lifetime.

    ``secure`` (``Settings.secure_cookies``): named ``__Host-wr_visitor`` and ``Secure``;
    never a ``Domain``, so the cookie goes back to this host only.
    """
    name = SECURE_VISITOR_COOKIE if secure else VISITOR_COOKIE
    attributes = f"{name}={token}; Max-Age={VISITOR_TTL_S}; Path=/; HttpOnly; SameSite=Lax"
    return attributes + "; Secure" if secure else attributes


def clear_cookie_header(name: str = VISITOR_COOKIE) -> str:
    """``Set-Cookie`` value that deletes the visitor cookie ``name``."""
    # A __Host- cookie can only be set (deleted included) with Secure.
    secure = "; Secure" if name.startswith("__Host-") else ""
    return f"{name}=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax{secure}"


def load_user_key(value: str, algorithm: str) -> Any:
    """The host site's public key from PEM text or a PEM file path, parsed once."""
    text = value
    if not value.lstrip().startswith("-----BEGIN"):
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise SettingsError(
                f"WAITROOM_USER_JWT_PUBLIC_KEY: cannot read {value}: {exc.strerror}",
                variable="WAITROOM_USER_JWT_PUBLIC_KEY",
            ) from None
    try:
        return jwt.get_algorithm_by_name(algorithm).prepare_key(text)
    except (ValueError, TypeError, jwt.InvalidKeyError) as exc:
        raise SettingsError(
            f"WAITROOM_USER_JWT_PUBLIC_KEY: not a {algorithm} public key ({exc})",
            variable="WAITROOM_USER_JWT_PUBLIC_KEY",
        ) from None


def _read_secret(path: Path, variable: str) -> bytes:
    data = path.read_bytes().strip()
    if len(data) < _MIN_SECRET_BYTES:
        raise SettingsError(
            f"{variable}: {path} holds {len(data)} bytes; a secret needs at least {_MIN_SECRET_BYTES}",
            variable=variable,
        )
    return data


def load_visitor_secret(settings: Settings) -> bytes:
    """The secret that signs visitor tokens, generating ``<run_dir>/visitor-secret`` if needed
    (race-safe: see :mod:`waitroom.core.keyfiles`)."""
    variable = "WAITROOM_VISITOR_SECRET_FILE"
    if settings.visitor_secret_file is not None:
        try:
            return _read_secret(Path(settings.visitor_secret_file), variable)
        except OSError as exc:
            raise SettingsError(
                f"{variable}: cannot read {settings.visitor_secret_file}: {exc.strerror}",
                variable=variable,
            ) from None
    keyfiles.refuse_in_production(settings, variable)
    path = Path(settings.run_dir) / _SECRET_NAME
    keyfiles.generated(
        path,
        lambda: (secrets.token_hex(32) + "\n").encode(),
        hint="set WAITROOM_VISITOR_SECRET_FILE in production so that every host shares one",
    )
    return _read_secret(path, variable)
