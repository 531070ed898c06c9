-- One outbox table (PostgreSQL). `{table}` is replaced by the service's table name,
-- checked against the name grammar first. Idempotent: safe to run again.
-- Used by outbox_runtime's migrate call; usable as-is by your own migration tool after
-- the replacement (see `Backend::migration_sql`).
--
-- Upgrading a table made by an earlier release: outbox_runtime's migrate adds the
-- columns it lacks first; with your own tool, run once before this script those of
-- the following that the table lacks:
--   ALTER TABLE {table} ADD COLUMN waiting_since TIMESTAMPTZ NULL;
--   ALTER TABLE {table} ADD COLUMN trace_context TEXT NULL;
--   ALTER TABLE {table} ADD COLUMN dead_reason TEXT NULL;
--   ALTER TABLE {table} ADD COLUMN parked_at TIMESTAMPTZ NULL;
CREATE TABLE IF NOT EXISTS {table} (
    id              BIGSERIAL PRIMARY KEY,
    event_id        UUID        NOT NULL UNIQUE,
    service         TEXT        NOT NULL,
    event_type      TEXT        NOT NULL,
    event_version   INTEGER     NOT NULL,
    event_key       TEXT        NULL,
    payload         TEXT        NOT NULL,
    status          SMALLINT    NOT NULL DEFAULT 0,  -- 0 pending, 1 published, 2 consumed, 3 dead, 4 discarded
    attempts        INTEGER     NOT NULL DEFAULT 0,  -- failures so far
    max_retries     INTEGER     NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_token     BIGINT      NOT NULL DEFAULT 0,  -- fences relays; 0 = no lease
    locked_until    TIMESTAMPTZ NULL,
    last_error      TEXT        NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ NULL,
    consumed_at     TIMESTAMPTZ NULL,
    dead_at         TIMESTAMPTZ NULL,
    waiting_since   TIMESTAMPTZ NULL,  -- waiting for a consumer that can handle it
    trace_context   TEXT        NULL,  -- W3C traceparent[;tracestate] of the publisher (feature otel)
    dead_reason     TEXT        NULL,  -- the class of a dead row's last_error (undecodable, exhausted, ...)
    parked_at       TIMESTAMPTZ NULL   -- an operator holds this pending row's key
);
-- The claim walks the pending rows of one service in due order (next_attempt_at, id).
-- Not (service, id): the primary key gives id order too, and with a LIMIT the planner
-- may walk the primary key from its start, past every row already published
-- (measured: 2,000 rows/s, quadratic, on a 1,000,000-row backlog); no other index gives
-- this order. (It replaced an earlier {table}_pending_idx, which this script no longer
-- drops: for table names of 54 characters or more, PostgreSQL's 63-byte cut made that name
-- equal {table}_pending_key_idx's, so every migrate dropped and rebuilt that index.)
CREATE INDEX IF NOT EXISTS {table}_due_idx ON {table} (service, next_attempt_at, id) WHERE status = 0;
-- Open-predecessor check (consumer): pending or published rows of a key.
CREATE INDEX IF NOT EXISTS {table}_open_key_idx ON {table} (service, event_key, id)
    WHERE status IN (0, 1) AND event_key IS NOT NULL;
-- Head-of-key check (relay claim): pending rows of a key only, so the check does not
-- walk a key's published rows (measured: 1.3x on a 1-relay drain, 2-3x with several
-- relays on few keys; see BENCHMARKS.md).
CREATE INDEX IF NOT EXISTS {table}_pending_key_idx ON {table} (service, event_key, id)
    WHERE status = 0 AND event_key IS NOT NULL;
-- A queue table churns: vacuum it early. Half of each page is left free so the relay's
-- lease (lease_token, locked_until, updated_at: no index covers them) is a HOT update
-- that stays on its page and writes no index entry; with full pages every claim wrote
-- entries in all five indexes (measured on 200,000 rows: claim 33 -> 9 ms per 500
-- rows, claim + mark 56 -> 24 ms, WAL 2.5x less). Pages written before this setting
-- keep their fill until rewritten.
ALTER TABLE {table} SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02);
-- The rows with their status as text, for people and tools reading the outbox in SQL
-- (`SELECT * FROM {table}_view WHERE status = 'dead'`): the names are those of
-- outbox_runtime::Status, plus `waiting` for a pending event that waits for a consumer
-- able to handle it (`waiting_since` set), `parked` for one whose key an
-- operator holds. A view, so existing rows read the same and nothing is
-- migrated; the table keeps its numbers. Replaced on every migrate.
CREATE OR REPLACE VIEW {table}_view AS
SELECT id, event_id, service, event_type, event_version, event_key, payload,
       CASE status WHEN 0 THEN CASE WHEN parked_at IS NOT NULL THEN 'parked'
                                        WHEN waiting_since IS NULL THEN 'pending' ELSE 'waiting' END
                   WHEN 1 THEN 'published' WHEN 2 THEN 'consumed'
                   WHEN 3 THEN 'dead' WHEN 4 THEN 'discarded' ELSE CAST(status AS TEXT) END AS status,
       attempts, max_retries, next_attempt_at, lease_token, locked_until, last_error,
       created_at, updated_at, published_at, consumed_at, dead_at, waiting_since,
       trace_context, dead_reason, parked_at
FROM {table};
-- What operators did (outbox_runtime::Admin: replay, discard, park, unpark): who, when,
-- on what, how many rows. Written in the transaction of the change it records.
CREATE TABLE IF NOT EXISTS {table}_audit (
    id       BIGSERIAL   PRIMARY KEY,
    ref      UUID        NOT NULL,           -- the action, across the transactions of a bulk replay
    at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor    TEXT        NOT NULL,
    action   TEXT        NOT NULL,           -- replay, replay_matching, discard, park, unpark
    service  TEXT        NOT NULL,
    target   TEXT        NOT NULL,           -- an event id, a key, or a filter as JSON
    affected BIGINT      NOT NULL            -- rows changed
);
CREATE INDEX IF NOT EXISTS {table}_audit_ref_idx ON {table}_audit (ref);
