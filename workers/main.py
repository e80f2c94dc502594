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
- ``backlog``: what waits for the workers in PostgreSQL, as gauges (:mod:`workers.backlog`).

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

from inventory.hosting import InventoryHost
from waitroom.core.clients import Clients, open_clients
from waitroom.core.metrics import MetricsListener, monitoring
from waitroom.core.settings import Settings
from workers.backlog import run_backlog
from workers.outbox import PASS_SPENT, Handler, pass_spent_handler, run_handlers, run_relay
from workers.payments import PaymentPool
from workers.reconcile import Reconciler, ReconcileReport
from workers.safety import run_safety_net

log = logging.getLogger("waitroom.workers")

#: How long in-flight payments may take to finish at shutdown before they are handed back.
DRAIN_S = 10.0


@dataclass(frozen=True, slots=True)
class WorkerServices:
    """What the worker loops of one ``waitroom workers`` process use."""

    clients: Clients
    inventory: InventoryHost
    #: The payment provider's HTTP client.
    http: httpx.AsyncClient

    def outbox_handlers(self) -> dict[str, Handler]:
        """The outbox tasks this process runs, by topic."""
        return {PASS_SPENT: pass_spent_handler(self.clients.redis, self.clients.keys)}

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
    inventory = InventoryHost(clients.db, clients.redis, clients.keys)
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
                    svc.clients.redis, svc.clients.db, timeout_s=settings.dependency_timeout_s
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
            tasks.append(asyncio.create_task(run_backlog(svc.clients.db, stop), name="backlog"))
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
            # Each loop returns on its own once stop is set, after finishing what it holds.
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for task, result in zip(tasks, results, strict=True):
                if isinstance(result, BaseException):
                    log.error(
                        "worker loop failed",
                        extra={"loop": task.get_name(), "error": repr(result)},
                    )
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


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("signal received; shutting down", extra={"signal": sig.name})
    stop.set()
