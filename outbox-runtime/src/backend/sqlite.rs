//! SQLite 3.35+ (`RETURNING`), one file shared by the processes on one host.
//!
//! - Build the pool with [`sqlite_connect_options`] (or pass your own options through
//!   [`sqlite_outbox_options`]): WAL, a busy timeout, `synchronous = NORMAL`. Without
//!   WAL and a busy timeout, concurrent writers fail with `SQLITE_BUSY`.
//! - Every write transaction starts with `BEGIN IMMEDIATE` ([`Backend::begin`]), so it
//!   takes the write lock up front and waits for it under the busy timeout; a deferred
//!   transaction that reads and then writes fails at once with `SQLITE_BUSY_SNAPSHOT`
//!   when another writer got in between, busy timeout or not.
//! - The claim and every pool-level transition are single statements, which take the
//!   write lock when they start (so they wait under the busy timeout, too) and are
//!   atomic. The claim is one `UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING …`.
//! - SQLite has no row locks: several relays claiming at once are merely serialised, so
//!   [`Backend::CONCURRENT_RELAYS`] is `false` (one relay per service holds a lease).
//! - Times are `INTEGER` unix microseconds (UTC) computed in SQL from
//!   `julianday('now')`, millisecond resolution, so every comparison is an integer
//!   comparison. Use a file database: each connection to `:memory:` is a database of
//!   its own.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Pool, Sqlite};
use uuid::Uuid;

use crate::route::{ServiceName, TableName};

use super::ops::{micros, store_ops, Dialect, Query};
use super::rows::claimed_rows;
use super::statements::{Bounded, HeadOfKey, SqlDialect};
use super::{Backend, ClaimedRow};

/// The database clock as unix microseconds: `julianday('now')` is kept in whole
/// milliseconds, so rounding recovers it exactly. `'now'` is fixed for the duration of
/// one statement step, so every use in one statement sees the same instant.
const NOW: &str = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

/// The claim: one statement, which takes the write lock as it starts.
const CLAIM: &str = "UPDATE {t} SET {lease} WHERE id IN (SELECT o.id FROM {t} o \
    WHERE {claimable} ORDER BY o.id LIMIT {p}) RETURNING {claimed}";

pub(crate) const SQL: SqlDialect = SqlDialect {
    name: "sqlite",
    numbered: false,
    now: NOW,
    interval: "{p}",
    nullable_delay: "{p}",
    nullable_uuid: "{p}",
    nullable_text: "{p}",
    // Ids as one JSON array parameter: one statement shape (and one cached prepared
    // statement) serves every list length.
    in_ids: "IN (SELECT value FROM json_each({p}))",
    in_list: "IN ({list})",
    // The caller's BEGIN IMMEDIATE already holds the database's one write lock.
    for_update: "",
    skip_locked: "",
    head_of_key: HeadOfKey::NoneBefore,
    bounded: Bounded::Subquery,
    skip_duplicate: ("INSERT INTO", " ON CONFLICT (event_id) DO NOTHING"),
    raise_watermark: "INSERT INTO {t}_seen (service, event_key, last_event_id, raised_at) \
        VALUES ({p}, {p}, {p}, {now}) ON CONFLICT (service, event_key) DO UPDATE \
        SET last_event_id = excluded.last_event_id, raised_at = excluded.raised_at \
        WHERE {t}_seen.last_event_id < excluded.last_event_id",
    own: &[CLAIM],
};

/// Most parameters bound to one statement (SQLite's limit is 32,766 since 3.32, 999
/// before).
const MAX_BINDS: usize = 900;

/// How long a connection waits for the write lock before failing with `SQLITE_BUSY`.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect options for an outbox database at `path_or_url`: WAL, `busy_timeout` of
/// [`SQLITE_BUSY_TIMEOUT`], `synchronous = NORMAL`, foreign keys on, and the file
/// created if missing. Build the pool with them:
///
/// ```ignore
/// let pool = sqlx::sqlite::SqlitePoolOptions::new()
///     .connect_with(outbox_runtime::sqlite::sqlite_connect_options("app.db"))
///     .await?;
/// ```
///
/// `path_or_url` is a file path, or a `sqlite:` URL (whose query parameters are kept;
/// the settings above then override theirs). A URL that does not parse is taken as a
/// path with its `sqlite:` / `sqlite://` prefix and query string removed.
pub fn sqlite_connect_options(path_or_url: &str) -> SqliteConnectOptions {
    let base = if path_or_url.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(path_or_url).unwrap_or_else(|_| {
            let path = path_or_url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or(path);
            SqliteConnectOptions::new().filename(path)
        })
    } else {
        SqliteConnectOptions::new().filename(path_or_url)
    };
    sqlite_outbox_options(base)
}

