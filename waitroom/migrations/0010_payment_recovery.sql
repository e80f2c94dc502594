-- waitroom schema, version 10: nothing is dropped after a payment commits.
--
-- 1. Outbox rows the workers act on themselves. A row with handle_after set is a task as well
--    as a message: the workers' outbox consumer (workers/outbox.py) runs the handler of its
--    topic when handle_after is due, and retries it with backoff (handle_attempts,
--    handle_error) until it is done (handled_at set, handle_after back to NULL). The first
--    is 'pass.spent', written in the transaction that marks an order paid: the pass is marked
--    spent and its admission slot freed in Redis, even if Redis is down at that moment.
-- 2. Payments that ended without knowing whether the provider charged (the last attempts
--    timed out) are reconciled (workers/reconcile.py): reconcile is 'due' until a reconciler
--    has asked the provider for the charge by its key and completed the order or refunded
--    the charge; then it says what was done. reconcile_attempts fences the reconcilers'
--    claims as attempts fences the payment workers'. Failed payments of earlier releases that
--    gave up after provider errors are due as well.
-- 3. order_events: the history of an order, one row per step (a payment started, failed,
--    succeeded, reconciled), written in the transaction of the step.
ALTER TABLE outbox
    ADD COLUMN handle_after    timestamptz,
    ADD COLUMN handled_at      timestamptz,
    ADD COLUMN handle_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN handle_error    text;

ALTER TABLE payments
    ADD COLUMN reconcile          text,
    ADD COLUMN reconcile_after    timestamptz,
    ADD COLUMN reconcile_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN reconcile_error    text,
    ADD COLUMN reconciled_at      timestamptz;
ALTER TABLE payments ADD CONSTRAINT payments_reconcile CHECK (
    reconcile IN ('due', 'completed', 'refunded', 'no_charge', 'refund_refused')
);
ALTER TABLE payments ADD CONSTRAINT payments_reconcile_attempts CHECK (reconcile_attempts >= 0);

UPDATE payments
   SET reconcile = 'due', reconcile_after = now()
 WHERE state = 'failed' AND provider_ref IS NULL AND last_error LIKE 'gave up after %';

-- The two queues' indexes, each holding the rows due (typically none). This transaction
-- locks outbox and payments (ALTER TABLE) until it commits, which takes a scan of each for
-- the checks and the indexes (a second or so per million rows): run it outside a sale. Not
-- CONCURRENTLY in a no-transaction migration: while one `waitroom migrate` holds the
-- migrations' advisory lock, another one waiting for it holds a snapshot that CREATE INDEX
-- CONCURRENTLY waits for, and PostgreSQL ends the two as a deadlock.
CREATE INDEX outbox_handle_due ON outbox (handle_after) WHERE handle_after IS NOT NULL;
CREATE INDEX payments_reconcile_due ON payments (reconcile_after) WHERE reconcile = 'due';

CREATE TABLE order_events (
    id          bigserial PRIMARY KEY,
    order_id    uuid NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    payment_id  uuid REFERENCES payments (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CHECK (kind ~ '^[a-z_.]{1,64}$'),
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX order_events_order ON order_events (order_id, id);
