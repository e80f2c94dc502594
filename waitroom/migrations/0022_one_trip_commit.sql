-- waitroom schema, version 22: a group commit in one round trip.
--
-- An actor's group commit was four round trips (BEGIN; inventory_commit(); a binary COPY of
-- the new holds; COMMIT). At checkout rates a batch holds a dozen or two reservations and the
-- owner's event loop is busy with HTTP work, so each reply from PostgreSQL waited for a turn
-- of that loop: the commit took ~6 ms, most of it waiting, and every reservation waited for
-- about one and a half commits. inventory_commit_holds() does what the four did, in the same
-- order, as one statement: the actor sends it outside any explicit transaction, so it runs in
-- one implicit transaction (all of it or nothing) and answers in one round trip. Batches with
-- seats or stock returns keep the transaction of several statements (their rows must go in
-- between the settled and the new holds).
CREATE FUNCTION inventory_commit_holds(
    p_event        text,
    p_epoch        bigint,
    u_id           uuid[],
    u_status       text[],
    u_payment_ref  text[],
    k_fan          text[],
    k_key          text[],
    k_hash         text[],
    k_status       integer[],
    k_response     text[],
    o_topic        text[],
    o_payload      text[],
    h_id           uuid[],
    h_ticket_type  text[],
    h_fan          text[],
    h_quantity     integer[],
    h_status       text[],
    h_pass_jti     text[],
    h_payment_ref  text[],
    h_expires_at   timestamptz[],
    h_key          text[],
    h_hash         text[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- The fence first (it locks the event's owner row), then what it always did.
    PERFORM inventory_commit(p_event, p_epoch, u_id, u_status, u_payment_ref, k_fan, k_key,
                             k_hash, k_status, k_response, o_topic, o_payload);
    IF cardinality(h_id) > 0 THEN
        -- One statement: the holds' statement triggers (ticket types exist, no oversell)
        -- fire once for the batch, as they did for the COPY.
        INSERT INTO holds (id, event_id, ticket_type, fan_id, quantity, status, pass_jti,
                           payment_ref, expires_at, idempotency_key, request_hash)
        SELECT h.id, p_event, h.ticket_type, h.fan, h.quantity, h.status, h.pass_jti,
               h.payment_ref, h.expires_at, h.key, h.hash
          FROM unnest(h_id, h_ticket_type, h_fan, h_quantity, h_status, h_pass_jti,
                      h_payment_ref, h_expires_at, h_key, h_hash)
               AS h(id, ticket_type, fan, quantity, status, pass_jti, payment_ref,
                    expires_at, key, hash);
    END IF;
END $$;
