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

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteRow, SqliteSynchronous};
use sqlx::{Pool, Row, Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

use crate::route::{ServiceName, TableName};

use super::{
    placeholders, AttemptsFence, Backend, ClaimedRow, NewRow, OutboxRow, RowState, SqlValue,
    Status, StatusCounts,
};

const MIGRATION: &str = include_str!("../../migrations/sqlite/outbox_table.sql");

/// The database clock as unix microseconds: `julianday('now')` is kept in whole
/// milliseconds, so rounding recovers it exactly. `'now'` is fixed for the duration of
/// one statement step, so every use in one statement sees the same instant.
const NOW: &str = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000)";

/// The longest delay applied (100 years): longer ones are clamped.
const MAX_DELAY_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

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

/// A consumer's view of a row ([`super::ROW_STATE_COLUMNS`]).
fn row_state(r: &SqliteRow) -> Result<RowState, sqlx::Error> {
    Ok(RowState {
        id: r.try_get("id")?,
        status: status(r.try_get("status")?)?,
        attempts: r.try_get("attempts")?,
        max_retries: r.try_get("max_retries")?,
        key: r.try_get("event_key")?,
        event_type: r.try_get("event_type")?,
        version: r.try_get("event_version")?,
        payload: r.try_get("payload")?,
        due: r.try_get::<i64, _>("due")? == 1,
    })
}

fn row_state_columns() -> String {
    super::ROW_STATE_COLUMNS.replace("{now}", NOW)
}

impl super::sealed::Sealed for Sqlite {}

/// A delay in microseconds, clamped to [`MAX_DELAY_MICROS`].
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_DELAY_MICROS)
}

/// Ids as a JSON array, bound as one parameter and expanded with `json_each`, so one
/// statement shape (and one cached prepared statement) serves every list length.
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

/// Most parameters bound to one statement (SQLite's limit is 32,766 since 3.32, 999
/// before).
const MAX_BINDS: usize = 900;

fn status(v: i16) -> Result<Status, sqlx::Error> {
    Status::from_i16(v)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown outbox status {v}").into()))
}

fn time(r: &SqliteRow, col: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    let us: i64 = r.try_get(col)?;
    from_micros(col, us)
}

fn opt_time(r: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let us: Option<i64> = r.try_get(col)?;
    us.map(|us| from_micros(col, us)).transpose()
}

fn from_micros(col: &str, us: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: col.to_string(),
        source: format!("{us} µs is out of range for a timestamp").into(),
    })
}

const ROW_COLUMNS: &str =
    "id, event_id, service, event_type, event_version, event_key, payload, status, \
     attempts, max_retries, next_attempt_at, last_error, created_at, updated_at, published_at, \
     consumed_at, dead_at";

fn outbox_row(r: &SqliteRow) -> Result<OutboxRow, sqlx::Error> {
    Ok(OutboxRow {
        id: r.try_get("id")?,
        event_id: r.try_get("event_id")?,
        service: r.try_get("service")?,
        event_type: r.try_get("event_type")?,
        version: r.try_get("event_version")?,
        key: r.try_get("event_key")?,
        payload: r.try_get("payload")?,
        status: status(r.try_get("status")?)?,
        attempts: r.try_get("attempts")?,
        max_retries: r.try_get("max_retries")?,
        next_attempt_at: time(r, "next_attempt_at")?,
        last_error: r.try_get("last_error")?,
        created_at: time(r, "created_at")?,
        updated_at: time(r, "updated_at")?,
        published_at: opt_time(r, "published_at")?,
        consumed_at: opt_time(r, "consumed_at")?,
        dead_at: opt_time(r, "dead_at")?,
    })
}

