"""``waitroom``: the one console script (serve, migrate, the catalogue and the operators' tools).

Every subcommand reads the settings once, talks to PostgreSQL and Redis directly through the
same functions the HTTP API uses, prints a table or ``--json``, and exits 0 on success or 1
with a single ``waitroom: ...`` line on failure (2 for a usage error), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from admission import operators, recovery
from admission.passes import PassKeys
from inventory import catalogue, tickets, venue
from waitroom import refunds_cli
from waitroom.core.clients import Clients, open_clients
from waitroom.core.db import RETIRED_VERSIONS, ensure_database, migrate, migrations
from waitroom.core.errors import ValidationFailed, WaitroomError
from waitroom.core.http import decode_json, dependency_error
from waitroom.core.metrics import multiprocess_dir
from waitroom.core.settings import Settings, check_admin_tokens, load_settings
from waitroom.line.identity import Identities

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]


class CLIError(Exception):
    """A failure reported to the user as one line."""


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def cli_actor() -> str:
    """Who the audit log names for a change made from this terminal."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header)), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


# --- serve / migrate ----------------------------------------------------------------------


def run_server(app: str, *, host: str, port: int, workers: int, ws_port: int | None = None) -> None:
    """Serve the ASGI app factory ``app`` ("module:function") with uvicorn, as in production,
    on ``port`` and, when given, on ``ws_port`` too (the queue WebSockets' own listening
    socket: see :attr:`~waitroom.core.settings.Settings.ws_port`).

    ``waitroom serve`` passes the real app; benchmarks pass a factory of their own that adds
    an endpoint to compare against, so both sides of a comparison get the same server.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from waitroom.core.httpserver import PROTOCOL as HTTP_PROTOCOL
    from waitroom.core.httpserver import WS_PROTOCOL, listeners

    config = uvicorn.Config(
        app,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        # Fans never send us more than a close frame; compression state would cost tens of
        # KB per idle WebSocket, and a flash sale holds tens of thousands of them.
        ws_per_message_deflate=False,
        ws_max_size=4096,
        backlog=8192,
        # Forwarded headers are believed only through WAITROOM_TRUSTED_PROXIES
        # (waitroom.core.clientaddr); uvicorn's own handling would rewrite the peer address
        # from X-Forwarded-For for FORWARDED_ALLOW_IPS (127.0.0.1 by default) before we see
        # it. Off, FORWARDED_ALLOW_IPS is ignored altogether.
        proxy_headers=False,
        # httptools, with each response's head and body in one write (one system call).
        http=HTTP_PROTOCOL,
        # websockets' sans-I/O protocol, without the handshake's headers once it is answered.
        ws=WS_PROTOCOL,
    )
    # What uvicorn.run does, on one listening socket or two (both serve the whole app; the
    # load balancer decides what goes where).
    sockets = listeners(config)
    if ws_port is not None:
        # As many descriptors as the HTTP socket: with one, a loaded node took in one fan's
        # WebSocket per turn of its loop (some 50 a second) while a crowd opened 100 a second
        # at it; the rest waited in its accept queue until HAProxy gave up on them (thousands
        # of 504s after 30 s a sale, the fans reconnecting into the same queue, and the node
        # later accepting connections whose fans had long gone).
        ws_config = uvicorn.Config(app, host=host, port=ws_port, backlog=config.backlog)
        sockets.extend(listeners(ws_config))
    try:
        if workers > 1:
            Multiprocess(config, sockets=sockets).run()
        else:
            server = uvicorn.Server(config)
            server.run(sockets=sockets)
            if not server.started:
                sys.exit(3)  # uvicorn's STARTUP_FAILURE: the lifespan refused to start
    except KeyboardInterrupt:
        pass


async def _check_schema(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        await open_clients(settings, stack, check_schema=True)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the HTTP server (uvicorn; several worker processes with --workers)."""
    from waitroom.core.logs import configure_logging

    configure_logging(settings.log_level)
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    ws_port = settings.ws_port if args.ws_port is None else args.ws_port
    if ws_port is not None and not 0 < ws_port < 65536:
        raise CLIError(f"--ws-port {ws_port}: not a port (1-65535)")
    if ws_port is not None and ws_port == port:
        raise CLIError(f"the WebSocket port must differ from the HTTP port ({port})")
    agent_port = settings.agent_port if args.agent_port is None else args.agent_port
    if agent_port is not None:
        if not 0 < agent_port < 65536:
            raise CLIError(f"--agent-port {agent_port}: not a port (1-65535)")
        if agent_port in (port, ws_port):
            raise CLIError(f"the agent port must differ from the server's ports ({agent_port})")
        # Every worker builds its services from the environment (app_from_env) and listens
        # for the agent there, where the server listens.
        os.environ["WAITROOM_AGENT_PORT"] = str(agent_port)
        os.environ["WAITROOM_HOST"] = host
    # load_settings checked the tokens against WAITROOM_HOST; --host may listen wider.
    check_admin_tokens(settings, host)
    # Secrets are refused (production) or generated (development) here, as one line,
    # rather than in every worker's lifespan after uvicorn started it.
    PassKeys.from_settings(settings)
    Identities.from_settings(settings)
    # Refused here, as one line, rather than by every worker's lifespan after uvicorn forked.
    asyncio.run(_check_schema(settings))
    # Several workers count into one directory of files, so that /metrics answers every
    # worker's totals whichever worker takes the scrape (see waitroom.core.metrics).
    with multiprocess_dir(args.workers):
        run_server(
            "waitroom.app:app_from_env",
            host=host,
            port=port,
            workers=args.workers,
            ws_port=ws_port,
        )
    return 0