/// Applies the settings of [`sqlite_connect_options`] to options you built yourself.
pub fn sqlite_outbox_options(options: SqliteConnectOptions) -> SqliteConnectOptions {
    options
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .create_if_missing(true)
}

impl super::sealed::Sealed for Sqlite {}

/// Ids as a JSON array (see [`SQL`]'s `in_ids`).
fn json_ids(ids: &[i64]) -> String {
    let mut s = String::with_capacity(ids.len() * 8 + 2);
    s.push('[');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&id.to_string());
    }
    s.push(']');
    s
}

impl Dialect for Sqlite {
    const SQL: &'static SqlDialect = &SQL;
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const MIGRATION: &'static str = include_str!("../../migrations/sqlite/outbox_table.sql");
    const INBOX_MIGRATION: &'static str = include_str!("../../migrations/sqlite/inbox_seen.sql");
    const ID_CHUNK: usize = usize::MAX;
    const LIST_CHUNK: usize = MAX_BINDS;
    const FIND_BEFORE_LOCK: bool = false;

    type Delay = i64;

    fn delay(d: Duration) -> i64 {
        micros(d)
    }

    fn bind_ids<'q>(q: Query<'q, Self>, ids: &'q [i64]) -> Query<'q, Self> {
        q.bind(json_ids(ids))
    }

    fn bind_uuids<'q>(q: Query<'q, Self>, ids: &'q [Uuid]) -> Query<'q, Self> {
        ids.iter().fold(q, |q, id| q.bind(*id))
    }
}

impl Backend for Sqlite {
    const BACKEND_NAME: &'static str = "sqlite";
    const BACKEND_NAMES: &'static [&'static str] = &["sqlite"];
    const HAS_NOTIFY: bool = false;
    const CONCURRENT_RELAYS: bool = false;

    store_ops!();

    async fn migrate_ddl(
        pool: &Pool<Self>,
        table: &TableName,
        sql: String,
    ) -> Result<(), sqlx::Error> {
        // One write transaction: concurrent migrations queue on the write lock, and the
        // second one finds everything in place.
        let mut tx = Self::begin(pool).await?;
        super::upgrade::add_missing_columns::<Self>(
            &mut tx,
            table,
            "SELECT name FROM pragma_table_info(?)",
            |c| c.sqlite,
        )
        .await?;
        // sqlx runs every statement of a multi-statement string, in order.
        sqlx::query(&sql).execute(&mut *tx).await?;
        tx.commit().await
    }

    async fn claim<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
        lease: Duration,
        token: i64,
    ) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let s = Self::statements(table);
        let rows = sqlx::query(s.own[0].text())
            .bind(token)
            .bind(micros(lease))
            .bind(service.as_str())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
        claimed_rows(&rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn id_lists_are_json() {
        assert_eq!(json_ids(&[]), "[]");
        assert_eq!(json_ids(&[1, -2, i64::MAX]), format!("[1,-2,{}]", i64::MAX));
    }

    #[test]
    fn connect_options_from_path_or_url() {
        assert_eq!(
            sqlite_connect_options("data/app.db").get_filename(),
            Path::new("data/app.db")
        );
        assert_eq!(
            sqlite_connect_options("sqlite://data/app.db").get_filename(),
            Path::new("data/app.db")
        );
        assert_eq!(
            sqlite_connect_options("sqlite:data/app.db?mode=bogus").get_filename(),
            Path::new("data/app.db"),
            "an unparsable URL falls back to its path"
        );
    }

    #[test]
    fn migration_sql_names_the_table() {
        let sql = <Sqlite as Backend>::migration_sql(&TableName::new("orders_outbox").unwrap());
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS orders_outbox ("));
        assert!(sql.contains("orders_outbox_claim_idx"));
        assert!(!sql.contains("{table}"));
    }
}
