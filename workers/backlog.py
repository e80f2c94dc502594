"""What waits in PostgreSQL for the workers, as gauges: the operators' view of their backlog.

Every :data:`SAMPLE_EVERY_S` each ``waitroom workers`` process reads, with a few statements on
partial indexes (each reads only the rows still waiting, never the settled history):

- payments ``pending`` and ``processing`` (``payments_due``), and those failed in doubt
  that wait for the reconciler (``payments_reconcile_due``);
- the outbox's rows not yet published, and how long the oldest has waited
  (``outbox_pending``), and its tasks not yet handled (``outbox_handle_due``);
- holds still ``held`` more than :data:`workers.safety.GRACE_S` past their deadline
  (``holds_live``), and how far past the oldest is: the actors and the safety net release
  them within seconds, so a figure that stays up means neither runs.

The figures are the deployment's, not the process's: every workers process reports the
same, and dashboards and alerts take their ``max``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg
from prometheus_client import Gauge

from workers.safety import GRACE_S

log = logging.getLogger("waitroom.backlog")

#: Seconds between two samples.
SAMPLE_EVERY_S = 5.0
_ERROR_LOG_EVERY_S = 60.0

PAYMENTS_IN_FLIGHT = Gauge(
    "waitroom_payments_in_flight",
    "Payments not finished yet, by state (pending: waiting for a worker or a retry;"
    " processing: claimed by a worker).",
    ["state"],
    multiprocess_mode="livemax",
)
PAYMENTS_AWAITING_RECONCILE = Gauge(
    "waitroom_payments_awaiting_reconcile",
    "Failed payments whose charge is in doubt, waiting for the reconciler to ask the provider.",
    multiprocess_mode="livemax",
)
OUTBOX_UNPUBLISHED = Gauge(
    "waitroom_outbox_unpublished",
    "Outbox rows not yet published to the Redis stream (dead letters excluded).",
    multiprocess_mode="livemax",
)
OUTBOX_LAG = Gauge(
    "waitroom_outbox_lag_seconds",
    "Age of the oldest outbox row not yet published; 0 when none waits.",
    multiprocess_mode="livemax",
)
OUTBOX_TASKS = Gauge(
    "waitroom_outbox_tasks_pending",
    "Outbox tasks (pass.spent...) not yet handled, due or backing off after a failure.",
    multiprocess_mode="livemax",
)
HOLDS_OVERDUE = Gauge(
    "waitroom_holds_overdue",
    f"Holds still held more than {GRACE_S:g} s past their deadline.",
    multiprocess_mode="livemax",
)
HOLDS_OVERDUE_SECONDS = Gauge(
    "waitroom_holds_overdue_seconds",
    "How far past its deadline the oldest hold still held is; 0 when none is.",
    multiprocess_mode="livemax",
)

_PAYMENTS = (
    "SELECT state, count(*) AS n FROM payments"
    " WHERE state IN ('pending', 'processing') GROUP BY state"
)
_RECONCILE = "SELECT count(*) FROM payments WHERE reconcile = 'due'"
_OUTBOX = (
    "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8"
    " AS lag FROM outbox WHERE published_at IS NULL AND NOT dead"
)
_TASKS = "SELECT count(*) FROM outbox WHERE handle_after IS NOT NULL"
#: ``status = 'held'`` lets PostgreSQL read the partial index ``holds_live`` only.
_HOLDS = (
    "SELECT count(*) FILTER (WHERE expires_at < now() - make_interval(secs => $1)) AS n,"
    " coalesce(extract(epoch FROM now() - min(expires_at)), 0)::float8 AS late"
    " FROM holds WHERE status = 'held' AND expires_at < now()"
)


async def sample(pool: asyncpg.Pool[Any]) -> None:
    """Read the backlog once and set the gauges."""
    async with pool.acquire() as conn:
        payments = {r["state"]: r["n"] for r in await conn.fetch(_PAYMENTS)}
        reconcile = await conn.fetchval(_RECONCILE)
        outbox = await conn.fetchrow(_OUTBOX)
        tasks = await conn.fetchval(_TASKS)
        holds = await conn.fetchrow(_HOLDS, GRACE_S)
    for state in ("pending", "processing"):
        PAYMENTS_IN_FLIGHT.labels(state).set(payments.get(state, 0))
    PAYMENTS_AWAITING_RECONCILE.set(reconcile)
    assert outbox is not None and holds is not None  # aggregates always return a row
    OUTBOX_UNPUBLISHED.set(outbox["n"])
    OUTBOX_LAG.set(max(0.0, outbox["lag"]))
    OUTBOX_TASKS.set(tasks)
    HOLDS_OVERDUE.set(holds["n"])
    HOLDS_OVERDUE_SECONDS.set(max(0.0, holds["late"]))


async def run_backlog(
    pool: asyncpg.Pool[Any], stop: asyncio.Event, *, every_s: float = SAMPLE_EVERY_S
) -> None:
    """Sample every ``every_s`` until ``stop`` is set; a failed sample is skipped (the
    gauges keep their last figures, and the dependency's own metrics say why)."""
    logged_at = 0.0
    while not stop.is_set():
        try:
            await sample(pool)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - logged_at > _ERROR_LOG_EVERY_S:
                logged_at = time.monotonic()
                log.warning("sampling the backlog failed", extra={"error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
