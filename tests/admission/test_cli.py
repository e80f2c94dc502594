"""The operators' CLI through the real console script, against a running server."""

from __future__ import annotations

import asyncio
import getpass
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from admission.passes import PassKeys
from tests.admission.support import create_event, join, me, wait_for
from tests.harness import ROOT, ServerThread, run_cli
from waitroom.cli import build_parser, ids_last
from waitroom.core.settings import Settings, settings_env


def ok(settings: Settings, *args: str) -> str:
    result = run_cli(settings, *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def fails(settings: Settings, *args: str) -> tuple[int, str]:
    result = run_cli(settings, *args)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # one line, never a traceback
    assert lines[0].startswith("waitroom"), lines
    return result.returncode, lines[0]


def live(admin: httpx.Client, event_id: str) -> dict[str, Any]:
    body: dict[str, Any] = admin.get(f"/v1/admin/events/{event_id}/admission").json()
    return body


def test_set_pause_resume_and_plan_change_the_sale_and_are_audited(
    server: ServerThread, admin: httpx.Client, client: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=0.2, max_active=1000)
    fans = [join(client, event_id) for _ in range(30)]
    wait_for(lambda: live(admin, event_id)["admitted_total"] >= 1)

    out = json.loads(ok(settings, "admission", "pause", event_id, "--json"))
    assert out["paused"] is True
    wait_for(lambda: me(client, event_id, fans[-1][1])["status"] == "paused", timeout=3)

    plan = json.loads(ok(settings, "admission", "plan", event_id, "--rate", "10", "--json"))
    waiting = live(admin, event_id)["fans_waiting"]
    assert plan["fans_waiting"] == waiting
    assert plan["last_fan_wait_s"] == pytest.approx(waiting / 10, abs=0.1)
    text = ok(settings, "admission", "plan", event_id, "--rate", "0.5")
    assert f"{waiting} fans in line" in text and "the last fan waits" in text
    assert live(admin, event_id)["rate_per_second"] == 0.2  # a dry run changes nothing

    before = live(admin, event_id)["admitted_total"]
    ok(settings, "admission", "set", event_id, "--rate", "100", "--max-active", "12")
    assert live(admin, event_id)["admitted_total"] == before  # still paused
    out_text = ok(settings, "admission", "resume", event_id)
    resumed_at = time.monotonic()
    assert "admitting at 100/s, at most 12 shopping at once" in out_text
    # The change reaches the leader within a second of the command returning.
    wait_for(lambda: live(admin, event_id)["admitted_total"] >= before + 5, timeout=3, every=0.01)
    assert time.monotonic() - resumed_at < 1.0
    wait_for(lambda: live(admin, event_id)["active_passes"] == 12)
    time.sleep(0.3)
    assert live(admin, event_id)["active_passes"] == 12  # the cap set from the CLI holds

    async def audit() -> list[Any]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return list(
                await conn.fetch(
                    "SELECT actor, old, new, at FROM audit_log"
                    " WHERE event_id = $1 AND action = 'admission.update' ORDER BY id",
                    event_id,
                )
            )
        finally:
            await conn.close()

    rows = asyncio.run(audit())
    assert [r["actor"] for r in rows] == [f"cli:{getpass.getuser()}"] * 3
    no_waitlist = {"waitlist": False, "waitlist_until": None}
    assert [json.loads(r["new"]) for r in rows] == [
        {"rate_per_second": 0.2, "max_active": 1000, "paused": True, **no_waitlist},
        {"rate_per_second": 100.0, "max_active": 12, "paused": True, **no_waitlist},
        {"rate_per_second": 100.0, "max_active": 12, "paused": False, **no_waitlist},
    ]
    assert json.loads(rows[1]["old"]) == json.loads(rows[0]["new"])


def test_status_json_and_pass_revoke(
    server: ServerThread, admin: httpx.Client, client: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, rate=50, max_active=2, quantity=40)
    fans = [join(client, event_id) for _ in range(5)]
    wait_for(lambda: live(admin, event_id)["admitted_total"] == 2)
    status = json.loads(ok(settings, "status", event_id, "--json"))
    assert status["event_id"] == event_id
    assert (status["fans_waiting"], status["admitted_total"], status["active_passes"]) == (3, 2, 2)
    assert (status["rate_per_second"], status["max_active"], status["tickets_left"]) == (
        50.0,
        2,
        40,
    )
    assert status["leader"] is True
    assert status["last_fan_wait_s"] is not None
    assert "observed_rate" in status
    text = ok(settings, "status", event_id)
    assert "fans waiting      3" in text and "tickets left      40" in text

    queue_pass = me(client, event_id, fans[0][1])["queue_pass"]
    jti = (
        PassKeys.from_settings(settings)
        .verify(
            queue_pass, issuer="waitroom", event_id=event_id, fan_id=fans[0][0], now=time.time()
        )
        .jti
    )
    out = ok(settings, "pass", "revoke", jti)
    assert out.startswith(f"revoked pass {jti} of fan {fans[0][0]}")
    # The slot is free: the next fan goes in.
    wait_for(lambda: live(admin, event_id)["admitted_total"] == 3)
    assert json.loads(ok(settings, "pass", "revoke", jti, "--json"))["jti"] == jti  # idempotent


def test_status_watch_redraws_every_second_until_interrupted(
    server: ServerThread, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin)
    exe = Path(sys.executable).with_name("waitroom")
    proc = subprocess.Popen(
        [str(exe), "status", event_id, "--watch", "--json"],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    time.sleep(3.5)
    proc.send_signal(2)  # Ctrl-C
    out, err = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in out.splitlines()]
    assert 3 <= len(lines) <= 5, out
    assert all(line["event_id"] == event_id for line in lines)
    assert "Traceback" not in err


def test_errors_are_one_clear_line(
    server: ServerThread, admin: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin)
    code, line = fails(settings, "admission", "set", "no-such-event", "--rate", "5")
    assert (code, line) == (1, "waitroom: no event 'no-such-event'")
    code, line = fails(settings, "admission", "set", event_id, "--rate", "-5")
    assert code == 2 and line == "waitroom admission set: argument --rate: '-5' must be above 0"
    code, line = fails(settings, "admission", "set", event_id, "--rate", "0")
    assert code == 2 and "must be above 0" in line
    code, line = fails(settings, "admission", "set", event_id, "--rate", "100001")
    assert code == 1 and line.startswith("waitroom: rate_per_second: ")
    code, line = fails(settings, "admission", "set", event_id, "--max-active", "0")
    assert code == 2 and "must be at least 1" in line
    code, line = fails(settings, "admission", "set", event_id)
    assert (code, line) == (1, "waitroom: give --rate, --max-active and/or --waitlist")
    code, line = fails(settings, "admission", "pause", "no-such-event")
    assert line == "waitroom: no event 'no-such-event'"
    code, line = fails(settings, "status", "no-such-event", "--json")
    assert line == "waitroom: no event 'no-such-event'"
    code, line = fails(settings, "admission", "plan", "no-such-event", "--rate", "3")
    assert line == "waitroom: no event 'no-such-event'"
    code, line = fails(settings, "pass", "revoke", "not-a-pass")
    assert (code, line) == (1, "waitroom: no queue pass 'not-a-pass'")


def test_token_issue_gives_a_visitor_token_the_server_accepts(
    server: ServerThread, admin: httpx.Client, client: httpx.Client, settings: Settings
) -> None:
    event_id = create_event(admin, paused=True)
    out = json.loads(ok(settings, "token", "issue", "--json"))
    assert out["fan_id"].startswith("v_")
    joined = client.post(
        f"/v1/events/{event_id}/queue", headers={"Authorization": f"Bearer {out['token']}"}
    )
    assert joined.status_code == 201
    assert joined.json()["fan_id"] == out["fan_id"]
    assert ok(settings, "token", "issue").count(".") == 2


# --- ids that begin with "-" ----------------------------------------------------------------


def test_an_id_beginning_with_a_dash_is_an_id_not_an_option(settings: Settings) -> None:
    """Pass ids and ticket codes are base64url: one in 64 begins with "-" (CI once drew one,
    and `waitroom pass revoke -LX_GZ6z...` answered "the following arguments are required")."""
    result = run_cli(settings, "pass", "revoke", "-nosuchpass0000000000", "--json")
    # Parsed: the command ran and found no such pass (exit 1), not an argparse error (2).
    assert result.returncode == 1, result.stderr
    assert "arguments are required" not in result.stderr
    assert "no queue pass '-nosuchpass0000000000'" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["pass", "revoke", "-LX_GZ6z"], {"jti": "-LX_GZ6z", "json": False}),
        (["pass", "revoke", "-LX_GZ6z", "--json"], {"jti": "-LX_GZ6z", "json": True}),
        (["pass", "revoke", "--json", "--Ab"], {"jti": "--Ab", "json": True}),
        (["pass", "revoke", "plain"], {"jti": "plain"}),
        (
            ["checkin", "--gate", "north", "-q1", "--event=e1"],
            {"ticket": "-q1", "gate": "north", "event": "e1"},
        ),
        (["ticket", "void", "-c0de", "--reason", "-lost"], {"code": "-c0de", "reason": "-lost"}),
        (["pass", "revoke", "--", "-x"], {"jti": "-x"}),
    ],
)
def test_ids_go_after_the_options(argv: list[str], expected: dict[str, Any]) -> None:
    parser = build_parser()
    args = parser.parse_args(ids_last(parser, argv))
    assert {k: getattr(args, k) for k in expected} == expected


def test_other_commands_are_left_alone() -> None:
    parser = build_parser()
    argv = ["status", "evt-1", "--json"]
    assert ids_last(parser, argv) == argv