impl Backend for Sqlite {
    const BACKEND_NAME: &'static str = "sqlite";
    const BACKEND_NAMES: &'static [&'static str] = &["sqlite"];
    const HAS_NOTIFY: bool = false;
    const CONCURRENT_RELAYS: bool = false;

    async fn begin(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn migrate(pool: &Pool<Self>, table: &TableName) -> Result<(), sqlx::Error> {
        // One write transaction: concurrent migrations queue on the write lock, and the
        // second one finds everything in place.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let sql = Self::migration_sql(table);
        // sqlx runs every statement of a multi-statement string, in order.
        sqlx::query(&sql).execute(&mut *tx).await?;
        tx.commit().await
    }

    fn migration_sql(table: &TableName) -> String {
        MIGRATION.replace("{table}", table.as_str())
    }

    async fn insert<'c>(
        conn: &'c mut SqliteConnection,
        table: &'c TableName,
        row: &'c NewRow<'c>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {table} (event_id, service, event_type, event_version, event_key, payload, \
                                  max_retries, next_attempt_at, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, {NOW}, {NOW}, {NOW})"
        ))
        .bind(row.event_id)
        .bind(row.service.as_str())
        .bind(row.event_type)
        .bind(row.version)
        .bind(row.key)
        .bind(row.payload)
        .bind(row.max_retries)
        .execute(conn)
        .await?;
        Ok(())
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
        let rows = sqlx::query(&format!(
            "UPDATE {table} \
                SET lease_token = ?, locked_until = {NOW} + ?, updated_at = {NOW} \
              WHERE id IN ( \
                    SELECT o.id FROM {table} o \
                     WHERE o.service = ? AND o.status = 0 AND o.next_attempt_at <= {NOW} \
                       AND (o.locked_until IS NULL OR o.locked_until <= {NOW}) \
                       AND (o.event_key IS NULL OR NOT EXISTS ( \
                             SELECT 1 FROM {table} p \
                              WHERE p.service = o.service AND p.event_key = o.event_key \
                                AND p.status = 0 AND p.id < o.id)) \
                     ORDER BY o.id \
                     LIMIT ?) \
             RETURNING id, event_id, event_type, event_version, event_key, payload, attempts, created_at"
        ))
        .bind(token)
        .bind(micros(lease))
        .bind(service.as_str())
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
        let mut claimed = rows
            .iter()
            .map(|r| {
                Ok(ClaimedRow {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    event_type: r.try_get("event_type")?,
                    version: r.try_get("event_version")?,
                    key: r.try_get("event_key")?,
                    payload: r.try_get("payload")?,
                    attempts: r.try_get("attempts")?,
                    created_at: time(r, "created_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        // RETURNING has no defined order.
        claimed.sort_by_key(|r| r.id);
        Ok(claimed)
    }

    async fn mark_published<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        ids: &'p [i64],
        token: i64,
    ) -> Result<u64, sqlx::Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(&format!(
            "UPDATE {table} SET status = 1, published_at = {NOW}, locked_until = NULL, lease_token = 0, \
                    updated_at = {NOW} \
              WHERE id IN (SELECT value FROM json_each(?)) AND lease_token = ? AND status = 0"
        ))
        .bind(json_ids(ids))
        .bind(token)
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn release<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        ids: &'p [i64],
        token: i64,
        delay: Duration,
        error: &'p str,
    ) -> Result<u64, sqlx::Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(&format!(
            "UPDATE {table} SET next_attempt_at = {NOW} + ?, locked_until = NULL, lease_token = 0, \
                    last_error = ?, updated_at = {NOW} \
              WHERE id IN (SELECT value FROM json_each(?)) AND lease_token = ? AND status = 0"
        ))
        .bind(micros(delay))
        .bind(super::truncate_error(error))
        .bind(json_ids(ids))
        .bind(token)
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn mark_dead_leased<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        id: i64,
        token: i64,
        reason: &'p str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {table} SET status = 3, attempts = attempts + 1, last_error = ?, dead_at = {NOW}, \
                    locked_until = NULL, lease_token = 0, updated_at = {NOW} \
              WHERE id = ? AND lease_token = ? AND status = 0"
        ))
        .bind(super::truncate_error(reason))
        .bind(id)
        .bind(token)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn lock_for_consume<'c>(
        conn: &'c mut SqliteConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_id: Uuid,
    ) -> Result<Option<RowState>, sqlx::Error> {
        // The caller's BEGIN IMMEDIATE already holds the database's write lock.
        let row = sqlx::query(&format!(
            "SELECT {} FROM {table} WHERE event_id = ? AND service = ?",
            row_state_columns()
        ))
        .bind(event_id)
        .bind(service.as_str())
        .fetch_optional(conn)
        .await?;
        row.as_ref().map(row_state).transpose()
    }

    async fn lock_batch_for_consume<'c>(
        conn: &'c mut SqliteConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_ids: &'c [Uuid],
    ) -> Result<Vec<(Uuid, RowState)>, sqlx::Error> {
        // The caller's BEGIN IMMEDIATE already holds the database's one write lock.
        let mut states = Vec::with_capacity(event_ids.len());
        for chunk in event_ids.chunks(MAX_BINDS) {
            let sql = format!(
                "SELECT event_id, {} FROM {table} WHERE service = ? AND event_id IN ({})",
                row_state_columns(),
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(service.as_str());
            for e in chunk {
                q = q.bind(*e);
            }
            for r in q.fetch_all(&mut *conn).await? {
                states.push((r.try_get("event_id")?, row_state(&r)?));
            }
        }
        Ok(states)
    }

    async fn has_open_predecessor<'c>(
        conn: &'c mut SqliteConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
        id: i64,
    ) -> Result<bool, sqlx::Error> {
        let found: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM {table} \
              WHERE service = ? AND event_key = ? AND status IN (0, 1) AND id < ? \
              LIMIT 1"
        ))
        .bind(service.as_str())
        .bind(key)
        .bind(id)
        .fetch_optional(conn)
        .await?;
        Ok(found.is_some())
    }

    async fn open_rows_of_keys<'c>(
        conn: &'c mut SqliteConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        keys: &'c [String],
        below: i64,
        limit: u32,
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let mut rows = Vec::new();
        // Keys chunked (bound one per parameter); `limit` is per chunk, which only
        // makes an incomplete answer less likely.
        for chunk in keys.chunks(MAX_BINDS) {
            let sql = format!(
                "SELECT event_key, id FROM {table} \
                  WHERE service = ? AND event_key IN ({}) AND status IN (0, 1) AND id < ? LIMIT ?",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query_as::<_, (String, i64)>(&sql).bind(service.as_str());
            for k in chunk {
                q = q.bind(k);
            }
            rows.extend(q.bind(below).bind(limit).fetch_all(&mut *conn).await?);
        }
        Ok(rows)
    }

    async fn mark_consumed<'c>(
        conn: &'c mut SqliteConnection,
        table: &'c TableName,
        ids: &'c [i64],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {table} SET status = 2, consumed_at = {NOW}, locked_until = NULL, lease_token = 0, \
                    updated_at = {NOW} \
              WHERE id IN (SELECT value FROM json_each(?)) AND status IN (0, 1)"
        ))
        .bind(json_ids(ids))
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn defer<'c>(
        conn: &'c mut SqliteConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
        id: i64,
        delay: Duration,
    ) -> Result<u64, sqlx::Error> {
        let republished = sqlx::query(&format!(
            "UPDATE {table} SET status = 0, next_attempt_at = {NOW}, locked_until = NULL, lease_token = 0, \
                    updated_at = {NOW} \
              WHERE service = ? AND event_key = ? AND status = 1 AND id < ?"
        ))
        .bind(service.as_str())
        .bind(key)
        .bind(id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        sqlx::query(&format!(
            "UPDATE {table} SET status = 0, next_attempt_at = {NOW} + ?, locked_until = NULL, lease_token = 0, \
                    updated_at = {NOW} \
              WHERE id = ? AND status IN (0, 1)"
        ))
        .bind(micros(delay))
        .bind(id)
        .execute(conn)
        .await?;
        Ok(republished)
    }

    async fn purge<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        consumed_age: Duration,
        dead_age: Option<Duration>,
        limit: u32,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&format!(
            "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} \
              WHERE service = ? AND ((status = 2 AND consumed_at < {NOW} - ?) \
                 OR (? IS NOT NULL AND status = 3 AND dead_at < {NOW} - ?)) \
              LIMIT ?) AND status IN (2, 3)"
        ))
        .bind(service.as_str())
        .bind(micros(consumed_age))
        .bind(dead_age.map(micros))
        .bind(dead_age.map(micros).unwrap_or(0))
        .bind(i64::from(limit))
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn retry_later<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        id: i64,
        fence: AttemptsFence,
        delay: Duration,
        error: &'p str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {table} SET status = 0, attempts = attempts + 1, next_attempt_at = {NOW} + ?, \
                    last_error = ?, locked_until = NULL, lease_token = 0, updated_at = {NOW} \
              WHERE id = ? AND attempts = ? AND status IN (0, 1)"
        ))
        .bind(micros(delay))
        .bind(super::truncate_error(error))
        .bind(id)
        .bind(fence.0)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mark_dead<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        id: i64,
        fence: AttemptsFence,
        reason: &'p str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {table} SET status = 3, attempts = attempts + 1, last_error = ?, dead_at = {NOW}, \
                    locked_until = NULL, lease_token = 0, updated_at = {NOW} \
              WHERE id = ? AND attempts = ? AND status IN (0, 1)"
        ))
        .bind(super::truncate_error(reason))
        .bind(id)
        .bind(fence.0)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn fetch<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        event_id: Uuid,
    ) -> Result<Option<OutboxRow>, sqlx::Error> {
        sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM {table} WHERE event_id = ?"
        ))
        .bind(event_id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(outbox_row)
        .transpose()
    }

    async fn redeliver_stale<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        older_than: Duration,
        newer_than: Option<Duration>,
        limit: u32,
    ) -> Result<u64, sqlx::Error> {
        let newer = newer_than.map(micros);
        let done = sqlx::query(&format!(
            "UPDATE {table} SET status = 0, next_attempt_at = {NOW}, locked_until = NULL, lease_token = 0, \
                    updated_at = {NOW} \
              WHERE id IN (SELECT id FROM {table} WHERE service = ? AND status = 1 \
                             AND published_at < {NOW} - ? AND (? IS NULL OR published_at >= {NOW} - ?) \
                             ORDER BY id LIMIT ?) AND status = 1"
        ))
        .bind(service.as_str())
        .bind(micros(older_than))
        .bind(newer)
        .bind(newer)
        .bind(i64::from(limit))
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn fetch_dead<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM {table} WHERE service = ? AND status = 3 ORDER BY id LIMIT ?"
        ))
        .bind(service.as_str())
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?
        .iter()
        .map(outbox_row)
        .collect()
    }

    async fn revive<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        event_id: Option<Uuid>,
        limit: u32,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {table} SET status = 0, attempts = 0, next_attempt_at = {NOW}, dead_at = NULL, \
                    locked_until = NULL, lease_token = 0, updated_at = {NOW} \
              WHERE id IN (SELECT id FROM {table} WHERE service = ? AND status = 3 \
                             AND (? IS NULL OR event_id = ?) ORDER BY id LIMIT ?) AND status = 3"
        ))
        .bind(service.as_str())
        .bind(event_id)
        .bind(event_id)
        .bind(i64::from(limit))
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn fetch_all<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM {table} WHERE service = ? ORDER BY id"
        ))
        .bind(service.as_str())
        .fetch_all(pool)
        .await?
        .iter()
        .map(outbox_row)
        .collect()
    }

    async fn counts<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> Result<StatusCounts, sqlx::Error> {
        let rows: Vec<(i16, i64)> = sqlx::query_as(&format!(
            "SELECT status, COUNT(*) FROM {table} WHERE service = ? GROUP BY status"
        ))
        .bind(service.as_str())
        .fetch_all(pool)
        .await?;
        Ok(super::counts_from(rows))
    }

    async fn now(pool: &Pool<Self>) -> Result<DateTime<Utc>, sqlx::Error> {
        let us: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(pool)
            .await?;
        from_micros("now", us)
    }

    async fn execute_portable<'c>(
        conn: &'c mut SqliteConnection,
        sql: &'c str,
        args: &'c [SqlValue],
    ) -> Result<u64, sqlx::Error> {
        let mut q = sqlx::query(sql);
        for a in args {
            q = match a {
                SqlValue::Null => q.bind(None::<String>),
                SqlValue::Int(i) => q.bind(*i),
                SqlValue::Text(t) => q.bind(t.as_str()),
            };
        }
        Ok(q.execute(conn).await?.rows_affected())
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
    fn delays_are_clamped() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), MAX_DELAY_MICROS);
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
