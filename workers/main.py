"""``waitroom workers``: payments, reconciliation, the outbox and the safety net in one process.

The process's composition root, :func:`open_worker_services`, opens its clients (Redis, a
PostgreSQL pool, an inventory host, an HTTP client for the provider); :func:`run_workers` runs
the loops until SIGTERM or SIGINT:

- ``payments``: the payment pool (:mod:`workers.payments`), heartbeating its claims and
  taking over those of stalled workers;
- ``reconcile``: the reconciler (:mod:`workers.reconcile`), every
  ``WAITROOM_PAYMENT_RECONCILE_INTERVAL_S``; runs with the payments (``payments=False`` turns
  both off);
- ``outbox``: the relay to the Redis stream, and ``outbox-tasks``: the consumer of the
  outbox's tasks (:func:`workers.outbox.run_handlers`; today ``pass.spent``, which spends the
  pass of a paid order in Redis); both run with ``relay``;
- ``safety-net``: lapsed holds of events nobody hosts, and the idempotency records' purge;
  with it, ``redis-restarts`` (:mod:`workers.redis_restarts`): after Redis restarts from its
  file or a replica is promoted, the passes' state is rebuilt from PostgreSQL and the
  outbox's last messages published again (what the lost last second held);
- ``refunds``: the refund worker (:mod:`workers.refunds`): money back through the provider,
  tickets back to stock through the inventory; runs with the payments;
- ``backlog``: what waits for the workers in PostgreSQL, as gauges (:mod:`workers.backlog`);
- ``mailer``: the e-mail notifications over SMTP (:mod:`workers.mailer`), when
  ``WAITROOM_SMTP_URL`` is set (otherwise logged once; the rows wait). The outbox consumer
  also handles ``order.refunded`` (a refund's e-mail is created).

With ``WAITROOM_WORKERS_METRICS_PORT`` (or ``waitroom workers --metrics-port``) set, the process
serves ``GET /metrics`` on that port of ``WAITROOM_HOST``: its payments, inventory actors and
backlog, as the server's ``/metrics`` does (an operator's token unless metrics are public).

It then shuts down gracefully: every loop stops taking new work, payments in flight get
``drain_s`` to finish and are then handed back to ``pending`` (their keys make the next claim
resume them safely), the relay finishes its batch, and the clients close. Nothing is lost:
whatever was not finished is still in PostgreSQL for the next process.

:func:`reconcile_payments` is ``waitroom payments reconcile``: one reconciliation pass.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx

from admission.passes import PassKeys
from inventory.hosting import LEASE_TTL_S, InventoryHost
from waitroom.core.clients import Clients, open_clients
from waitroom.core.metrics import MetricsListener, monitoring
from waitroom.core.runtime import cancel_and_wait, suspended_in
from waitroom.core.settings import Settings
from workers.backlog import run_backlog
from workers.mailer import Mailer, refund_handler
from workers.notifications import ORDER_REFUNDED_TOPIC
from workers.outbox import PASS_SPENT, Handler, pass_spent_handler, run_handlers, run_relay
from workers.payments import PaymentPool
from workers.reconcile import Reconciler, ReconcileReport
from workers.redis_restarts import run_restart_watch
from workers.refunds import RefundWorker
from workers.safety import run_safety_net

log = logging.getLogger("waitroom.workers")

#: How long in-flight payments may take to finish at shutdown before they are handed back.
DRAIN_S = 10.0
#: How much longer than ``drain_s`` a loop may take to return once stopped before it is
#: cancelled (a hung dependency call must not keep the process from exiting).
STOP_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class WorkerServices:
    """What the worker loops of one ``waitroom workers`` process use."""

    clients: Clients
    inventory: InventoryHost
    #: The payment provider's HTTP client.
    http: httpx.AsyncClient

    def outbox_handlers(self) -> dict[str, Handler]:
        """The outbox tasks this process runs, by topic."""
        return {
            PASS_SPENT: pass_spent_handler(self.clients.redis, self.clients.keys),
            # A completed refund's e-mail (created even while no SMTP server is configured).
            ORDER_REFUNDED_TOPIC: refund_handler(self.clients.db),
        }

    def reconciler(self) -> Reconciler:
        """A reconciler on this process's clients, with the settings' timeouts."""
        settings = self.clients.settings
        return Reconciler(
            self.clients.db,
            self.inventory,
            self.http,
            timeout_s=settings.payment_timeout_s,
            heartbeat_timeout_s=settings.payment_heartbeat_timeout_s,
        )


async def open_worker_services(settings: Settings, stack: AsyncExitStack) -> WorkerServices:
    """Build the workers' services in order; ``stack`` stops them in reverse order."""
    clients = await open_clients(settings, stack)
    http = httpx.AsyncClient(
        base_url=settings.payment_url,
        timeout=settings.payment_timeout_s,
        limits=httpx.Limits(max_connections=settings.payment_concurrency),
    )
    stack.push_async_callback(http.aclose)
    # The workers confirm payments through an event's actor, but no fan's reservation
    # arrives here: an actor hosted here would have every reservation forwarded to it. So an
    # event nobody owns is left to the nodes for a lease's time first (a node whose lease
    # lapsed mid-sale is replaced by another node, not by this process); with no node to
    # take it, the workers host it themselves and payments still settle.
    inventory = InventoryHost(clients.db, clients.redis, clients.keys, standby_s=2 * LEASE_TTL_S)
    await inventory.start()
    # Stopped before the clients close: pending asks get their answers or a clear 503.
    stack.push_async_callback(inventory.stop)
    return WorkerServices(clients, inventory, http)


