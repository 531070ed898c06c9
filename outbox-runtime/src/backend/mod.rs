//! The outbox repository: one contract ([`Backend`]), one module per database, each
//! behind its cargo feature (`postgres`, `mysql`, `sqlite`).
//!
//! The state machine lives in Rust (`retry.rs`, the relay and the consumer); a
//! backend only applies decisions with SQL. Every statement filters by `service`, so
//! services sharing one table (the legacy shared table during a migration) never touch
//! each other's rows. Every time comes from the database clock: the app passes
//! *delays*, never instants.
//!
//! Each statement is written once, in `statements.rs`, as a template that each
//! database's dialect renders once per table; `rows.rs` decodes rows for all three, and
//! `ops.rs` holds the operations every database runs alike. A database's own module
//! keeps its dialect and what truly differs: the claim, the migration, wake-ups.
//!
//! ## Row life cycle
//!
//! ```text
//!   publish ──► pending ──claim (lease token)──► produce ──mark_published──► published
//!                  ▲  │                                                        │
//!                  │  └─ release (broker down: backoff, no attempt counted) ◄──┤(relay)
//!                  │                                                        handler
//!   retry_later ◄──┴──── transient failure (attempts+1, backoff) ◄────────────┤
//!   mark_dead ◄───────── permanent / undecodable / attempts used up ──────────┤
//!   wait ◄────────────── unknown type / no handler / newer version (no attempt;┤
//!                        dead after the grace period)            consumed ◄──┘
//! ```
//!
//! `consumed` and `dead` are terminal: every transition filters on the current status
//! in the statement that changes the row (not only in a subquery that picked it: on
//! PostgreSQL only the outer condition is checked again after waiting for a row lock),
//! so repeating one is a no-op. Transitions other than the relay's own claim reset
//! `lease_token` to 0, which fences any relay still holding the old lease.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Pool, Transaction};
use uuid::Uuid;

use crate::route::{ServiceName, TableName};

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) mod ops;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) mod rows;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) mod statements;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) mod upgrade;

/// The status column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting to be published (due at `next_attempt_at`).
    Pending = 0,
    /// In the broker, not yet consumed.
    Published = 1,
    /// Handled; terminal.
    Consumed = 2,
    /// Given up, with `last_error` as the reason and `dead_reason` as its class.
    /// Terminal, except that an operator may replay it ([`crate::Admin::replay`]).
    Dead = 3,
    /// A dead event an operator set aside ([`crate::Admin::discard`]): kept for the
    /// record, never replayed by a filter; terminal.
    Discarded = 4,
}

impl Status {
    /// The column value.
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// From the column value.
    pub fn from_i16(v: i16) -> Option<Status> {
        Some(match v {
            0 => Status::Pending,
            1 => Status::Published,
            2 => Status::Consumed,
            3 => Status::Dead,
            4 => Status::Discarded,
            _ => return None,
        })
    }

    /// Whether no transition leaves this status.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Consumed | Status::Dead | Status::Discarded)
    }

    /// The name operators see (`pending`, …, `discarded`), as in the table's view.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Published => "published",
            Status::Consumed => "consumed",
            Status::Dead => "dead",
            Status::Discarded => "discarded",
        }
    }
}

/// Why an event is dead: a bounded set, stored in the row's `dead_reason` column (the
/// detail is in `last_error`), the `reason` label of the dead-events metric and a
/// dead-letter filter for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// The payload does not decode into the handler's type.
    Undecodable,
    /// No consumer knew the event type within the waiting grace period.
    UnknownType,
    /// No consumer had a handler for it within the grace period.
    NoHandler,
    /// No consumer knew its version within the grace period.
    Version,
    /// The handler said retrying cannot help.
    Permanent,
    /// The handler failed max-retries times.
    Exhausted,
    /// The broker refuses it (too large).
    TooLarge,
}

impl DeadReason {
    /// Every reason, in declaration order.
    pub const ALL: [DeadReason; 7] = [
        DeadReason::Undecodable,
        DeadReason::UnknownType,
        DeadReason::NoHandler,
        DeadReason::Version,
        DeadReason::Permanent,
        DeadReason::Exhausted,
        DeadReason::TooLarge,
    ];

    /// The stored and shown name: `undecodable`, `unknown_type`, `no_handler`,
    /// `version`, `permanent`, `exhausted`, `too_large`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Undecodable => "undecodable",
            DeadReason::UnknownType => "unknown_type",
            DeadReason::NoHandler => "no_handler",
            DeadReason::Version => "version",
            DeadReason::Permanent => "permanent",
            DeadReason::Exhausted => "exhausted",
            DeadReason::TooLarge => "too_large",
        }
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeadReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeadReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = DeadReason::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown dead reason `{s}` (one of: {})", names.join(", "))
            })
    }
}

