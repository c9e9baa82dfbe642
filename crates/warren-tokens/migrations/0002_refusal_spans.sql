-- Refusal rows say what they cover: one refusal ('one'), the refusals of a
-- (token, reason, queue) past the per-token rate in one UTC minute
-- ('minute'), or, once older than the detail window, in one UTC day ('day').
-- Buckets are unique, so replicas add into the same row and compaction can
-- fold rows into days (see crates/warren-tokens/src/refusals.rs).

ALTER TABLE token_refusals
    ADD COLUMN span text NOT NULL DEFAULT 'one' CHECK (span IN ('one', 'minute', 'day'));

-- Each replica used to insert its own per-minute row: merge them.
WITH old AS (
    DELETE FROM token_refusals WHERE aggregated
    RETURNING token_id, reason, queue, at, count
)
INSERT INTO token_refusals (token_id, reason, queue, at, count, aggregated, span)
SELECT token_id, reason, queue, at, sum(count)::bigint, true, 'minute'
FROM old GROUP BY token_id, reason, queue, at;

ALTER TABLE token_refusals
    ADD CONSTRAINT token_refusals_aggregated_span CHECK (aggregated = (span <> 'one'));

CREATE UNIQUE INDEX token_refusals_bucket
    ON token_refusals (token_id, reason, queue, span, at) NULLS NOT DISTINCT
    WHERE span <> 'one';

CREATE INDEX token_refusals_at ON token_refusals (at);