async def run_workers(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    payments: bool = True,
    relay: bool = True,
    safety_net: bool = True,
    mailer: bool = True,
    drain_s: float = DRAIN_S,
) -> None:
    """Run the workers until ``stop`` is set (default: until SIGTERM or SIGINT)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _on_signal, stop, sig)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with AsyncExitStack() as stack:
            svc = await open_worker_services(settings, stack)
            await stack.enter_async_context(
                monitoring(
                    svc.clients.redis,
                    svc.clients.db,
                    timeout_s=settings.dependency_timeout_s,
                    stall_ms=settings.stall_ms,
                )
            )
            if settings.workers_metrics_port is not None:
                listener = MetricsListener(settings, settings.workers_metrics_port)
                await listener.start()
                # Stopped after the loops (the stack closes after them): a scrape while
                # payments drain still answers.
                stack.push_async_callback(listener.stop)
            if payments:
                payment_pool = PaymentPool(
                    svc.clients.db,
                    svc.inventory,
                    svc.http,
                    concurrency=settings.payment_concurrency,
                    timeout_s=settings.payment_timeout_s,
                    drain_s=drain_s,
                    heartbeat_timeout_s=settings.payment_heartbeat_timeout_s,
                    reconcile_delay_s=settings.payment_reconcile_delay_s,
                )
                tasks.append(asyncio.create_task(payment_pool.run(stop), name="payments"))
                refund_worker = RefundWorker(
                    svc.clients.db,
                    svc.inventory,
                    svc.http,
                    timeout_s=settings.payment_timeout_s,
                    reconcile_delay_s=settings.payment_reconcile_delay_s,
                )
                tasks.append(asyncio.create_task(refund_worker.run(stop), name="refunds"))
                reconciler = svc.reconciler()
                tasks.append(
                    asyncio.create_task(
                        reconciler.run(stop, interval_s=settings.payment_reconcile_interval_s),
                        name="reconcile",
                    )
                )
            c = svc.clients
            if relay:
                tasks.append(
                    asyncio.create_task(run_relay(c.db, c.redis, c.keys, stop), name="outbox")
                )
                tasks.append(
                    asyncio.create_task(
                        run_handlers(c.db, svc.outbox_handlers(), stop), name="outbox-tasks"
                    )
                )
            if safety_net:
                tasks.append(
                    asyncio.create_task(
                        run_safety_net(
                            c.db,
                            c.redis,
                            c.keys,
                            stop,
                            idempotency_ttl_s=settings.idempotency_ttl_s,
                        ),
                        name="safety-net",
                    )
                )
                tasks.append(
                    asyncio.create_task(
                        run_restart_watch(c.db, c.redis, c.keys, stop), name="redis-restarts"
                    )
                )
            tasks.append(asyncio.create_task(run_backlog(svc.clients.db, stop), name="backlog"))
            if mailer and settings.smtp_url is not None:
                sender = Mailer.from_settings(settings, c.db, PassKeys.from_settings(settings))
                tasks.append(asyncio.create_task(sender.run(stop), name="mailer"))
            elif mailer:
                log.info("e-mail off: WAITROOM_SMTP_URL is not set; notifications wait unsent")
            log.info(
                "workers started",
                extra={
                    "loops": [t.get_name() for t in tasks],
                    "payment_url": settings.payment_url,
                    "concurrency": settings.payment_concurrency,
                },
            )
            await stop.wait()
            log.info("workers stopping")
            await stop_loops(tasks, within_s=drain_s + STOP_GRACE_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in handled:
            loop.remove_signal_handler(sig)
        log.info("workers stopped")


async def reconcile_payments(settings: Settings) -> ReconcileReport:
    """One reconciliation pass with the workers' clients (``waitroom payments reconcile``).

    Safe while workers run: reconcilers fence each other (see :mod:`workers.reconcile`).
    """
    async with AsyncExitStack() as stack:
        svc = await open_worker_services(settings, stack)
        return await svc.reconciler().run_once()


async def stop_loops(tasks: list[asyncio.Task[Any]], *, within_s: float) -> None:
    """Wait for the loops to return (each does once stop is set, after finishing what it
    holds); one still running after ``within_s`` is logged with where it waits and cancelled,
    so a call that never answers cannot keep the process from exiting."""
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=within_s)
        for task in late:
            log.error(
                "worker loop did not stop in time; cancelled",
                extra={"loop": task.get_name(), "waiting_in": suspended_in(task)},
            )
            await cancel_and_wait(task)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("worker loop failed", extra={"loop": task.get_name(), "error": repr(error)})


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("signal received; shutting down", extra={"signal": sig.name})
    stop.set()
