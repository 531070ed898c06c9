-- One outbox table (SQLite 3.35+: RETURNING). The service's table name, checked
-- against the name grammar first, replaces the placeholder. Idempotent: safe to run
-- again.
-- Used by outbox_runtime's migrate call (inside one BEGIN IMMEDIATE transaction);
-- usable as-is by your own migration tool after the replacement (see
-- `Backend::migration_sql`).
--
-- Upgrading a table made by an earlier release: outbox_runtime's migrate adds the
-- columns it lacks first; with your own tool, run once before this script those of
-- the following that the table lacks:
--   ALTER TABLE {table} ADD COLUMN waiting_since INTEGER NULL;
--   ALTER TABLE {table} ADD COLUMN trace_context TEXT NULL;
--   ALTER TABLE {table} ADD COLUMN dead_reason TEXT NULL;
--   ALTER TABLE {table} ADD COLUMN parked_at INTEGER NULL;
--
-- Times are INTEGER unix microseconds (UTC), always computed in SQL from the database
-- clock (`julianday('now')`, millisecond resolution), so comparisons are plain integer
-- comparisons and never depend on a text format. There are no time defaults: every
-- statement writes its times explicitly.
CREATE TABLE IF NOT EXISTS {table} (
    -- AUTOINCREMENT: ids never come back after deletes, so they keep ordering events.
    id              INTEGER      PRIMARY KEY AUTOINCREMENT,
    event_id        BLOB         NOT NULL UNIQUE,     -- 16 bytes
    service         VARCHAR(64)  NOT NULL,
    event_type      VARCHAR(128) NOT NULL,
    event_version   INTEGER      NOT NULL,
    event_key       VARCHAR(255) NULL,
    payload         TEXT         NOT NULL,
    status          SMALLINT     NOT NULL DEFAULT 0,  -- 0 pending, 1 published, 2 consumed, 3 dead, 4 discarded
    attempts        INTEGER      NOT NULL DEFAULT 0,  -- failures so far
    max_retries     INTEGER      NOT NULL,
    next_attempt_at INTEGER      NOT NULL,            -- unix µs
    lease_token     BIGINT       NOT NULL DEFAULT 0,  -- fences relays; 0 = no lease
    locked_until    INTEGER      NULL,                -- unix µs
    last_error      TEXT         NULL,
    created_at      INTEGER      NOT NULL,            -- unix µs
    updated_at      INTEGER      NOT NULL,            -- unix µs
    published_at    INTEGER      NULL,                -- unix µs
    consumed_at     INTEGER      NULL,                -- unix µs
    dead_at         INTEGER      NULL,                -- unix µs
    waiting_since   INTEGER      NULL,                -- unix µs; waiting for a consumer that can handle it
    trace_context   TEXT         NULL,                -- W3C traceparent[;tracestate] of the publisher (feature otel)
    dead_reason     TEXT         NULL,                -- the class of a dead row's last_error (undecodable, exhausted, ...)
    parked_at       INTEGER      NULL                 -- unix µs; an operator holds this pending row's key
);
-- The claim walks pending rows of one service in id order.
CREATE INDEX IF NOT EXISTS {table}_claim_idx ON {table} (service, status, id);
-- Head-of-key (relay) and open-predecessor (consumer) checks.
CREATE INDEX IF NOT EXISTS {table}_key_idx ON {table} (service, event_key, status, id);
-- The rows with their status as text, for people and tools reading the outbox in SQL
-- (`SELECT * FROM {table}_view WHERE status = 'dead'`): the names are those of
-- outbox_runtime::Status, plus `waiting` for a pending event that waits for a consumer
-- able to handle it (`waiting_since` set), `parked` for one whose key an
-- operator holds. A view, so existing rows read the same and nothing is
-- migrated; the table keeps its numbers. Replaced on every migrate.
-- (SQLite has no CREATE OR REPLACE VIEW.)
DROP VIEW IF EXISTS {table}_view;
CREATE VIEW {table}_view AS
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
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    ref      BLOB    NOT NULL,               -- the action, across the transactions of a bulk replay
    at       INTEGER NOT NULL,               -- unix µs
    actor    TEXT    NOT NULL,
    action   TEXT    NOT NULL,               -- replay, replay_matching, discard, park, unpark
    service  TEXT    NOT NULL,
    target   TEXT    NOT NULL,               -- an event id, a key, or a filter as JSON
    affected INTEGER NOT NULL                -- rows changed
);
CREATE INDEX IF NOT EXISTS {table}_audit_ref_idx ON {table}_audit (ref);