def cmd_workers(args: argparse.Namespace, settings: Settings) -> int:
    """Run the payment pool, the outbox relay and the safety net until SIGTERM or SIGINT."""
    from waitroom.core import runtime
    from waitroom.core.logs import configure_logging
    from waitroom.core.tracing import configure_tracing
    from workers.main import run_workers

    configure_logging(settings.log_level)
    configure_tracing("waitroom-workers")  # on only with OTEL_EXPORTER_OTLP_ENDPOINT set
    runtime.tune_gc()
    if args.concurrency is not None:
        settings = msgspec.structs.replace(settings, payment_concurrency=args.concurrency)
    if args.metrics_port is not None:
        settings = msgspec.structs.replace(settings, workers_metrics_port=args.metrics_port)
    runtime.run(
        run_workers(
            settings,
            payments=not args.no_payments,
            relay=not args.no_relay,
            safety_net=not args.no_safety_net,
        )
    )
    return 0


async def cmd_payments_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """One reconciliation pass of payments that ended without knowing what the provider did."""
    from workers.main import reconcile_payments

    report = await reconcile_payments(settings)
    if args.json:
        _print_json(report)
        return 0
    counts = report.counts()
    print(f"handed back from stalled workers: {report.recovered}")
    print(f"reconciled: {len(report.outcomes)}")
    for outcome in sorted(counts):
        print(f"  {outcome}: {counts[outcome]}")
    return 0


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Create the database if needed and apply the migrations it lacks."""
    created = await ensure_database(settings.database_url)
    applied = await migrate(settings.database_url)
    if args.json:
        _print_json({"created_database": created, "applied": applied})
    else:
        if created:
            print("created database")
        print(_applied_text(applied) if applied else "schema is up to date")
    return 0


def _applied_text(applied: list[int]) -> str:
    """``applied migrations: 0001_init, 0002_room, 0004_admission`` and why 0003 is missing.

    Bare numbers with a gap looked like a migration lost on the way; the file names, and a
    word on the numbers no file has, show the gap is the files' own.
    """
    names = {m.version: f"{m.version:04d}_{m.name}" for m in migrations()}
    text = "applied migrations: " + ", ".join(names.get(v, str(v)) for v in applied)
    for version in range(min(applied), max(applied)):
        if version not in names:
            why = RETIRED_VERSIONS.get(version, "no such file")
            text += f"\n  (no {version:04d}: {why}; versions need not be contiguous)"
    return text


# --- event create / list / show -----------------------------------------------------------


def _ticket_flag(raw: str) -> dict[str, Any]:
    """``NAME:QUANTITY:PRICE_MINOR:CURRENCY[:PER_FAN_LIMIT]``."""
    parts = raw.split(":")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(
            f"{raw!r}: expected NAME:QUANTITY:PRICE_MINOR:CURRENCY[:PER_FAN_LIMIT]"
        )
    try:
        spec: dict[str, Any] = {
            "name": parts[0],
            "quantity": int(parts[1]),
            "price_minor": int(parts[2]),
            "currency": parts[3],
        }
        if len(parts) == 5:
            spec["per_fan_limit"] = int(parts[4])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{raw!r}: quantity, price and limit are integers"
        ) from None
    return spec


def _load_spec_file(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if file.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text.decode())
        else:
            data = msgspec.json.decode(text)
    except (tomllib.TOMLDecodeError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CLIError(f"{path} is not valid {file.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path} must hold an object")
    return data


def _spec_from_args(args: argparse.Namespace) -> catalogue.EventCreate:
    data: dict[str, Any] = _load_spec_file(args.file) if args.file else {}
    room: dict[str, Any] = dict(data.get("room") or {})
    for flag, key in (
        ("id", "id"),
        ("name", "name"),
        ("venue", "venue"),
        ("starts_at", "starts_at"),
    ):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    for flag, key in (
        ("mode", "queue_mode"),
        ("opens_at", "opens_at"),
        ("rate", "rate_per_second"),
        ("max_active", "max_active"),
        ("pass_ttl", "pass_ttl_s"),
        ("hold_ttl", "hold_ttl_s"),
        ("grace", "abandon_grace_s"),
        ("per_fan_limit", "per_fan_limit"),
        ("waitlist", "waitlist"),
        ("waitlist_until", "waitlist_until"),
    ):
        if getattr(args, flag, None) is not None:
            room[key] = getattr(args, flag)
    if room:
        data["room"] = room
    if args.ticket:
        data["ticket_types"] = args.ticket
    for key in ("starts_at",):
        if isinstance(data.get(key), str):
            data[key] = _parse_time(data[key], key)
    if isinstance(room.get("opens_at"), str):
        room["opens_at"] = _parse_time(room["opens_at"], "room.opens_at")
    if isinstance(room.get("waitlist_until"), str):
        room["waitlist_until"] = _parse_time(room["waitlist_until"], "room.waitlist_until")
    try:
        return msgspec.convert(data, catalogue.EventCreate)
    except msgspec.ValidationError as exc:
        raise CLIError(f"invalid event: {exc}") from None


def _parse_time(raw: str, name: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise CLIError(f"{name}: {raw!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise CLIError(f"{name}: {raw!r} needs a time zone, e.g. {raw}+00:00 or {raw}Z")
    return value


async def cmd_event_create(args: argparse.Namespace, settings: Settings) -> int:
    """Create an event from flags, a JSON/TOML file, or both (flags win)."""
    spec = _spec_from_args(args)
    async with _clients(settings) as c:
        event = await catalogue.create_event(c.db, spec, actor=cli_actor(), now=datetime.now(UTC))
    if args.json:
        _print_json(event)
    else:
        print(f"created event {event.id}")
    return 0


async def cmd_event_list(args: argparse.Namespace, settings: Settings) -> int:
    """List events, newest first."""
    async with _clients(settings) as c:
        events = await catalogue.list_events(c.db, limit=args.limit)
    if args.json:
        _print_json(events)
        return 0
    if not events:
        print("no events")
        return 0
    print(
        _table(
            [
                (
                    e.id,
                    e.name,
                    e.status,
                    e.queue_mode,
                    e.opens_at.isoformat(timespec="seconds"),
                    f"{e.available}/{e.quantity}",
                )
                for e in events
            ],
            ("ID", "NAME", "STATUS", "MODE", "OPENS", "AVAILABLE"),
        )
    )
    return 0


async def cmd_event_show(args: argparse.Namespace, settings: Settings) -> int:
    """Show one event with its rules and ticket types."""
    async with _clients(settings) as c:
        event = await catalogue.get_event(c.db, args.event)
    if args.json:
        _print_json(event)
        return 0
    room = event.room
    print(f"{event.id}: {event.name}" + (f" @ {event.venue}" if event.venue else ""))
    print(f"  status       {event.status}")
    print(f"  sale opens   {room.opens_at.isoformat(timespec='seconds')} ({room.queue_mode})")
    print(
        f"  admission    {room.rate_per_second:g}/s, at most {room.max_active} shopping"
        + (" (paused)" if room.paused else "")
    )
    print(
        f"  passes       {room.pass_ttl_s}s; holds {room.hold_ttl_s}s; "
        f"abandoned after {room.abandon_grace_s}s; {room.per_fan_limit} tickets per fan"
    )
    print(
        "  "
        + _table(
            [
                (
                    t.name,
                    f"{t.price_minor / 100:.2f} {t.currency}",
                    t.per_fan_limit,
                    f"{t.available}/{t.quantity}",
                )
                for t in event.ticket_types
            ],
            ("TICKET TYPE", "PRICE", "PER FAN", "AVAILABLE"),
        ).replace("\n", "\n  ")
    )
    return 0


async def cmd_event_delete(args: argparse.Namespace, settings: Settings) -> int:
    """Delete an event's rows and Redis keys (refused with paid orders unless --force)."""
    from waitroom.purge import delete_event

    async with _clients(settings) as c:
        result = await delete_event(
            c.db, c.redis, c.keys, args.event, actor=cli_actor(), force=args.force
        )
    if args.json:
        _print_json(result)
    elif not result.in_database:
        print(
            f"event {result.event_id} was not in PostgreSQL; removed {result.redis_keys} Redis keys"
        )
    else:
        print(
            f"deleted event {result.event_id}: {result.orders} orders ({result.paid_orders} paid,"
            f" {result.tickets} tickets), {result.holds} holds, {result.passes} passes,"
            f" {result.redis_keys} Redis keys"
        )
    return 0


