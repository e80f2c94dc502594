-- waitroom schema, version 8: lottery entries that do not reveal who entered.
--
-- Entries become HMAC-SHA256(entry_salt, fan_id) with a per-room salt that is never
-- published, and the draw mixes the seed with every entry (scheme 2, see
-- waitroom/line/lottery.py). Rooms already drawn keep their published entries and order
-- (scheme 1); rooms not drawn yet get a salt now and are drawn with scheme 2.
ALTER TABLE room_lottery ADD COLUMN entry_salt text CHECK (entry_salt ~ '^[0-9a-f]{64}$');
ALTER TABLE room_lottery ADD COLUMN scheme smallint NOT NULL DEFAULT 1 CHECK (scheme IN (1, 2));
-- gen_random_uuid() draws from PostgreSQL's strong random source: two of them give 244
-- random bits, plenty for a salt that only has to stay unguessable.
UPDATE room_lottery
   SET entry_salt = replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
       scheme = 2
 WHERE drawn_at IS NULL;
ALTER TABLE room_lottery ALTER COLUMN scheme SET DEFAULT 2;
ALTER TABLE room_lottery ADD CONSTRAINT salted CHECK (scheme = 1 OR entry_salt IS NOT NULL);