/// A row to insert at publish time.
#[derive(Debug, Clone)]
pub struct NewRow<'a> {
    /// The event id (unique).
    pub event_id: Uuid,
    /// The owning service.
    pub service: &'a ServiceName,
    /// The event type name.
    pub event_type: &'a str,
    /// The schema version.
    pub version: i32,
    /// The ordering key.
    pub key: Option<&'a str>,
    /// The JSON payload.
    pub payload: &'a str,
    /// Retries before the event goes dead.
    pub max_retries: i32,
    /// The publisher's W3C trace context, `traceparent[;tracestate]` (feature `otel`);
    /// `None` writes NULL.
    pub trace_context: Option<&'a str>,
}

/// A row a subscriber's intake writes into its inbox: an event read from the
/// publisher's topic, pending (its handler runs from the inbox), or dead at once when
/// the record is unusable (the reason and its class given).
#[derive(Debug, Clone)]
pub struct NewInboxRow<'a> {
    /// The event as the record names it (`event_id` unique: a repeat is skipped).
    pub row: NewRow<'a>,
    /// Dead at once, with the reason and its class.
    pub dead: Option<(&'a str, DeadReason)>,
}

/// Which due rows a claim looks at ([`Backend::claim_in`]), in the claim's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimScope {
    /// Every due row: [`Backend::claim`].
    All,
    /// The first `n` due, unleased rows. It can miss heads further back (behind a
    /// parked key's long backlog): those are [`PastWindow`](Self::PastWindow)'s.
    Window(u32),
    /// Past the first `n` due, unleased rows: the heads [`Window`](Self::Window) cannot
    /// see. Rows that become heads inside the window meanwhile (a mark committed since)
    /// are left to the next windowed claim, so rows found here were hidden. It walks
    /// the due rows past the window, as the full claim does.
    PastWindow(u32),
}

/// A row claimed by a relay: everything needed to produce it.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    /// The row id (orders events of one key).
    pub id: i64,
    /// The event id.
    pub event_id: Uuid,
    /// The event type name.
    pub event_type: String,
    /// The schema version.
    pub version: i32,
    /// The ordering key.
    pub key: Option<String>,
    /// The JSON payload.
    pub payload: String,
    /// Failures so far.
    pub attempts: i32,
    /// When the event was published (database clock).
    pub created_at: DateTime<Utc>,
    /// The publisher's W3C trace context, `traceparent[;tracestate]`, as stored (not
    /// checked: the relay ignores a malformed one).
    pub trace_context: Option<String>,
}

/// The consumer's view of a row, read under a row lock inside its transaction: the
/// event as the business transaction wrote it (what the handler receives), and its
/// state.
#[derive(Debug, Clone)]
pub struct RowState {
    /// The row id.
    pub id: i64,
    /// The current status.
    pub status: Status,
    /// Failures so far.
    pub attempts: i32,
    /// Retries before the event goes dead.
    pub max_retries: i32,
    /// The ordering key.
    pub key: Option<String>,
    /// The event type name.
    pub event_type: String,
    /// The schema version.
    pub version: i32,
    /// The JSON payload.
    pub payload: String,
    /// Whether the row is due (`next_attempt_at <= now`, database clock). A pending row
    /// that is not due waits out a retry backoff or a deferral.
    pub due: bool,
    /// Whether the row is already waiting for a consumer that can handle it
    /// (`waiting_since` is set; see [`Backend::wait`]).
    pub waiting: bool,
    /// When the business transaction wrote it (database clock).
    pub created_at: DateTime<Utc>,
    /// When the broker acknowledged it, if it did (database clock).
    pub published_at: Option<DateTime<Utc>>,
    /// The nearest older row of the same service and key that was still open (pending
    /// or published) when this one was locked, read in the lock's own statement: while
    /// there is one, this event must wait to keep its key's order. `None` for a keyless
    /// row.
    pub open_before: Option<i64>,
}

