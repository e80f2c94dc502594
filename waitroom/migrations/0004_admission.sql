-- waitroom schema, version 4: the queue passes the admission loops issue.
--
-- One row per pass, written by the event's admission leader shortly after it admitted the
-- fan (off the admission path, in one statement per tick). Operators revoke a pass by its
-- jti alone, so this is where its event, fan and expiry are found; it is also the durable
-- record of who was admitted when, in which order (seq).
CREATE TABLE queue_passes (
    jti         text PRIMARY KEY CHECK (length(jti) BETWEEN 1 AND 64),
    event_id    text NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    fan_id      text NOT NULL CHECK (length(fan_id) BETWEEN 1 AND 200),
    seq         bigint NOT NULL CHECK (seq > 0),
    issued_at   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX queue_passes_event ON queue_passes (event_id, seq);
CREATE INDEX queue_passes_fan ON queue_passes (event_id, fan_id);
