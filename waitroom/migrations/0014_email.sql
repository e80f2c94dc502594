-- waitroom schema, version 14: e-mail notifications (workers/notifications.py, workers/mailer.py).
--
-- 1. orders.email: the address the fan gave when confirming (optional). No address, no
--    e-mail: the notification is still recorded, as 'skipped'.
-- 2. notifications: one row per e-mail to send, created in the transaction of the change it
--    announces (an order paid, a payment failed) or by a handler (a refund) or the reminder
--    job. dedup_key is UNIQUE, so each notification is created once however often its
--    trigger runs ("order_confirmed:<order>", "payment_failed:<payment>",
--    "refund_processed:<refund>", "event_reminder:<order>").
--    States: pending (due at next_attempt_at) -> sending (claimed by a mailer until
--    lease_until; a mailer that dies leaves it to be claimed again after the lease) -> sent;
--    back to pending after a failed attempt (backoff); dead after a permanent refusal or too
--    many attempts; skipped when there is no address. message_id is set at the first claim,
--    derived from dedup_key and the sender's domain, and never changes: every attempt of one
--    notification sends the same Message-ID.
ALTER TABLE orders ADD COLUMN email text CHECK (email IS NULL OR length(email) BETWEEN 3 AND 254);

CREATE TABLE notifications (
    id               bigserial PRIMARY KEY,
    dedup_key        text NOT NULL UNIQUE CHECK (length(dedup_key) <= 200),
    kind             text NOT NULL
                     CHECK (kind IN ('order_confirmed', 'payment_failed', 'refund_processed',
                                     'event_reminder')),
    order_id         uuid NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    event_id         text NOT NULL,
    recipient        text,
    detail           jsonb NOT NULL DEFAULT '{}',
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sending', 'sent', 'skipped', 'dead')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    last_error       text,
    message_id       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz,
    CHECK (state <> 'sending' OR lease_until IS NOT NULL),
    CHECK (state <> 'sent' OR sent_at IS NOT NULL),
    CHECK (state = 'skipped' OR recipient IS NOT NULL),
    CHECK (state NOT IN ('sending', 'sent') OR message_id IS NOT NULL)
);
-- The mailers' queue: the rows still to send (typically few).
CREATE INDEX notifications_due ON notifications (next_attempt_at)
    WHERE state IN ('pending', 'sending');
CREATE INDEX notifications_order ON notifications (order_id);