/// A whole row, for operators and tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxRow {
    /// The row id.
    pub id: i64,
    /// The event id.
    pub event_id: Uuid,
    /// The owning service.
    pub service: String,
    /// The event type name.
    pub event_type: String,
    /// The schema version.
    pub version: i32,
    /// The ordering key.
    pub key: Option<String>,
    /// The JSON payload.
    pub payload: String,
    /// The current status.
    pub status: Status,
    /// Failures so far.
    pub attempts: i32,
    /// Retries before the event goes dead.
    pub max_retries: i32,
    /// When the row is next due (database clock).
    pub next_attempt_at: DateTime<Utc>,
    /// The last failure, truncated; the reason for `dead`.
    pub last_error: Option<String>,
    /// Insert time (database clock).
    pub created_at: DateTime<Utc>,
    /// Last transition (database clock).
    pub updated_at: DateTime<Utc>,
    /// When the broker acknowledged it.
    pub published_at: Option<DateTime<Utc>>,
    /// When its handler's transaction committed.
    pub consumed_at: Option<DateTime<Utc>>,
    /// When it went dead.
    pub dead_at: Option<DateTime<Utc>>,
    /// Since when it has been waiting for a consumer that can handle it (unknown type,
    /// no handler, newer version), database clock; cleared by a handler failure and a
    /// replay.
    pub waiting_since: Option<DateTime<Utc>>,
    /// The publisher's W3C trace context, `traceparent[;tracestate]` (feature `otel`),
    /// as stored.
    pub trace_context: Option<String>,
    /// The class of `last_error` for a dead row ([`DeadReason`]'s name); `None` for rows
    /// that died before the column existed.
    pub dead_reason: Option<String>,
    /// Since when an operator has held this pending row's key ([`crate::Admin::park`]).
    pub parked_at: Option<DateTime<Utc>>,
}

/// The backlog of one service ([`Backend::backlog`]), sampled by housekeeping into the
/// metrics' gauges. Ages are on the database clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    /// Pending rows.
    pub pending: u64,
    /// Pending rows due now.
    pub due: u64,
    /// Seconds since the oldest due pending row became due (0 if none).
    pub oldest_due: f64,
    /// Published, unconsumed rows.
    pub unconsumed: u64,
    /// Seconds since the oldest of them was published (0 if none).
    pub oldest_unconsumed: f64,
    /// Pending rows waiting for a consumer that can handle them.
    pub waiting: u64,
    /// Dead rows.
    pub dead: u64,
}

/// Events of one service waiting for a consumer that can handle them, by event type
/// and reason ([`Backend::waiting`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WaitingCount {
    /// The event type.
    pub event_type: String,
    /// Why they wait (the `last_error` the consumer wrote).
    pub reason: String,
    /// How many.
    pub count: u64,
    /// When the longest-waiting of them began waiting (database clock).
    pub oldest_since: DateTime<Utc>,
}

/// Rows of one service by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusCounts {
    /// Waiting to be published.
    pub pending: u64,
    /// In the broker.
    pub published: u64,
    /// Handled.
    pub consumed: u64,
    /// Given up.
    pub dead: u64,
    /// Dead and set aside by an operator.
    pub discarded: u64,
}

/// Keys of one service that do not flow ([`Backend::key_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyCounts {
    /// Keys whose head failed at least once and waits for its retry (or for a consumer
    /// that can handle it): every later event of the key waits behind it.
    pub failing: u64,
    /// Keys an operator parked.
    pub parked: u64,
}

/// A key an operator parked ([`Backend::parked`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParkedKey {
    /// The key.
    pub key: String,
    /// Its pending events (parked, and later ones waiting behind them).
    pub pending: u64,
    /// When it was parked (database clock).
    pub parked_since: DateTime<Utc>,
}

/// Which dead rows of a service an operator means: every `Some` field must match.
/// Texts are compared exactly, except `error_contains` (case-insensitive substring of
/// `last_error`); ages are on the database clock, from `dead_at`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DeadFilter {
    /// The event type.
    pub event_type: Option<String>,
    /// The reason class.
    pub reason: Option<DeadReason>,
    /// Part of the last error, in any case.
    pub error_contains: Option<String>,
    /// The event key.
    pub key: Option<String>,
    /// Dead for at least this long.
    #[serde(with = "opt_secs")]
    pub older_than: Option<Duration>,
    /// Dead for at most this long.
    #[serde(with = "opt_secs")]
    pub newer_than: Option<Duration>,
}

impl DeadFilter {
    /// Whether no field is set (every dead row matches).
    pub fn is_empty(&self) -> bool {
        *self == DeadFilter::default()
    }

    /// The `LIKE` pattern for `error_contains`: lower case, `!` escaping the pattern's
    /// own characters (`!` is the escape character in every dialect's statement).
    pub(crate) fn error_pattern(&self) -> Option<String> {
        self.error_contains.as_ref().map(|text| {
            let mut p = String::with_capacity(text.len() + 2);
            p.push('%');
            for c in text.to_lowercase().chars() {
                if matches!(c, '%' | '_' | '!') {
                    p.push('!');
                }
                p.push(c);
            }
            p.push('%');
            p
        })
    }
}

