-- waitroom schema, version 23: a one-trip group commit's rows as one JSON document.
--
-- inventory_commit_holds() (schema 22) took a batch's rows as 20 parallel arrays, and
-- encoding them cost the actor's process ~11 us per new hold: asyncpg converts every element
-- of every array on its own, in the process (and on the event loop) that serves the sale's
-- HTTP requests, and at checkout rates that process, not PostgreSQL, runs out of CPU.
-- msgspec encodes the same rows as one JSON document for a fraction of that, so
-- inventory_commit_json() takes them as one jsonb parameter:
--
--   {"u": [[id, status, payment_ref], ...],                        the settled holds
--    "k": [[fan, key, request_hash, status_code, response], ...],  the idempotency records
--    "o": [[topic, payload], ...],                                 the outbox messages
--    "h": [[id, ticket_type, fan, quantity, status, pass_jti,      the new holds
--           payment_ref, expires_at, key, request_hash], ...]}
--
-- Arrays, not objects: no key to encode per value. null is SQL NULL. expires_at is an
-- integer of microseconds since the Unix epoch: exact, like timestamptz, where a float of
-- seconds can land a hair to either side of a microsecond. A response is a JSON value (it
-- becomes jsonb anyway); an outbox payload is a JSON string holding the message, because
-- outbox.payload is json stored as sent (schema 1), which the jsonb form of an object would
-- not keep (it reorders keys and spaces them). jsonb, not json: the document is parsed once,
-- and its values are then read by position without parsing again. With json every -> and
-- ->> parses its whole operand again (the outbox payload, as long as the holds, included):
-- a batch of 256 holds took ~1.7 times as long as with the arrays, where as jsonb it takes
-- no longer than they did.
--
-- It does what inventory_commit_holds() does, in the same order, as one statement: the
-- fence, the settled holds, the keys and the messages by inventory_commit() (schema 7), then
-- the new holds in one INSERT. inventory_commit_holds() stays: migrations never change.
CREATE FUNCTION inventory_commit_json(
    p_event  text,
    p_epoch  bigint,
    p_rows   jsonb
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    u_id           uuid[];
    u_status       text[];
    u_payment_ref  text[];
    k_fan          text[];
    k_key          text[];
    k_hash         text[];
    k_status       integer[];
    k_response     text[];
    o_topic        text[];
    o_payload      text[];
BEGIN
    -- Each list's columns as inventory_commit()'s arrays, in the list's order (array_agg of
    -- no rows is NULL: an empty array then).
    SELECT coalesce(array_agg((r->>0)::uuid ORDER BY n), '{}'),
           coalesce(array_agg(r->>1 ORDER BY n), '{}'),
           coalesce(array_agg(r->>2 ORDER BY n), '{}')
      INTO u_id, u_status, u_payment_ref
      FROM jsonb_array_elements(p_rows->'u') WITH ORDINALITY AS u(r, n);
    SELECT coalesce(array_agg(r->>0 ORDER BY n), '{}'),
           coalesce(array_agg(r->>1 ORDER BY n), '{}'),
           coalesce(array_agg(r->>2 ORDER BY n), '{}'),
           coalesce(array_agg((r->>3)::integer ORDER BY n), '{}'),
           coalesce(array_agg((r->4)::text ORDER BY n), '{}')
      INTO k_fan, k_key, k_hash, k_status, k_response
      FROM jsonb_array_elements(p_rows->'k') WITH ORDINALITY AS k(r, n);
    SELECT coalesce(array_agg(r->>0 ORDER BY n), '{}'),
           coalesce(array_agg(r->>1 ORDER BY n), '{}')
      INTO o_topic, o_payload
      FROM jsonb_array_elements(p_rows->'o') WITH ORDINALITY AS o(r, n);
    -- The fence first (it locks the event's owner row), then what it always did.
    PERFORM inventory_commit(p_event, p_epoch, u_id, u_status, u_payment_ref, k_fan, k_key,
                             k_hash, k_status, k_response, o_topic, o_payload);
    IF jsonb_array_length(p_rows->'h') > 0 THEN
        -- One statement: the holds' statement triggers (ticket types exist, no oversell)
        -- fire once for the batch, as they did for the COPY.
        INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, pass_jti,
                           payment_ref, expires_at, idempotency_key, request_hash)
        SELECT (r->>0)::uuid, p_event, r->>1, r->>2, (r->>3)::integer, r->>4, r->>5, r->>6,
               'epoch'::timestamptz + (r->>7)::bigint * interval '1 microsecond',
               r->>8, r->>9
          FROM jsonb_array_elements(p_rows->'h') AS h(r);
    END IF;
END $$;
