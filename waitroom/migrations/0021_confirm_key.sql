-- waitroom schema, version 21: a confirm sent again is answered with what it started.
--
-- A payment attempt remembers the Idempotency-Key of the confirm that started it. A confirm
-- sent again with that key (its answer was lost, or a 503 came back after the attempt had
-- been queued) is answered with that attempt, whatever became of it since: paid, failed or
-- still under way; it used to find the order paid already and answer 409
-- `hold_already_confirmed`, and the fan's page said so to a fan whose payment had gone
-- through. Attempts started before this version have none.
ALTER TABLE payments ADD COLUMN request_key text;
CREATE UNIQUE INDEX payments_request_key ON payments (order_id, request_key)
    WHERE request_key IS NOT NULL;