/// Durations as fractional seconds in JSON (audit rows, `--json`).
mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let secs = Option::<f64>::deserialize(d)?;
        secs.map(|s| {
            Duration::try_from_secs_f64(s).map_err(|e| serde::de::Error::custom(e.to_string()))
        })
        .transpose()
    }
}

/// An operator's action, as its audit row records it ([`Backend::audit`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// The row id (audit rows are listed newest first).
    pub id: i64,
    /// When (database clock).
    pub at: DateTime<Utc>,
    /// Who ([`crate::Admin::acting_as`]).
    pub actor: String,
    /// What: `replay`, `replay_matching`, `discard`, `park`, `unpark`.
    pub action: String,
    /// The service.
    pub service: String,
    /// On what: an event id, a key, or a filter as JSON.
    pub target: String,
    /// How many rows changed.
    pub affected: u64,
}

/// An audit row to write ([`Backend::audit_insert`]).
#[derive(Debug, Clone, Copy)]
pub struct NewAudit<'a> {
    /// Who.
    pub actor: &'a str,
    /// What.
    pub action: &'a str,
    /// The service.
    pub service: &'a ServiceName,
    /// On what.
    pub target: &'a str,
    /// Rows changed so far.
    pub affected: u64,
}

/// What a consumer-side failure transition is fenced by: the attempts count it read
/// under its row lock, and a non-terminal status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptsFence(pub i32);

/// Longest event key, in bytes: MySQL indexes `event_key` as VARCHAR(255), and a key
/// silently cut there would merge two keys' orders, so every backend refuses longer ones
/// at publish time.
pub const MAX_KEY_LEN: usize = 255;

/// Longest `last_error` kept, in characters.
pub const MAX_ERROR_LEN: usize = 2000;

/// `msg` cut to [`MAX_ERROR_LEN`] characters (never inside a character).
pub fn truncate_error(msg: &str) -> &str {
    match msg.char_indices().nth(MAX_ERROR_LEN) {
        Some((end, _)) => &msg[..end],
        None => msg,
    }
}