# --- venue import / export ----------------------------------------------------------------


def _read_seat_map(path: str) -> venue.SeatMap:
    try:
        body = Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    return decode_json(body, venue.SeatMap)


def _write_file(path: str, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {exc.strerror}") from None


async def cmd_venue_import(args: argparse.Namespace, settings: Settings) -> int:
    """Import an event's seat map from a JSON file (docs/seatmap.md), replacing its map."""
    seat_map = _read_seat_map(args.file)
    async with _clients(settings) as c:
        summary = await venue.import_seat_map(c.db, args.event, seat_map, actor=cli_actor())
    if args.json:
        _print_json(summary)
        return 0
    print(
        f"imported the seat map of {summary.event_id}: {summary.seats} seats in"
        f" {summary.seated_sections} seated and {summary.general_admission_sections}"
        " general-admission sections"
    )
    for level in summary.levels:
        print(
            f"  {level.level} ({level.ticket_type}): {level.open} open,"
            f" {level.held_back} held back, {level.killed} killed"
        )
    return 0


async def cmd_venue_export(args: argparse.Namespace, settings: Settings) -> int:
    """Print an event's seat map as JSON (or write it to ``--output``)."""
    async with _clients(settings) as c:
        seat_map = await venue.export_seat_map(c.db, args.event)
    data = venue.encode(seat_map)
    if args.output:
        _write_file(args.output, data + b"\n")
    else:
        sys.stdout.write(data.decode() + "\n")
    return 0


# --- admission / pass / status / token -----------------------------------------------------


@asynccontextmanager
async def _clients(settings: Settings) -> AsyncIterator[Clients]:
    """PostgreSQL and Redis, opened as the server opens them, for one command."""
    async with AsyncExitStack() as stack:
        # No schema check: a one-shot command reports its own errors, and `status` must
        # work against a database that a newer release migrated.
        yield await open_clients(settings, stack, check_schema=False)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _rate(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g}/s"


def _print_settings(result: operators.AdmissionSettings, as_json: bool) -> None:
    if as_json:
        _print_json(result)
        return
    state = "paused" if result.paused else "admitting"
    print(
        f"{result.event_id}: {state} at {_rate(result.rate_per_second)},"
        f" at most {result.max_active} shopping at once"
        + (", waitlist on" if result.waitlist else "")
    )


async def _update(args: argparse.Namespace, settings: Settings, **fields: Any) -> int:
    patch = operators.make_patch(**fields)
    async with _clients(settings) as c:
        result = await operators.update_admission(
            c.db, c.redis, c.keys, args.event, patch, actor=cli_actor()
        )
    _print_settings(result, args.json)
    return 0


async def cmd_admission_set(args: argparse.Namespace, settings: Settings) -> int:
    """Change the admission rate and/or the cap on concurrent shoppers."""
    until = args.waitlist_until
    if args.rate is None and args.max_active is None and args.waitlist is None and until is None:
        raise CLIError("give --rate, --max-active and/or --waitlist")
    return await _update(
        args,
        settings,
        rate_per_second=args.rate,
        max_active=args.max_active,
        waitlist=args.waitlist,
        waitlist_until=None if until is None else _parse_time(until, "--waitlist-until"),
    )


async def cmd_admission_pause(args: argparse.Namespace, settings: Settings) -> int:
    """Stop admitting (fans keep their places and see "paused")."""
    return await _update(args, settings, paused=True)


async def cmd_admission_resume(args: argparse.Namespace, settings: Settings) -> int:
    """Admit again."""
    return await _update(args, settings, paused=False)


async def cmd_admission_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Dry run: the wait a rate would give the fans in line now. Changes nothing."""
    async with _clients(settings) as c:
        result = await operators.plan(c.db, c.redis, c.keys, args.event, args.rate)
    if args.json:
        _print_json(result)
        return 0
    print(
        f"{result.fans_waiting} fans in line for {result.event_id}; {result.tickets_left} tickets left"
    )
    print(
        f"  at {_rate(result.rate_per_second)}: the last fan waits {_duration(result.last_fan_wait_s)},"
        f" the median fan {_duration(result.median_fan_wait_s)}"
    )
    print(
        f"  now ({_rate(result.current_rate_per_second)}): the last fan waits"
        f" {_duration(result.current_last_fan_wait_s)}"
    )
    return 0


async def cmd_pass_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke a queue pass by its id (jti)."""
    async with _clients(settings) as c:
        result = await operators.revoke_pass(c.db, c.redis, c.keys, args.jti, actor=cli_actor())
    if args.json:
        _print_json(result)
    else:
        print(
            f"revoked pass {result.jti} of fan {result.fan_id} ({result.event_id}, #{result.seq})"
        )
    return 0


async def cmd_checkin(args: argparse.Namespace, settings: Settings) -> int:
    """Check a ticket in (its code or its signed form), as the door's ``POST /v1/checkin``."""
    keys = PassKeys.from_settings(settings)
    code, claims = tickets.read_ticket(
        keys, args.ticket, issuer=settings.pass_issuer, event_id=args.event
    )
    async with _clients(settings) as c, c.db.acquire() as conn:
        try:
            result = await tickets.check_in(
                conn,
                code,
                by=cli_actor(),
                gate=args.gate,
                event_id=args.event,
                signed=claims is not None,
            )
        except WaitroomError as exc:
            # The refusal's details (when and where it was first used) on the one line.
            shown = ", ".join(f"{k}: {v}" for k, v in exc.details.items() if v is not None)
            raise CLIError(f"{exc.code}: {exc}" + (f" ({shown})" if shown else "")) from None
    if args.json:
        _print_json(result)
    else:
        where = f" at {result.gate}" if result.gate else ""
        print(
            f"checked in ticket {result.code} ({result.event_id}, {result.ticket_type})"
            f"{where} at {result.used_at.isoformat()}"
        )
    return 0


async def cmd_ticket_void(args: argparse.Namespace, settings: Settings) -> int:
    """Void a ticket: check-in refuses it from now on."""
    async with _clients(settings) as c, c.db.acquire() as conn:
        result = await tickets.void_ticket(conn, args.code, actor=cli_actor(), reason=args.reason)
    if args.json:
        _print_json(result)
    else:
        print(f"voided ticket {result.code} ({result.event_id}) at {result.voided_at.isoformat()}")
    return 0


async def cmd_room_restore(args: argparse.Namespace, settings: Settings) -> int:
    """Write the event's pass state from PostgreSQL into Redis (see docs/durability.md).

    Rooms rebuild themselves when Redis lost them; this is for a partial loss that left the
    room in place, or to be sure. Harmless to run during a sale.
    """
    async with _clients(settings) as c:
        result = await recovery.rebuild(c.db, c.redis, c.keys, args.event)
    if args.json:
        _print_json(result)
    else:
        print(
            f"restored {result.passes} passes of {result.event_id} ({result.active} active,"
            f" {result.revoked} revoked, {result.spent} spent); last pass #{result.last_seq}"
        )
    return 0


def _waitlist_text(s: operators.AdmissionStatus) -> str:
    until = (
        ""
        if s.waitlist_until is None
        else f" until {s.waitlist_until.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC"
    )
    if s.waitlisted:
        return f"on{until}, sold out: {s.tickets_returned} tickets came back"
    return f"on{until}" if s.waitlist else "off"


def _status_text(s: operators.AdmissionStatus) -> str:
    state = (
        "waitlist"
        if s.waitlisted
        else "sold out"
        if s.sold_out
        else "paused"
        if s.paused
        else "admitting"
    )
    lines = [
        f"{s.event_id}  {state}  (leader: {'yes' if s.leader else 'none'})"
        f"  {s.at.astimezone(UTC).strftime('%H:%M:%S')} UTC",
        f"  fans waiting      {s.fans_waiting}",
        f"  admitted so far   {s.admitted_total}"
        + (f"  ({s.abandoned_total} abandoned)" if s.abandoned_total else ""),
        f"  active passes     {s.active_passes} of at most {s.max_active}",
        f"  rate              {_rate(s.rate_per_second)} configured, {_rate(s.observed_rate)} observed",
        f"  tickets left      {s.tickets_left}",
        f"  last fan's wait   {_duration(s.last_fan_wait_s)}",
        "  waitlist          " + _waitlist_text(s),
    ]
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """The live view of a sale; --watch redraws it every second until Ctrl-C."""
    async with _clients(settings) as c:
        tty = sys.stdout.isatty()
        while True:
            status = await operators.admission_status(
                c.db, c.redis, c.keys, args.event, now=time.time()
            )
            if args.json:
                _print_json(status)
            else:
                if args.watch and tty:
                    sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: redraw in place
                print(_status_text(status), flush=True)
            if not args.watch:
                return 0
            sys.stdout.flush()
            await asyncio.sleep(args.interval)


def cmd_token_issue(args: argparse.Namespace, settings: Settings) -> int:
    """A token a fan can use to test: an anonymous visitor's, or (with --key) a host-site user's."""
    import jwt

    from waitroom.line.identity import Identities

    now = time.time()
    if settings.user_jwt_public_key is None:
        identity = Identities.from_settings(settings).issue_visitor(now)
        token, fan_id = identity.token, identity.fan_id
    else:
        if not args.key or not args.sub:
            raise CLIError(
                "fans are host-site users here (WAITROOM_USER_JWT_PUBLIC_KEY): give --key"
                " PRIVATE_KEY_PEM and --sub USER_ID to sign a test token"
            )
        try:
            key = Path(args.key).read_text()
        except OSError as exc:
            raise CLIError(f"cannot read {args.key}: {exc.strerror}") from None
        claims: dict[str, Any] = {"sub": args.sub, "iat": int(now), "exp": int(now) + args.ttl}
        if settings.user_jwt_issuer:
            claims["iss"] = settings.user_jwt_issuer
        if settings.user_jwt_audience:
            claims["aud"] = settings.user_jwt_audience
        try:
            token = jwt.encode(claims, key, algorithm=settings.user_jwt_algorithm)
        except (ValueError, TypeError, jwt.InvalidKeyError) as exc:
            raise CLIError(f"{args.key} cannot sign {settings.user_jwt_algorithm}: {exc}") from None
        fan_id = "u:" + args.sub
    if args.json:
        _print_json({"token": token, "fan_id": fan_id})
    else:
        print(token)
    return 0


# --- parser -------------------------------------------------------------------------------


def _port(raw: str) -> int:
    value = _positive_int(raw)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a TCP port (1 to 65535)")
    return value


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} must be at least 1")
    return value


