"""``waitroom refunds``: an operator's refunds from a terminal, as the admin API does them.

``list [--event EVENT] [--state STATE]``, ``approve ID``, ``reject ID [--reason TEXT]``,
``policy EVENT --tier 30:100 --tier 7:50 [--approval]`` (``policy EVENT`` alone prints it).
Each talks to PostgreSQL through :mod:`inventory.refunds`, audited as ``cli:USER``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, get_args

import asyncpg
import msgspec

from inventory import refunds
from inventory.refund_policy import RefundPolicy, parse_tier
from waitroom.core.clients import open_clients
from waitroom.core.errors import NotFound, ValidationFailed
from waitroom.core.settings import Settings


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


@asynccontextmanager
async def _db(settings: Settings) -> AsyncIterator[Any]:
    async with AsyncExitStack() as stack:
        clients = await open_clients(settings, stack, check_schema=False)
        pool: asyncpg.Pool[Any] = clients.db
        async with pool.acquire() as conn:
            yield conn


def _print(value: Any, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    else:
        print(text)


def _line(r: refunds.Refund) -> str:
    money = f"{r.amount_minor / 100:.2f} {r.currency}"
    return f"{r.id}  {r.event_id}  {r.state}  {money}  {len(r.tickets)} ticket(s)  {r.percent}%"


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """List refunds, newest first."""
    async with _db(settings) as conn:
        found = await refunds.list_refunds(
            conn, event_id=args.event, state=args.state, limit=args.limit
        )
    _print(found, args.json, "\n".join(map(_line, found)) or "no refunds")
    return 0


async def cmd_approve(args: argparse.Namespace, settings: Settings) -> int:
    """Approve a refund waiting for an operator."""
    async with _db(settings) as conn:
        refund = await refunds.approve_refund(conn, args.id, actor=_actor())
    _print(refund, args.json, f"approved: {_line(refund)}")
    return 0


async def cmd_reject(args: argparse.Namespace, settings: Settings) -> int:
    """Reject a refund waiting for an operator."""
    async with _db(settings) as conn:
        refund = await refunds.reject_refund(conn, args.id, actor=_actor(), reason=args.reason)
    _print(refund, args.json, f"rejected: {_line(refund)}")
    return 0


async def cmd_policy(args: argparse.Namespace, settings: Settings) -> int:
    """Set (with ``--tier``) or show an event's refund policy."""
    async with _db(settings) as conn:
        if args.tier:
            try:
                tiers = [parse_tier(raw) for raw in args.tier]
            except ValueError as exc:
                raise ValidationFailed(str(exc), field="--tier") from None
            stored = await refunds.set_policy(
                conn, args.event, RefundPolicy(tiers, args.approval), actor=_actor()
            )
        else:
            found = await refunds.get_policy(conn, args.event)
            if found is None:
                raise NotFound(f"{args.event} has no refund policy: it takes no refunds")
            stored = found
    tiers_text = ", ".join(f"{t.percent}% until {t.until_days_before} days" for t in stored.tiers)
    approval = "; an operator approves each refund" if stored.requires_approval else ""
    _print(stored, args.json, f"{stored.event_id}: {tiers_text}{approval}")
    return 0


def _limit(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to 500, not {raw!r}")
    return int(raw)


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``refunds`` and its subcommands to the console script's subparsers ``sub``."""
    ref = sub.add_parser("refunds", help="refunds: list, approve, reject, set the policy")
    rsub = ref.add_subparsers(dest="refunds_command", required=True, parser_class=parser_class)
    lst = rsub.add_parser("list", help="list refunds, newest first")
    lst.add_argument("--event", help="only this event's")
    lst.add_argument("--state", choices=sorted(get_args(refunds.RefundState)))
    lst.add_argument("--limit", type=_limit, default=100, help="at most this many (1-500)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=cmd_list)
    for name, handler, text in (
        ("approve", cmd_approve, "approve a refund: void its tickets, give the money back"),
        ("reject", cmd_reject, "reject a refund: its tickets stay valid"),
    ):
        cmd = rsub.add_parser(name, help=text)
        cmd.add_argument("id", metavar="ID")
        if name == "reject":
            cmd.add_argument("--reason")
        cmd.add_argument("--json", action="store_true")
        cmd.set_defaults(handler=handler)
    pol = rsub.add_parser("policy", help="set an event's refund policy (or show it)")
    pol.add_argument("event")
    pol.add_argument(
        "--tier", action="append", metavar="DAYS:PERCENT", help="e.g. 30:100 (repeatable)"
    )
    pol.add_argument("--approval", action="store_true", help="an operator approves each refund")
    pol.add_argument("--json", action="store_true")
    pol.set_defaults(handler=cmd_policy)