/// `reason` followed by `note`, within [`MAX_ERROR_LEN`] characters: the reason comes
/// first and is what gets cut, so the note (why the event is dead) always survives.
pub fn error_with_note(reason: &str, note: &str) -> String {
    let room = MAX_ERROR_LEN.saturating_sub(note.chars().count());
    let cut = match reason.char_indices().nth(room) {
        Some((end, _)) => &reason[..end],
        None => reason,
    };
    let mut s = String::with_capacity(cut.len() + note.len());
    s.push_str(cut);
    s.push_str(note);
    truncate_error(&s).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_cut_by_characters_with_the_note_kept() {
        let long = "é".repeat(3000);
        assert_eq!(truncate_error(&long).chars().count(), MAX_ERROR_LEN);
        assert_eq!(truncate_error("short"), "short");
        let noted = error_with_note(&long, " [retries exhausted: failed 21 times]");
        assert_eq!(noted.chars().count(), MAX_ERROR_LEN);
        assert!(noted.starts_with("éé"));
        assert!(noted.ends_with(" [retries exhausted: failed 21 times]"));
        assert_eq!(error_with_note("boom", " [x]"), "boom [x]");
    }

    #[test]
    fn error_filters_match_literally_in_any_case() {
        let f = DeadFilter {
            error_contains: Some("50% Off_now!".into()),
            ..DeadFilter::default()
        };
        assert_eq!(f.error_pattern().as_deref(), Some("%50!% off!_now!!%"));
        assert!(DeadFilter::default().is_empty() && !f.is_empty());
        assert_eq!("exhausted".parse::<DeadReason>(), Ok(DeadReason::Exhausted));
        assert!("nope"
            .parse::<DeadReason>()
            .unwrap_err()
            .contains("too_large"));
        let json = serde_json::to_string(&DeadFilter {
            reason: Some(DeadReason::NoHandler),
            older_than: Some(Duration::from_secs(90)),
            ..DeadFilter::default()
        })
        .unwrap();
        assert!(json.contains(r#""reason":"no_handler""#) && json.contains(r#""older_than":90.0"#));
        assert_eq!(
            serde_json::from_str::<DeadFilter>(&json)
                .unwrap()
                .older_than,
            Some(Duration::from_secs(90))
        );
    }
}

mod sealed {
    pub trait Sealed {}
}
#[allow(unused_imports)]
pub(crate) use sealed::Sealed;

/// A database the outbox runs on: `sqlx::Postgres`, `sqlx::MySql` or `sqlx::Sqlite`.
///
/// Sealed: the three implementations live in this module's submodules and share the
/// state machine; they differ only in SQL. `table` arguments have been checked against
/// [`crate::names`] before they reach a backend, so splicing them into SQL is safe.
/// Errors are raw `sqlx::Error`s; callers add context.
pub trait Backend: sqlx::Database + sealed::Sealed + Sized {
    /// `"postgres"`, `"mysql"` or `"sqlite"`.
    const BACKEND_NAME: &'static str;
    /// `&[BACKEND_NAME]`, for messages that list backends.
    const BACKEND_NAMES: &'static [&'static str];
    /// Whether LISTEN/NOTIFY wake-ups exist (PostgreSQL).
    const HAS_NOTIFY: bool;
    /// Whether several relays may claim concurrently (row locks with SKIP LOCKED).
    /// SQLite has none: there, one relay per service holds a lease.
    const CONCURRENT_RELAYS: bool;
    /// Whether [`claim_in`](Self::claim_in) honours its scope (PostgreSQL, MySQL); if not it
    /// is the full claim and the relay never needs to fall back to it.
    const BOUNDED_CLAIM: bool = false;

    /// Begins a write transaction the right way for this database: READ COMMITTED on
    /// MySQL/MariaDB, `BEGIN IMMEDIATE` on SQLite (so no writer ever sees SQLITE_BUSY
    /// on lock upgrade), plain `BEGIN` on PostgreSQL.
    fn begin(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send;

    /// Creates the outbox table and its indexes if missing. Idempotent and safe to run
    /// from several processes at once.
    fn migrate(
        pool: &Pool<Self>,
        table: &TableName,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        Self::migrate_ddl(pool, table, Self::migration_sql(table))
    }

    /// Creates a subscriber's inbox table if missing: the outbox table's DDL, then the
    /// inbox's memory of purged events (`<table>_seen`). Idempotent, like
    /// [`migrate`](Self::migrate).
    fn migrate_inbox(
        pool: &Pool<Self>,
        table: &TableName,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        Self::migrate_ddl(pool, table, Self::inbox_migration_sql(table))
    }

    /// Runs the DDL `sql` of `table` under the database's migration lock, after adding
    /// the columns an older table lacks ([`upgrade`]).
    fn migrate_ddl(
        pool: &Pool<Self>,
        table: &TableName,
        sql: String,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// The DDL that [`migrate`](Self::migrate) runs, for users' own migration tools.
    fn migration_sql(table: &TableName) -> String;

    /// The DDL that [`migrate_inbox`](Self::migrate_inbox) runs, for users' own
    /// migration tools.
    fn inbox_migration_sql(table: &TableName) -> String;

    /// Subscriber side: the watermarks of `keys` (`""` for events without a key) of
    /// `service`'s events in inbox `table`: per key, the newest event id retention
    /// deleted. With `settled_for`, only those raised at least that long ago (database
    /// clock).
    fn watermarks<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        service: &'c ServiceName,
        keys: &'c [String],
        settled_for: Option<Duration>,
    ) -> impl Future<Output = Result<Vec<(String, Uuid)>, sqlx::Error>> + Send + 'c;

    /// Retention of an inbox, in one short transaction over up to `limit` rows of
    /// `service` settled long enough ago (consumed more than `consumed_age` ago; dead or
    /// discarded more than `dead_age` ago, if given): rows already covered by their
    /// key's watermark, raised at least `settle` ago, are deleted; for the others the
    /// watermark is raised to their newest event id (they go in a later round, once it
    /// has settled: an intake that read the watermark before it was raised has written
    /// by then). Returns (rows deleted, watermarks raised).
    #[allow(clippy::too_many_arguments)]
    fn purge_inbox<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        consumed_age: Duration,
        dead_age: Option<Duration>,
        limit: u32,
        settle: Duration,
    ) -> impl Future<Output = Result<(u64, u64), sqlx::Error>> + Send + 'p;

    /// Inserts one pending row, due now, on the caller's connection (its transaction).
    fn insert<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        row: &'c NewRow<'c>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;

    /// Inserts many pending rows, due now, on the caller's connection (its transaction),
    /// in as few multi-row statements as the database's bind limit allows (500 rows
    /// each), in the given order (ids, and so per-key order, follow it). For backfills.
    fn insert_many<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        rows: &'c [NewRow<'c>],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;

    /// Subscriber side, in the intake's transaction: inserts the rows into inbox
    /// `table` (pending and due now, or dead with their reason), skipping every row
    /// whose event id is already there (a repeated delivery), in as few statements as
    /// the bind limit allows, in the given order. Returns how many rows were new.
    fn insert_inbox<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        rows: &'c [NewInboxRow<'c>],
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'c;

    /// Claims up to `limit` due rows of `service` in one short transaction: status
    /// pending, `next_attempt_at <= now`, lease free or expired, and no older pending
    /// row with the same key (head of key, so per-key order survives many relays and a
    /// failing head parks only its own key). Sets `lease_token = token` and
    /// `locked_until = now + lease`. Which rows, when more are due than `limit`: the
    /// first in id order (MySQL, SQLite: their claim index leads with status), or in due
    /// order, `next_attempt_at` then id (PostgreSQL: an order only its partial due index
    /// gives, so the planner cannot walk the primary key past every row already
    /// published). Rows come back in id order.
    fn claim<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
        lease: Duration,
        token: i64,
    ) -> impl Future<Output = Result<Vec<ClaimedRow>, sqlx::Error>> + Send + 'p;

    /// [`claim`](Self::claim) among the due rows of `scope` (see [`ClaimScope`]): with a
    /// window, bounded cost however deep the backlog behind heads that are leased to
    /// other relays or parked. The default (SQLite) is the full claim whatever the
    /// scope ([`BOUNDED_CLAIM`](Self::BOUNDED_CLAIM) is `false`).
    #[allow(clippy::too_many_arguments)]
    fn claim_in<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
        scope: ClaimScope,
        lease: Duration,
        token: i64,
    ) -> impl Future<Output = Result<Vec<ClaimedRow>, sqlx::Error>> + Send + 'p {
        let _ = scope;
        Self::claim(pool, table, service, limit, lease, token)
    }

    /// Marks claimed rows published, fenced by the lease: only rows still pending with
    /// `lease_token = token` change. Returns how many did.
    ///
    /// A consumer batch never waits for a row lock while holding others (see
    /// [`lock_batch_for_consume`](Self::lock_batch_for_consume)), so the mark cannot
    /// deadlock with one; should a mark fail anyway, the relay retries it.
    fn mark_published<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        ids: &'p [i64],
        token: i64,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'p;

    /// Gives claimed rows back after a transient broker failure, fenced by the lease:
    /// due again after `delay`, `last_error = error`, attempts unchanged (a broker outage
    /// is not the event's fault and never makes it dead). Returns how many changed.
    fn release<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        ids: &'p [i64],
        token: i64,
        delay: Duration,
        error: &'p str,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'p;

    /// Marks a claimed row dead (relay side: the broker refuses it as too large, class
    /// [`DeadReason::TooLarge`]), fenced by the lease. Returns whether it changed.
    fn mark_dead_leased<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        id: i64,
        token: i64,
        reason: &'p str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send + 'p;

    /// Consumer side, in its transaction: finds the row of `event_id` for `service` and
    /// locks it (`FOR UPDATE`; SQLite's `BEGIN IMMEDIATE` already holds the write lock).
    fn lock_for_consume<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_id: Uuid,
    ) -> impl Future<Output = Result<Option<RowState>, sqlx::Error>> + Send + 'c;

    /// Consumer side, at the start of a batch transaction: locks those rows of
    /// `event_ids` (of `service`) that no other transaction holds, in one statement
    /// that never waits (`SKIP LOCKED`), and returns their states by event id. Rows
    /// that are missing from the answer either do not exist or are held by someone else
    /// (a relay marking them published, usually); the caller rolls back and waits for
    /// one of them holding no lock. A batch therefore never waits for a row lock while
    /// holding others, so it cannot deadlock with a relay's multi-row mark, whatever
    /// order that mark locks in. SQLite (one writer at a time, the caller's
    /// `BEGIN IMMEDIATE` holding the write lock) reads the rows plainly.
    fn lock_batch_for_consume<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_ids: &'c [Uuid],
    ) -> impl Future<Output = Result<Vec<(Uuid, RowState)>, sqlx::Error>> + Send + 'c;

    /// Consumer side, in the handler's transaction: marks the rows consumed (from
    /// pending or published; `lease_token = 0`), one row for a single record, a batch's
    /// rows in one statement.
    fn mark_consumed<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        ids: &'c [i64],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;

    /// Consumer side, in its transaction: puts row `id` (of `service` and `key`), whose
    /// predecessor is still open, back to pending, due after `delay`, attempts unchanged,
    /// `lease_token = 0`. Its *published* predecessors of the same key go back to
    /// pending too, due now: their records should have come before this one (same key,
    /// same partition), so they were lost (a broker that lost its log, offsets reset
    /// past them) and must be published again. The relay's head-of-key claim then
    /// sends the key's rows again in order, one after the other, instead of this row
    /// coming back, unclaimable, every `delay`. Returns how many predecessors went back.
    fn defer<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
        id: i64,
        delay: Duration,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'c;

    /// Retention: deletes up to `limit` rows of `service` that were consumed more than
    /// `consumed_age` ago, and, if `dead_age` is given, dead rows that died more than
    /// `dead_age` ago. One short statement; returns rows deleted. Callers repeat it in
    /// bounded batches, so no long lock is ever held.
    fn purge<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        consumed_age: Duration,
        dead_age: Option<Duration>,
        limit: u32,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'p;

    /// Consumer side, after a transient handler failure: pending again, attempts + 1,
    /// due after `delay`, `last_error = error`, `lease_token = 0`; fenced by the
    /// attempts count read under the lock and a non-terminal status.
    fn retry_later<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        id: i64,
        fence: AttemptsFence,
        delay: Duration,
        error: &'p str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send + 'p;

    /// Consumer side: dead with `reason` and its `class` (attempts + 1,
    /// `lease_token = 0`), fenced like [`retry_later`](Self::retry_later).
    fn mark_dead<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        id: i64,
        fence: AttemptsFence,
        reason: &'p str,
        class: DeadReason,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send + 'p;

    /// Consumer side, in its transaction: row `id` (open, locked) cannot be handled by
    /// this consumer yet (unknown type, no handler, newer version): pending again, due
    /// after `delay`, `last_error = reason`, attempts unchanged, `lease_token = 0`, and
    /// `waiting_since` set if it was not, unless it has been waiting for `grace`
    /// already. Returns `true` if it waits, `false` if its grace is over (nothing
    /// changed; the caller marks it dead). All times on the database clock.
    fn wait<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        id: i64,
        delay: Duration,
        grace: Duration,
        reason: &'c str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send + 'c;

    /// The backlog of `service` in one statement: rows by open status, the due ones,
    /// the oldest due and the oldest unconsumed row's age, waiting and dead rows.
    fn backlog<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> impl Future<Output = Result<Backlog, sqlx::Error>> + Send + 'p;

    /// The waiting rows of `service` ([`wait`](Self::wait)) by event type and reason,
    /// for operators.
    fn waiting<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> impl Future<Output = Result<Vec<WaitingCount>, sqlx::Error>> + Send + 'p;

    /// Safety valve: rows of `service` published more than `older_than` ago and still
    /// not consumed (their record was lost to the consumer: offsets reset past it, topic
    /// retention expired) go back to pending, due now, `lease_token = 0`, so the relay
    /// publishes them again; a consumer that did apply one finds it consumed. Up to
    /// `limit` rows; returns how many.
    ///
    /// With `newer_than`, only rows published less than that long ago (a window of
    /// publish times, for the relay's sweep after a broker lost its log).
    fn redeliver_stale<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        older_than: Duration,
        newer_than: Option<Duration>,
        limit: u32,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'p;

    /// Dead rows of a service, oldest first, for operators.
    fn fetch_dead<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, sqlx::Error>> + Send + 'p;

    /// Replays dead rows of `service` (one by event id, or up to `limit` oldest): back to
    /// pending, due now, attempts reset to 0, `dead_at` cleared, `last_error` kept until
    /// the next failure. Returns how many changed.
    fn revive<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        event_id: Option<Uuid>,
        limit: u32,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'p;

    /// Which of `event_ids` are rows of `service` that this pool can see: committed
    /// (the publisher's commit watch asks, to wake relays once a transaction it did not
    /// see end has committed). Any order.
    fn committed_events<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        event_ids: &'p [Uuid],
    ) -> impl Future<Output = Result<Vec<Uuid>, sqlx::Error>> + Send + 'p;

    /// One row by event id, for operators and tests.
    fn fetch<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        event_id: Uuid,
    ) -> impl Future<Output = Result<Option<OutboxRow>, sqlx::Error>> + Send + 'p;

    /// All rows of a service in id order, for operators and tests.
    fn fetch_all<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, sqlx::Error>> + Send + 'p;

    /// Rows of a service by status.
    fn counts<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> impl Future<Output = Result<StatusCounts, sqlx::Error>> + Send + 'p;

    /// Operators: the dead rows of `service` that match `filter`, with ids above
    /// `after` (the cursor: the last id of the previous page), in id order, at most
    /// `limit`.
    fn dead_page<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        filter: &'p DeadFilter,
        after: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, sqlx::Error>> + Send + 'p;

    /// Operators: how many dead rows of `service` match `filter`.
    fn dead_count<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        filter: &'p DeadFilter,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'p;

    /// Operators, in their transaction: replays the rows `ids` of `service` that are
    /// still dead, like [`revive`](Self::revive). Returns how many changed.
    fn revive_ids<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        service: &'c ServiceName,
        ids: &'c [i64],
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'c;

    /// Operators, in their transaction: sets the dead row of `event_id` aside
    /// ([`Status::Discarded`]), keeping it. Returns whether it changed.
    fn discard<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_id: Uuid,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send + 'c;

    /// Operators, in their transaction: holds `key`: its pending rows that no relay
    /// holds a lease on are parked (`parked_at` set, due in a century), so no claim
    /// takes them and the key's later events wait behind them (head of key). Returns
    /// how many rows were parked; 0 if the key has nothing pending.
    fn park<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'c;

    /// Operators, in their transaction: releases a parked key, its parked rows due now
    /// (the relay then sends the key's events in order). Returns how many.
    fn unpark<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'c;

    /// Operators: the parked keys of `service`, by key.
    fn parked<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> impl Future<Output = Result<Vec<ParkedKey>, sqlx::Error>> + Send + 'p;

    /// Operators: how many keys of `service` are held behind a failing head or parked.
    fn key_counts<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> impl Future<Output = Result<KeyCounts, sqlx::Error>> + Send + 'p;

    /// Operators, in the transaction of the change it records: appends an audit row to
    /// `<table>_audit`; `reference` ties the rows' changes of one action together
    /// ([`audit_add`](Self::audit_add)).
    fn audit_insert<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        reference: Uuid,
        entry: &'c NewAudit<'c>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;

    /// Operators, in the transaction of a further change of the same action: adds
    /// `affected` to the audit row of `reference`.
    fn audit_add<'c>(
        conn: &'c mut Self::Connection,
        table: &'c TableName,
        reference: Uuid,
        affected: u64,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;

    /// Operators: the newest `limit` audit rows of `<table>_audit`, of `service` or all.
    fn audit<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: Option<&'p ServiceName>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, sqlx::Error>> + Send + 'p;

    /// The database clock.
    fn now<'p>(
        pool: &'p Pool<Self>,
    ) -> impl Future<Output = Result<DateTime<Utc>, sqlx::Error>> + Send + 'p;

    /// Sends a wake-up hint on `channel`, in its own statement (PostgreSQL `pg_notify`,
    /// never inside a business transaction). The default, for databases without
    /// LISTEN/NOTIFY, does nothing: relays fall back to polling.
    fn notify<'p>(
        pool: &'p Pool<Self>,
        channel: &'p str,
        payload: &'p str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'p {
        let _ = (pool, channel, payload);
        async { Ok(()) }
    }

    /// Runs one statement with `?` placeholders on any backend (PostgreSQL's are
    /// rewritten to `$n`; a `?` must not appear inside a literal). Returns rows
    /// affected. For handlers generic over the backend.
    fn execute_portable<'c>(
        conn: &'c mut Self::Connection,
        sql: &'c str,
        args: &'c [SqlValue],
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'c;

    /// Listens on `channel`, on a connection of its own opened with `pool`'s connect
    /// options (not one of the pool's): a stream of hint payloads, or `None` where the
    /// database has no LISTEN (the default).
    fn listen<'p>(
        pool: &'p Pool<Self>,
        channel: &'p str,
    ) -> impl Future<Output = Result<Option<WakeStream>, sqlx::Error>> + Send + 'p {
        let _ = (pool, channel);
        async { Ok(None) }
    }
}