def _on_off(raw: str) -> bool:
    """A switch flag's value: on/off (also true/false, yes/no, 1/0)."""
    value = raw.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{raw!r} is not on or off")


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{raw!r} must be above 0")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, as argparse does, minus usage
        self.exit(2, f"{self.prog}: {message}\n")


#: Commands whose one positional is an id in base64url (a pass's jti, a ticket's code): it
#: may begin with "-", which argparse would take for an option.
_ID_COMMANDS = (("pass", "revoke"), ("checkin",), ("ticket", "void"))


def ids_last(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the id of an :data:`_ID_COMMANDS` command after a ``--`` (and its
    options before it), so that ``waitroom pass revoke -LX_GZ6z...`` revokes that pass
    instead of failing with "the following arguments are required"."""
    for path in _ID_COMMANDS:
        if tuple(argv[: len(path)]) != path or "--" in argv:
            continue
        command = parser
        for name in path:
            command = _subcommand(command, name)
        options: list[str] = []
        positionals: list[str] = []
        rest = argv[len(path) :]
        i = 0
        while i < len(rest):
            word = rest[i]
            action = command._option_string_actions.get(word.split("=", 1)[0])
            if action is None:
                positionals.append(word)
            elif "=" not in word and action.nargs != 0 and i + 1 < len(rest):
                # The option and its value as one word: a value may begin with "-" too.
                i += 1
                options.append(f"{word}={rest[i]}")
            else:
                options.append(word)
            i += 1
        return [*path, *options, "--", *positionals]
    return argv


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def build_parser() -> argparse.ArgumentParser:
    """The full command line of ``waitroom``."""
    parser = _Parser(prog="waitroom", description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the HTTP and WebSocket server")
    serve.add_argument("--host", help="listen address (default WAITROOM_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default WAITROOM_PORT)")
    serve.add_argument(
        "--ws-port",
        type=int,
        help="a second listen port, for the queue WebSockets (default WAITROOM_WS_PORT: none)",
    )
    serve.add_argument(
        "--agent-port",
        type=int,
        help="a port to answer HAProxy's agent check on (default WAITROOM_AGENT_PORT: none)",
    )
    serve.add_argument("--workers", type=_positive_int, default=1, help="worker processes")
    serve.set_defaults(handler=cmd_serve, sync=True)

    work = sub.add_parser(
        "workers", help="run the payment workers, the outbox relay and the hold safety net"
    )
    work.add_argument(
        "--concurrency",
        type=_positive_int,
        help="payments at once (default WAITROOM_PAYMENT_CONCURRENCY)",
    )
    work.add_argument(
        "--metrics-port",
        type=_port,
        help="serve /metrics on this port of WAITROOM_HOST (default WAITROOM_WORKERS_METRICS_PORT;"
        " none when unset)",
    )
    work.add_argument("--no-payments", action="store_true", help="do not run the payment pool")
    work.add_argument("--no-relay", action="store_true", help="do not run the outbox relay")
    work.add_argument("--no-safety-net", action="store_true", help="do not run the safety net")
    work.set_defaults(handler=cmd_workers, sync=True)

    pay = sub.add_parser("payments", help="payments: reconcile charges in doubt")
    paysub = pay.add_subparsers(dest="payments_command", required=True, parser_class=_Parser)
    rec = paysub.add_parser(
        "reconcile", help="settle payments whose charge is in doubt: tickets or a refund (once)"
    )
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(handler=cmd_payments_reconcile)

    mig = sub.add_parser("migrate", help="create the database if needed and apply migrations")
    mig.add_argument("--json", action="store_true")
    mig.set_defaults(handler=cmd_migrate)

    event = sub.add_parser("event", help="create, list, show and delete events")
    esub = event.add_subparsers(dest="event_command", required=True, parser_class=_Parser)
    create = esub.add_parser("create", help="create an event from flags or a JSON/TOML file")
    create.add_argument("--file", help="JSON or TOML file with the event (flags override it)")
    create.add_argument("--id")
    create.add_argument("--name")
    create.add_argument("--venue")
    create.add_argument("--starts-at", help="ISO 8601 time the show starts")
    create.add_argument("--opens-at", help="ISO 8601 time the sale opens (default now)")
    create.add_argument("--mode", choices=("fifo", "lottery"))
    create.add_argument("--rate", type=_positive_float, help="admissions per second")
    create.add_argument("--max-active", type=_positive_int, help="shoppers at once")
    create.add_argument("--pass-ttl", type=_positive_int, help="queue pass lifetime, seconds")
    create.add_argument("--hold-ttl", type=_positive_int, help="hold lifetime, seconds")
    create.add_argument("--grace", type=_positive_int, help="abandonment grace, seconds")
    create.add_argument("--per-fan-limit", type=_positive_int, help="tickets per fan")
    create.add_argument(
        "--waitlist",
        type=_on_off,
        metavar="on|off",
        help="once sold out, keep the line as a waitlist for tickets that come back",
    )
    create.add_argument(
        "--waitlist-until", help="ISO 8601 time the waitlist ends (default: when turned off)"
    )
    create.add_argument(
        "--ticket",
        action="append",
        type=_ticket_flag,
        help="NAME:QUANTITY:PRICE_MINOR:CURRENCY[:PER_FAN_LIMIT] (repeatable)",
    )
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=cmd_event_create)
    lst = esub.add_parser("list", help="list events")
    lst.add_argument("--limit", type=_positive_int, default=100)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=cmd_event_list)
    show = esub.add_parser("show", help="show one event")
    show.add_argument("event")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_event_show)
    delete = esub.add_parser(
        "delete",
        help="delete an event with its orders, holds, passes and Redis keys"
        " (a test or demo sale; stop the server first)",
    )
    delete.add_argument("event")
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete it even with paid orders or payments in flight (erases sold tickets)",
    )
    delete.add_argument("--json", action="store_true")
    delete.set_defaults(handler=cmd_event_delete)

    ven = sub.add_parser("venue", help="an event's seat map: import and export (JSON)")
    vsub = ven.add_subparsers(dest="venue_command", required=True, parser_class=_Parser)
    vimport = vsub.add_parser(
        "import", help="import an event's seat map from a JSON file (see docs/seatmap.md)"
    )
    vimport.add_argument("event")
    vimport.add_argument("file")
    vimport.add_argument("--json", action="store_true")
    vimport.set_defaults(handler=cmd_venue_import)
    vexport = vsub.add_parser("export", help="print an event's seat map as JSON")
    vexport.add_argument("event")
    vexport.add_argument("--output", "-o", help="write it to this file instead")
    vexport.set_defaults(handler=cmd_venue_export)

    adm = sub.add_parser("admission", help="tune a live sale: rate, cap, pause, plan")
    asub = adm.add_subparsers(dest="admission_command", required=True, parser_class=_Parser)
    aset = asub.add_parser("set", help="set the admission rate and/or max active shoppers")
    aset.add_argument("event")
    aset.add_argument("--rate", type=_positive_float, help="admissions per second (> 0)")
    aset.add_argument("--max-active", type=_positive_int, help="passes active at once (>= 1)")
    aset.add_argument(
        "--waitlist",
        type=_on_off,
        metavar="on|off",
        help="keep the line as a waitlist once sold out (off ends a sold-out sale's waitlist)",
    )
    aset.add_argument("--waitlist-until", help="ISO 8601 time the waitlist ends")
    aset.add_argument("--json", action="store_true")
    aset.set_defaults(handler=cmd_admission_set)
    for name, handler, text in (
        ("pause", cmd_admission_pause, "stop admitting; fans keep their places"),
        ("resume", cmd_admission_resume, "admit again"),
    ):
        cmd = asub.add_parser(name, help=text)
        cmd.add_argument("event")
        cmd.add_argument("--json", action="store_true")
        cmd.set_defaults(handler=handler)
    aplan = asub.add_parser("plan", help="dry run: the wait a rate would give the line now")
    aplan.add_argument("event")
    aplan.add_argument("--rate", type=_positive_float, required=True, help="admissions per second")
    aplan.add_argument("--json", action="store_true")
    aplan.set_defaults(handler=cmd_admission_plan)

    pas = sub.add_parser("pass", help="queue passes")
    psub = pas.add_subparsers(dest="pass_command", required=True, parser_class=_Parser)
    revoke = psub.add_parser("revoke", help="revoke a queue pass by its id (jti)")
    revoke.add_argument("jti", help="the pass id (one beginning with - goes after --)")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(handler=cmd_pass_revoke)

    chk = sub.add_parser("checkin", help="check a ticket in at the door (its code or QR text)")
    chk.add_argument("ticket", metavar="CODE", help="the ticket's code or its signed form")
    chk.add_argument("--gate", help="the gate or device name recorded with the check-in")
    chk.add_argument("--event", help="refuse tickets of any other event")
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(handler=cmd_checkin)

    tic = sub.add_parser("ticket", help="tickets")
    ticsub = tic.add_subparsers(dest="ticket_command", required=True, parser_class=_Parser)
    tvoid = ticsub.add_parser("void", help="void a ticket: check-in refuses it")
    tvoid.add_argument("code")
    tvoid.add_argument("--reason")
    tvoid.add_argument("--json", action="store_true")
    tvoid.set_defaults(handler=cmd_ticket_void)

    room = sub.add_parser("room", help="a room's live state in Redis")
    rsub = room.add_subparsers(dest="room_command", required=True, parser_class=_Parser)
    restore = rsub.add_parser(
        "restore", help="write the event's passes from PostgreSQL into Redis again (idempotent)"
    )
    restore.add_argument("event")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(handler=cmd_room_restore)

    status = sub.add_parser("status", help="live view of a sale")
    status.add_argument("event")
    status.add_argument("--watch", action="store_true", help="redraw every second until Ctrl-C")
    status.add_argument("--interval", type=_positive_float, default=1.0, help=argparse.SUPPRESS)
    status.add_argument("--json", action="store_true", help="JSON (one line per refresh)")
    status.set_defaults(handler=cmd_status)

    refunds_cli.add_parser(sub, _Parser)

    token = sub.add_parser("token", help="development tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, parser_class=_Parser)
    issue = tsub.add_parser("issue", help="a fan token to test with (visitor, or user with --key)")
    issue.add_argument("--key", help="host site's private key PEM (user-token mode)")
    issue.add_argument("--sub", help="the user id (user-token mode)")
    issue.add_argument("--ttl", type=_positive_int, default=3600, help="lifetime, seconds")
    issue.add_argument("--json", action="store_true")
    issue.set_defaults(handler=cmd_token_issue, sync=True)

    return parser


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationFailed) and exc.field:
        return f"{exc.field}: {exc.message}"
    if isinstance(exc, WaitroomError | CLIError):
        return str(exc)
    unavailable = dependency_error(exc)
    if unavailable is not None:
        return f"{unavailable.message}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    try:
        settings = load_settings()
    except WaitroomError as exc:
        print(f"waitroom: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(ids_last(parser, list(sys.argv[1:] if argv is None else argv)))
    try:
        if getattr(args, "sync", False):
            return int(args.handler(args, settings))
        return int(asyncio.run(args.handler(args, settings)))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every failure is one line, never a traceback
        print(f"waitroom: {_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
