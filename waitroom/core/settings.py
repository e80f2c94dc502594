"""One frozen settings object, read once from ``WAITROOM_*`` environment variables.

Every process (server, workers, CLI, benchmarks) builds its settings with
:func:`load_settings` at its edge and passes the object down; nothing else reads the
environment. A bad value raises :class:`~waitroom.core.errors.SettingsError` whose message is a
single line naming the variable, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit

import msgspec

from waitroom.core.clientaddr import parse_networks
from waitroom.core.errors import SettingsError

PREFIX = "WAITROOM_"
LOG_LEVELS = ("debug", "info", "warning", "error")
ENVIRONMENTS = ("development", "production")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Process configuration. Field ``x`` comes from the variable ``WAITROOM_X``."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every Redis key this deployment writes; tests use a fresh one per run.
    redis_prefix: str = "wr"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/waitroom"
    #: Bearer token of the operators' API (the operator named "admin"); ``None`` and no
    #: ``admin_tokens`` disables the admin API (401 always).
    admin_token: str | None = None
    #: Named operators' tokens, each ``name:token``; the audit log says ``admin:NAME``.
    admin_tokens: tuple[str, ...] = ()
    #: Door staff's tokens, each ``name:token``: they check tickets in (``POST /v1/checkin``)
    #: and nothing else; the operators' tokens check in too.
    staff_tokens: tuple[str, ...] = ()
    #: Failed admin logins one client address may make per 5 minutes (a token bucket of
    #: this many, refilled over 5 minutes); then 429 until it refills.
    admin_auth_failures: int = 10
    #: ``development`` or ``production``: production refuses generated secrets and weak
    #: admin tokens, and turns on secure cookies and private metrics by default.
    env: str = "development"
    #: This node's name at the load balancer: the value of ``cookie`` on its server line in
    #: HAProxy (``node1`` in deploy/haproxy.cfg). When set, answers about an event's
    #: inventory tell the balancer which node hosts the event's actor (a ``waitroom_node``
    #: cookie, :mod:`waitroom.core.affinity`), so a fan's checkout reaches it directly
    #: instead of being forwarded; empty (one node, or no balancer that reads it): no cookie.
    node_name: str = ""
    #: CIDR networks of the reverse proxies whose ``X-Forwarded-For`` is believed (see
    #: :mod:`waitroom.core.clientaddr`); none by default: the socket peer is the client.
    trusted_proxies: tuple[str, ...] = ()
    #: Visitor cookie with ``Secure`` and the ``__Host-`` name; None: on in production only.
    cookie_secure: bool | None = None
    #: ``/metrics`` and the per-dependency ``/readyz`` without the admin token; None: public
    #: in development only.
    metrics_public: bool | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    #: A second port ``serve`` also listens on, for the queue WebSockets (the load balancer
    #: sends upgrades there, deploy/haproxy.cfg): each listening socket has an accept queue of
    #: its own, so a crowd opening thousands of WebSockets never holds a join or a
    #: reservation behind them before the node reads it. None: one port for everything.
    ws_port: int | None = None
    #: A port ``serve`` answers HAProxy's agent check on (``agent-check`` in
    #: deploy/haproxy.cfg): the share of the line's traffic this node asks for, lower while
    #: it is a sale's checkout (:mod:`waitroom.balancer_agent`). None: no agent.
    agent_port: int | None = None
    #: The weight, in percent, a node asks for in the line's backends while it hosts an
    #: actor taking a sale's reservations (100: the same as every other node).
    owner_line_weight: int = 10
    log_level: str = "info"
    #: Largest request body accepted before answering 413.
    max_body_bytes: int = 64 * 1024
    #: Bound on every call to Redis or PostgreSQL made to answer a request or a probe.
    dependency_timeout_s: float = 2.0
    #: Event-loop stalls longer than this many milliseconds are timed, told apart (the loop
    #: running one long callback, or the process waiting for a core) and logged with the
    #: loop's stack (waitroom.core.stalls). 0: not watched.
    stall_ms: int = 100
    #: Commands for an event whose actor runs in another process of this machine go to it
    #: over a local socket (inventory.siblings); off: through the event's Redis inbox.
    local_forwarding: bool = True
    db_pool_min: int = 1
    db_pool_max: int = 10
    #: The inventory actors' own PostgreSQL pool in a server process (their group commits):
    #: a bulkhead, so request handlers filling the shared pool never hold up reservations.
    db_actor_pool_max: int = 4
    redis_max_connections: int = 256
    #: Where development keys and private services live.
    run_dir: str = ".run"
    #: PEM file of the Ed25519 key that signs queue passes (generated under run_dir when unset).
    pass_signing_key: str | None = None
    #: Extra PEM public keys that still verify passes (key rotation).
    pass_verify_keys: tuple[str, ...] = ()
    pass_issuer: str = "waitroom"
    #: Run admission loops in this process (they elect one leader per event across all
    #: processes); off for web-only nodes, and in tests that do not exercise admission.
    admission_loop: bool = True
    #: The admission leader of an event hosts the event's inventory actor as it starts
    #: leading (ADR 0022): the sale's first reservations find an owner, and its node asks
    #: the balancer for less of the line before they arrive. Off: the first reservation's
    #: node hosts it.
    warm_inventory: bool = True
    #: Secret that signs anonymous visitor tokens (generated under run_dir when unset).
    visitor_secret_file: str | None = None
    #: PEM public key of the host site's user JWTs; when set, fans must present one.
    user_jwt_public_key: str | None = None
    user_jwt_issuer: str | None = None
    user_jwt_audience: str | None = None
    user_jwt_algorithm: str = "RS256"
    #: Base URL of the payment provider the payment workers call.
    payment_url: str = "http://127.0.0.1:8090"
    #: Bound on one call to the payment provider; a slower answer is retried later.
    payment_timeout_s: float = 2.0
    #: Payments one workers process handles at once.
    payment_concurrency: int = 32
    #: Port of ``waitroom workers``' own ``/metrics`` (on ``host``); None: no listener.
    workers_metrics_port: int | None = None
    #: A payment being processed whose worker has not heartbeated for this long (a dead,
    #: hung or cut-off worker) is taken over by another; workers heartbeat 4 times as often.
    payment_heartbeat_timeout_s: float = 4.0
    #: How often the workers reconcile payments that ended without knowing whether the
    #: provider charged (see workers.reconcile); ``waitroom payments reconcile`` runs it once.
    payment_reconcile_interval_s: float = 30.0
    #: How long after such a payment failed the reconciler asks the provider about it: longer
    #: than any request under its key could still be in flight at the provider.
    payment_reconcile_delay_s: float = 60.0
    #: Origins (``scheme://host[:port]``) whose pages may open the queue WebSocket, besides
    #: the server's own origin (always allowed); ``("*",)`` allows any. A handshake without
    #: an Origin header (not a browser) is allowed: browsers always send one.
    allowed_origins: tuple[str, ...] = ()
    #: Queue WebSockets one fan may hold per event in one process; one more closes the oldest.
    ws_max_per_fan: int = 3
    #: Queue WebSockets one client address (IPv4, or IPv6 /64) may hold in one process.
    ws_max_per_address: int = 200
    #: Joins that create a place need a solved proof-of-work challenge
    #: (:mod:`waitroom.line.challenge`); off only for closed tests and benchmarks of the join.
    challenge: bool = True
    #: Host-site users (user JWT mode) solve challenges too; off: their sign-in is the brake.
    challenge_for_users: bool = False
    #: HMAC key of challenges (generated under run_dir when unset; several nodes must share it).
    challenge_secret_file: str | None = None
    #: ``maxnumber`` of a challenge for a normal crowd (about half as many hashes to solve).
    challenge_base: int = 10_000
    #: Joins per second the line is expected to grow at; faster growth raises difficulty.
    challenge_expected_joins_per_s: float = 200.0
    #: Longest a public event or lottery view is served from a process's cache (so shown
    #: availability is never better than the truth of that many seconds ago), and the least
    #: time between two reads of the known event ids prompted by unknown ones.
    view_cache_ttl_s: float = 1.0
    #: Checkout writes (reserve, confirm, cancel) one queue pass may make per second, and at
    #: once (token bucket per pass jti, shared by every process through Redis).
    checkout_rate_per_s: float = 0.5
    checkout_burst: int = 20
    #: How long idempotency records are kept in PostgreSQL before the safety net purges them
    #: (refusals: at most an hour; see workers.safety).
    idempotency_ttl_s: int = 86_400
    #: SMTP server of the e-mail notifications (``smtp://user:pass@host:port``, ``smtps://...``,
    #: ``?starttls=1`` to require STARTTLS); None: no e-mail is sent (the rows wait).
    smtp_url: str | None = None
    #: ``From`` of the e-mails (``Name <address>`` or an address); its domain names the
    #: Message-IDs.
    email_from: str = "waitroom <tickets@localhost>"
    #: E-mails one mailer process sends per second at most.
    email_rate_per_s: float = 10.0
    #: Bound on sending one e-mail (connecting included); a claimed e-mail's lease is 3 times it.
    email_timeout_s: float = 30.0
    #: A paid order gets its event's reminder this many seconds before the event starts.
    email_reminder_before_s: int = 86_400

    @property
    def production(self) -> bool:
        """``WAITROOM_ENV=production``."""
        return self.env == "production"

    @property
    def secure_cookies(self) -> bool:
        """Whether the visitor cookie is ``Secure`` (and named ``__Host-wr_visitor``)."""
        return self.production if self.cookie_secure is None else self.cookie_secure

    @property
    def public_metrics(self) -> bool:
        """Whether ``/metrics`` and the detailed ``/readyz`` need no admin token."""
        return not self.production if self.metrics_public is None else self.metrics_public


@dataclass(frozen=True)
class _Field:
    parse: Callable[[str], Any]
    expected: str


def _int_range(low: int, high: int) -> _Field:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not low <= value <= high:
            raise ValueError
        return value

    return _Field(parse, f"an integer from {low} to {high}")


def _positive_float(raw: str) -> float:
    value = float(raw.strip())
    if not 0 < value < 3600:
        raise ValueError
    return value


def _rate(raw: str) -> float:
    value = float(raw.strip())
    if not 0 < value <= 10_000_000:
        raise ValueError
    return value


def _url(*schemes: str) -> _Field:
    def parse(raw: str) -> str:
        parts = urlsplit(raw.strip())
        if parts.scheme not in schemes or (not parts.hostname and not parts.path):
            raise ValueError
        return raw.strip()

    return _Field(parse, "a URL starting with " + " or ".join(f"{s}://" for s in schemes))


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError
    return raw.strip()


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError
    return value


def _prefix(raw: str) -> str:
    value = raw.strip()
    if not value or not all(c.isalnum() or c in "-_." for c in value) or len(value) > 64:
        raise ValueError
    return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError


def _paths(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _env(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ENVIRONMENTS:
        raise ValueError
    return value


def _networks(raw: str) -> tuple[str, ...]:
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    # Kept as text (child processes get the same value back); parsed again where used.
    return tuple(str(n) for n in parse_networks(entries))


#: Operator names: they end up in the audit log and in log lines.
_OPERATOR_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _operator_tokens(raw: str) -> tuple[str, ...]:
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    if not entries:
        raise ValueError
    for entry in entries:
        name, sep, token = entry.partition(":")
        if not sep or not _OPERATOR_NAME.match(name) or not token.strip():
            raise ValueError
    return tuple(entries)


#: Node names: a cookie value and the first part of the inventory owner's node id.
_NODE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def _node_name(raw: str) -> str:
    value = raw.strip()
    if value and not _NODE_NAME.match(value):
        raise ValueError
    return value


def _algorithm(raw: str) -> str:
    value = raw.strip()
    if value not in {"RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA", "PS256"}:
        raise ValueError
    return value


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(raw: str) -> str | None:
    """``raw`` as a canonical origin (``https://example.com``, ``http://host:8080``), or None.

    Lower-case scheme and host, the port only when it is not the scheme's default, no
    path, query or user info: the form browsers send in ``Origin``, so the two compare equal.
    """
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in _DEFAULT_PORTS or not host or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal keeps its brackets, as in Origin
    return f"{scheme}://{host}" + ("" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}")


def _origins(raw: str) -> tuple[str, ...]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise ValueError
    if items == ["*"]:
        return ("*",)
    origins = []
    for item in items:
        origin = normalize_origin(item)
        if origin is None:
            raise ValueError
        origins.append(origin)
    return tuple(origins)


def _sender(raw: str) -> str:
    _name, address = parseaddr(raw.strip())
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c in raw for c in "\r\n"):
        raise ValueError
    return raw.strip()


_TEXT = _Field(_text, "a non-empty value")
_FIELDS: dict[str, _Field] = {
    "redis_url": _url("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"),
    "redis_prefix": _Field(_prefix, "up to 64 letters, digits, '-', '_' or '.'"),
    "database_url": _url("postgresql", "postgres"),
    "admin_token": _TEXT,
    "admin_tokens": _Field(_operator_tokens, "comma-separated name:token pairs"),
    "staff_tokens": _Field(_operator_tokens, "comma-separated name:token pairs"),
    "admin_auth_failures": _int_range(1, 1_000_000),
    "env": _Field(_env, "one of " + ", ".join(ENVIRONMENTS)),
    "node_name": _Field(_node_name, "up to 32 letters, digits, '-' or '_' (or empty)"),
    "trusted_proxies": _Field(_networks, "comma-separated CIDR networks like 10.0.0.0/8"),
    "cookie_secure": _Field(_bool, "one of true, false, 1, 0, yes, no, on, off"),
    "metrics_public": _Field(_bool, "one of true, false, 1, 0, yes, no, on, off"),
    "host": _TEXT,
    "port": _int_range(0, 65535),
    "ws_port": _int_range(1, 65535),
    "agent_port": _int_range(1, 65535),
    "owner_line_weight": _int_range(1, 100),
    "log_level": _Field(_log_level, "one of " + ", ".join(LOG_LEVELS)),
    "max_body_bytes": _int_range(1024, 64 * 1024 * 1024),
    "dependency_timeout_s": _Field(_positive_float, "a number of seconds above 0"),
    "stall_ms": _int_range(0, 60_000),
    "local_forwarding": _Field(_bool, "one of true, false, 1, 0, yes, no, on, off"),
    "db_pool_min": _int_range(0, 1000),
    "db_pool_max": _int_range(1, 1000),
    "db_actor_pool_max": _int_range(1, 1000),
    "redis_max_connections": _int_range(1, 100_000),
    "run_dir": _TEXT,
    "pass_signing_key": _TEXT,
    "pass_verify_keys": _Field(_paths, "comma-separated file paths"),
    "pass_issuer": _TEXT,
    "admission_loop": _Field(_bool, "one of true, false, 1, 0, yes, no, on, off"),
    "warm_inventory": _Field(_bool, "one of true, false, 1, 0, yes, no, on, off"),
    "visitor_secret_file": _TEXT,
    "user_jwt_public_key": _TEXT,
    "user_jwt_issuer": _TEXT,
    "user_jwt_audience": _TEXT,
    "user_jwt_algorithm": _Field(_algorithm, "one of RS256, RS384, RS512, ES256, ES384, EdDSA"),
    "payment_url": _url("http", "https"),
    "payment_timeout_s": _Field(_positive_float, "a number of seconds above 0"),
    "payment_concurrency": _int_range(1, 10_000),
    "workers_metrics_port": _int_range(1, 65535),
    "payment_heartbeat_timeout_s": _Field(_positive_float, "a number of seconds above 0"),
    "payment_reconcile_interval_s": _Field(_positive_float, "a number of seconds above 0"),
    "payment_reconcile_delay_s": _Field(_positive_float, "a number of seconds above 0"),
    "allowed_origins": _Field(_origins, "'*' or comma-separated origins like https://example.com"),
    "ws_max_per_fan": _int_range(1, 100),
    "ws_max_per_address": _int_range(1, 1_000_000),
    "challenge": _Field(_bool, "one of true, false, 1, 0, yes, no, on, off"),
    "challenge_for_users": _Field(_bool, "one of true, false, 1, 0, yes, no, on, off"),
    "challenge_secret_file": _TEXT,
    "challenge_base": _int_range(100, 100_000_000),
    "challenge_expected_joins_per_s": _Field(_rate, "a number of joins per second above 0"),
    "view_cache_ttl_s": _Field(_positive_float, "a number of seconds above 0"),
    "checkout_rate_per_s": _Field(_rate, "a number of writes per second above 0"),
    "checkout_burst": _int_range(1, 10_000),
    "idempotency_ttl_s": _int_range(60, 365 * 86_400),
    "smtp_url": _url("smtp", "smtps"),
    "email_from": _Field(_sender, "an e-mail address, optionally as 'Name <address>'"),
    "email_rate_per_s": _Field(_rate, "a number of e-mails per second above 0"),
    "email_timeout_s": _Field(_positive_float, "a number of seconds above 0"),
    "email_reminder_before_s": _int_range(60, 365 * 86_400),
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from ``environ`` (default: the process environment).

    Unknown ``WAITROOM_*`` variables are refused too: a misspelt variable that is silently
    ignored is how a production sale ends up on a default.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(PREFIX):
            continue
        key = name[len(PREFIX) :].lower()
        field = _FIELDS.get(key)
        if field is None:
            raise SettingsError(f"{name}: unknown setting", variable=name)
        try:
            values[key] = field.parse(raw)
        except ValueError:
            shown = raw if len(raw) <= 40 else raw[:37] + "..."
            raise SettingsError(
                f"{name}: expected {field.expected}, got {shown!r}", variable=name
            ) from None
    settings = Settings(**values)
    if settings.db_pool_min > settings.db_pool_max:
        raise SettingsError(
            f"{PREFIX}DB_POOL_MIN: must not exceed {PREFIX}DB_POOL_MAX ({settings.db_pool_max})",
            variable=f"{PREFIX}DB_POOL_MIN",
        )
    check_admin_tokens(settings, settings.host)
    return settings


#: Least length of an admin token outside a loopback-only development server: 32 characters
#: of ``openssl rand -hex 16`` are 128 bits, beyond any guessing at any request rate.
MIN_ADMIN_TOKEN_CHARS = 32
#: Least distinct characters: 32 copies of one letter is long but no secret.
_MIN_DISTINCT_CHARS = 8
#: Example and default values published with waitroom (compose, the demo, the docs) and the
#: usual placeholders: anyone can read them, whatever their length.
KNOWN_ADMIN_TOKENS = frozenset(
    {
        "demo-admin-token",
        "admin",
        "admin-token",
        "changeme",
        "change-me",
        "password",
        "secret",
        "token",
        "test",
        "replace-me-with-a-long-random-token",
        "change-me-to-a-long-random-admin-token",
        "please-change-this-admin-token-now",
    }
)
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def operators(settings: Settings) -> dict[str, str]:
    """Operator name -> admin token: ``WAITROOM_ADMIN_TOKENS``, and ``WAITROOM_ADMIN_TOKEN``
    as the operator ``admin``. ``SettingsError`` on a name or a token given twice."""
    found: dict[str, str] = {}
    pairs = [entry.split(":", 1) for entry in settings.admin_tokens]
    if settings.admin_token is not None:
        pairs.insert(0, ["admin", settings.admin_token])
    variable = f"{PREFIX}ADMIN_TOKENS"
    for name, token in pairs:
        if name in found:
            raise SettingsError(
                f"{variable}: operator {name!r} is named twice"
                + (" (WAITROOM_ADMIN_TOKEN is the operator 'admin')" if name == "admin" else ""),
                variable=variable,
            )
        if token in found.values():
            # The audit log must say who: a token two operators share says neither.
            raise SettingsError(
                f"{variable}: operator {name!r} has the same token as another", variable=variable
            )
        found[name] = token
    return found


def staff(settings: Settings) -> dict[str, str]:
    """Door staff's name -> token (``WAITROOM_STAFF_TOKENS``); ``SettingsError`` on a name or
    a token given twice, or a token that is an operator's too."""
    found: dict[str, str] = {}
    variable = f"{PREFIX}STAFF_TOKENS"
    admins = set(operators(settings).values())
    for name, token in (entry.split(":", 1) for entry in settings.staff_tokens):
        if name in found or token in found.values() or token in admins:
            raise SettingsError(
                f"{variable}: {name!r} is named twice or shares a token", variable=variable
            )
        found[name] = token
    return found


def check_admin_tokens(settings: Settings, host: str) -> None:
    """Refuse weak admin tokens unless a development server listens on loopback only.

    Weak: shorter than :data:`MIN_ADMIN_TOKEN_CHARS`, fewer than 8 distinct characters, or
    a published example (:data:`KNOWN_ADMIN_TOKENS`). In production even a loopback
    listener is refused one: a reverse proxy on the same host makes it public.
    """
    named = operators(settings)
    door = staff(settings)
    if settings.env != "production" and is_loopback(host):
        return
    if settings.env == "production":
        where, fix = "in production", ""
    else:
        where, fix = f"on a server listening on {host}", ", or listen on 127.0.0.1"
    checked = [(name, token, False) for name, token in named.items()]
    checked += [(name, token, True) for name, token in door.items()]
    for name, token, is_staff in checked:
        variable = f"{PREFIX}ADMIN_TOKEN" if name == "admin" else f"{PREFIX}ADMIN_TOKENS"
        who = "the admin token" if name == "admin" else f"operator {name!r}'s token"
        if is_staff:
            variable, who = f"{PREFIX}STAFF_TOKENS", f"staff {name!r}'s token"
        if token.strip().lower() in KNOWN_ADMIN_TOKENS:
            problem = "is a published example value"
        elif len(token) < MIN_ADMIN_TOKEN_CHARS:
            problem = f"has {len(token)} characters, fewer than {MIN_ADMIN_TOKEN_CHARS}"
        elif len(set(token)) < _MIN_DISTINCT_CHARS:
            problem = f"has fewer than {_MIN_DISTINCT_CHARS} distinct characters"
        else:
            continue
        raise SettingsError(
            f"{variable}: {who} {problem}, refused {where};"
            f" use a random one (openssl rand -hex 32){fix}",
            variable=variable,
        )


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process that loads exactly ``settings``.

    ``base`` (default: this process's environment) is kept, except its ``WAITROOM_*``
    variables, which are replaced by ``settings``' own.
    """
    env = {
        k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(PREFIX)
    }
    for key, value in msgspec.structs.asdict(settings).items():
        if value is None or value == ():
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        env[f"{PREFIX}{key.upper()}"] = str(value)
    return env