/// A bind value for portable statements ([`crate::HandlerContext::execute`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SqlValue {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
}

impl From<i64> for SqlValue {
    fn from(v: i64) -> Self {
        SqlValue::Int(v)
    }
}
impl From<i32> for SqlValue {
    fn from(v: i32) -> Self {
        SqlValue::Int(v.into())
    }
}
impl From<u32> for SqlValue {
    fn from(v: u32) -> Self {
        SqlValue::Int(v.into())
    }
}
impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        SqlValue::Text(v)
    }
}
impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        SqlValue::Text(v.to_owned())
    }
}
impl<T: Into<SqlValue>> From<Option<T>> for SqlValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(SqlValue::Null, Into::into)
    }
}

/// Wake-up hints from [`Backend::listen`]. The stream reconnects by itself; a lost hint
/// only costs latency, since relays also poll.
pub type WakeStream = futures::stream::BoxStream<'static, Result<String, sqlx::Error>>;

/// Folds `(status, count)` pairs into [`StatusCounts`] (shared by the backends).
pub(crate) fn counts_from(rows: impl IntoIterator<Item = (i16, i64)>) -> StatusCounts {
    let mut c = StatusCounts::default();
    for (status, n) in rows {
        let n = n.max(0) as u64;
        match Status::from_i16(status) {
            Some(Status::Pending) => c.pending += n,
            Some(Status::Published) => c.published += n,
            Some(Status::Consumed) => c.consumed += n,
            Some(Status::Dead) => c.dead += n,
            Some(Status::Discarded) => c.discarded += n,
            None => {}
        }
    }
    c
}
