//! MySQL 8.0.1+ and MariaDB 10.6+ (both have `SKIP LOCKED`).
//!
//! - Every transaction this backend opens runs in READ COMMITTED, so locking reads take
//!   record locks only, never gap or next-key locks (which is what makes outbox claims
//!   deadlock with concurrent inserts under REPEATABLE READ).
//! - The claim is a short transaction: `SELECT id … ORDER BY id LIMIT n FOR UPDATE SKIP
//!   LOCKED` over the `(service, status, id)` index, then `UPDATE … WHERE id IN (…)` by
//!   primary key, then a read of the claimed rows (MySQL has no `UPDATE … RETURNING`).
//! - Deadlocks (1213) and lock-wait timeouts (1205) of the statements this backend runs
//!   on its own (the pool-level methods) are retried a few times after a short jittered
//!   sleep, and counted in [`mysql_retry_count`]. Statements on the caller's connection
//!   are never retried: a deadlock rolls the caller's whole transaction back, so only
//!   the caller can repeat it.
//! - A row that may not exist is never locked: [`Backend::lock_for_consume`] finds the
//!   row with a plain read, then locks it by primary key.
//! - Times are `DATETIME(6)` in UTC from `UTC_TIMESTAMP(6)`, whatever the session time
//!   zone; the app passes only delays.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlDatabaseError, MySqlRow};
use sqlx::{MySql, MySqlConnection, Pool, Row, Transaction};
use uuid::Uuid;

use crate::route::{ServiceName, TableName};

use super::{
    placeholders, AttemptsFence, Backend, ClaimedRow, NewRow, OutboxRow, RowState, SqlValue,
    Status, StatusCounts,
};

const MIGRATION: &str = include_str!("../../migrations/mysql/outbox_table.sql");

/// How often a deadlocked or timed-out statement is tried again before the error is
/// returned.
const MAX_RETRIES: u32 = 5;

/// Most ids bound into one `IN (…)` list; longer lists are split.
const IN_CHUNK: usize = 1000;

/// The longest delay applied (100 years): longer ones are clamped, so `DATETIME`
/// arithmetic can never overflow.
const MAX_DELAY_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// `GET_LOCK` names are limited to 64 characters.
const LOCK_NAME_MAX: usize = 64;

/// How long `migrate` waits for a concurrent migration, in seconds.
const MIGRATE_LOCK_WAIT_SECS: i64 = 60;

static RETRIES: AtomicU64 = AtomicU64::new(0);

/// How many times, process-wide, a MySQL statement of this backend was retried after a
/// deadlock (error 1213) or a lock-wait timeout (1205). Rising steadily means lock
/// contention worth a look; it is not an error by itself.
pub fn mysql_retry_count() -> u64 {
    RETRIES.load(Ordering::Relaxed)
}

impl super::sealed::Sealed for MySql {}

/// Whether `e` is a deadlock or a lock-wait timeout, which are worth repeating.
fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|e| matches!(e.number(), 1213 | 1205)),
        _ => false,
    }
}

/// Runs `op` until it succeeds, fails with a non-retryable error, or has been retried
/// [`MAX_RETRIES`] times; sleeps a few jittered milliseconds between tries.
async fn with_retry<T, F, Fut>(mut op: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut retries = 0;
    loop {
        match op().await {
            Err(e) if retries < MAX_RETRIES && is_retryable(&e) => {
                retries += 1;
                RETRIES.fetch_add(1, Ordering::Relaxed);
                let base = 5u64 << retries.min(5);
                let jitter = rand::random::<u64>() % base;
                tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
            }
            other => return other,
        }
    }
}

/// Begins a READ COMMITTED transaction (`SET TRANSACTION` applies to the next
/// transaction of the connection only, so pooled connections keep their defaults).
async fn begin_rc(pool: &Pool<MySql>) -> Result<Transaction<'static, MySql>, sqlx::Error> {
    pool.begin_with("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION")
        .await
}

/// A delay in microseconds, clamped to [`MAX_DELAY_MICROS`].
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_DELAY_MICROS)
}

fn status(v: i16) -> Result<Status, sqlx::Error> {
    Status::from_i16(v)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown outbox status {v}").into()))
}

/// A text column. Read as bytes: the name and key columns use a binary collation, which
/// MySQL may flag as binary, and sqlx refuses to decode binary-flagged columns as text.
fn text(r: &MySqlRow, col: &str) -> Result<String, sqlx::Error> {
    let bytes: Vec<u8> = r.try_get(col)?;
    String::from_utf8(bytes).map_err(|e| sqlx::Error::ColumnDecode {
        index: col.to_string(),
        source: Box::new(e),
    })
}

/// A nullable text column (see [`text`]).
fn opt_text(r: &MySqlRow, col: &str) -> Result<Option<String>, sqlx::Error> {
    let bytes: Option<Vec<u8>> = r.try_get(col)?;
    bytes
        .map(|b| {
            String::from_utf8(b).map_err(|e| sqlx::Error::ColumnDecode {
                index: col.to_string(),
                source: Box::new(e),
            })
        })
        .transpose()
}

/// A consumer's view of a row ([`super::ROW_STATE_COLUMNS`]).
fn row_state(r: &MySqlRow) -> Result<RowState, sqlx::Error> {
    Ok(RowState {
        id: r.try_get("id")?,
        status: status(r.try_get("status")?)?,
        attempts: r.try_get("attempts")?,
        max_retries: r.try_get("max_retries")?,
        key: opt_text(r, "event_key")?,
        event_type: text(r, "event_type")?,
        version: r.try_get("event_version")?,
        payload: text(r, "payload")?,
        due: r.try_get::<i64, _>("due")? == 1,
    })
}

fn row_state_columns() -> String {
    super::ROW_STATE_COLUMNS.replace("{now}", "UTC_TIMESTAMP(6)")
}

const ROW_COLUMNS: &str =
    "id, event_id, service, event_type, event_version, event_key, payload, status, \
     attempts, max_retries, next_attempt_at, last_error, created_at, updated_at, published_at, \
     consumed_at, dead_at";

const CLAIMED_COLUMNS: &str =
    "id, event_id, event_type, event_version, event_key, payload, attempts, created_at";

fn outbox_row(r: &MySqlRow) -> Result<OutboxRow, sqlx::Error> {
    Ok(OutboxRow {
        id: r.try_get("id")?,
        event_id: r.try_get("event_id")?,
        service: text(r, "service")?,
        event_type: text(r, "event_type")?,
        version: r.try_get("event_version")?,
        key: opt_text(r, "event_key")?,
        payload: text(r, "payload")?,
        status: status(r.try_get("status")?)?,
        attempts: r.try_get("attempts")?,
        max_retries: r.try_get("max_retries")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        last_error: opt_text(r, "last_error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        published_at: r.try_get("published_at")?,
        consumed_at: r.try_get("consumed_at")?,
        dead_at: r.try_get("dead_at")?,
    })
}

fn claimed_row(r: &MySqlRow) -> Result<ClaimedRow, sqlx::Error> {
    Ok(ClaimedRow {
        id: r.try_get("id")?,
        event_id: r.try_get("event_id")?,
        event_type: text(r, "event_type")?,
        version: r.try_get("event_version")?,
        key: opt_text(r, "event_key")?,
        payload: text(r, "payload")?,
        attempts: r.try_get("attempts")?,
        created_at: r.try_get("created_at")?,
    })
}

/// The name of the `GET_LOCK` lock that serialises migrations of `table`.
fn migrate_lock_name(table: &TableName) -> String {
    let mut name = format!("outbox_migrate:{table}");
    // Table names are ASCII (checked against the name grammar), so any cut is on a
    // character boundary; a cut only makes unrelated tables share the lock.
    if name.len() > LOCK_NAME_MAX && name.is_char_boundary(LOCK_NAME_MAX) {
        name.truncate(LOCK_NAME_MAX);
    }
    name
}

/// One claim attempt: a short READ COMMITTED transaction.
async fn claim_once(
    pool: &Pool<MySql>,
    table: &TableName,
    service: &ServiceName,
    limit: u32,
    lease_us: i64,
    token: i64,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let mut tx = begin_rc(pool).await?;
    let ids: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT o.id FROM {table} o \
          WHERE o.service = ? AND o.status = 0 AND o.next_attempt_at <= UTC_TIMESTAMP(6) \
            AND (o.locked_until IS NULL OR o.locked_until <= UTC_TIMESTAMP(6)) \
            AND (o.event_key IS NULL OR NOT EXISTS ( \
                  SELECT 1 FROM {table} p \
                   WHERE p.service = o.service AND p.event_key = o.event_key \
                     AND p.status = 0 AND p.id < o.id)) \
          ORDER BY o.id \
          LIMIT ? \
          FOR UPDATE SKIP LOCKED"
    ))
    .bind(service.as_str())
    .bind(i64::from(limit))
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        tx.rollback().await?;
        return Ok(Vec::new());
    }
    let list = placeholders(ids.len());
    let update_sql = format!(
        "UPDATE {table} \
            SET lease_token = ?, locked_until = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                updated_at = UTC_TIMESTAMP(6) \
          WHERE id IN ({list}) AND status = 0"
    );
    let mut update = sqlx::query(&update_sql).bind(token).bind(lease_us);
    for id in &ids {
        update = update.bind(*id);
    }
    update.execute(&mut *tx).await?;
    let select_sql =
        format!("SELECT {CLAIMED_COLUMNS} FROM {table} WHERE id IN ({list}) AND lease_token = ? ORDER BY id");
    let mut select = sqlx::query(&select_sql);
    for id in &ids {
        select = select.bind(*id);
    }
    let rows = select.bind(token).fetch_all(&mut *tx).await?;
    let claimed = rows
        .iter()
        .map(claimed_row)
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit().await?;
    Ok(claimed)
}

/// A bind parameter of [`update_ids`].
#[derive(Clone, Copy)]
enum Param<'a> {
    Int(i64),
    Text(&'a str),
}

/// Runs an update over `ids` in chunks of [`IN_CHUNK`], each retried on deadlock;
/// returns the rows changed. `sql` spells the id list `{ids}`; `before` binds the
/// parameters that come before it in the text, `after` those after it.
async fn update_ids(
    pool: &Pool<MySql>,
    sql: &str,
    before: &[Param<'_>],
    ids: &[i64],
    after: &[Param<'_>],
) -> Result<u64, sqlx::Error> {
    let mut changed = 0;
    for chunk in ids.chunks(IN_CHUNK) {
        let sql = sql.replace("{ids}", &placeholders(chunk.len()));
        changed += with_retry(|| {
            let mut q = sqlx::query(&sql);
            for p in before {
                q = match *p {
                    Param::Int(v) => q.bind(v),
                    Param::Text(v) => q.bind(v),
                };
            }
            for id in chunk {
                q = q.bind(*id);
            }
            for p in after {
                q = match *p {
                    Param::Int(v) => q.bind(v),
                    Param::Text(v) => q.bind(v),
                };
            }
            async move { q.execute(pool).await.map(|d| d.rows_affected()) }
        })
        .await?;
    }
    Ok(changed)
}

impl Backend for MySql {
    const BACKEND_NAME: &'static str = "mysql";
    const BACKEND_NAMES: &'static [&'static str] = &["mysql"];
    const HAS_NOTIFY: bool = false;
    const CONCURRENT_RELAYS: bool = true;

    async fn begin(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        begin_rc(pool).await
    }

    async fn migrate(pool: &Pool<Self>, table: &TableName) -> Result<(), sqlx::Error> {
        let sql = Self::migration_sql(table);
        let lock = migrate_lock_name(table);
        let mut conn = pool.acquire().await?;
        // 1 = acquired, 0 = timed out, NULL = error.
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(&lock)
            .bind(MIGRATE_LOCK_WAIT_SECS)
            .fetch_one(&mut *conn)
            .await?;
        if got != Some(1) {
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "timed out after {MIGRATE_LOCK_WAIT_SECS} s waiting for the migration lock \
                     `{lock}` (another process is migrating `{table}`)"
                ),
            )));
        }
        // Text protocol: DDL, and the template may hold several statements.
        let ddl = sqlx::Executor::execute(&mut *conn, sql.as_str()).await;
        let released = sqlx::query_scalar::<_, Option<i64>>("SELECT RELEASE_LOCK(?)")
            .bind(&lock)
            .fetch_one(&mut *conn)
            .await;
        if released.is_err() {
            // Never hand a connection that may still hold the lock back to the pool.
            conn.close_on_drop();
        }
        ddl?;
        Ok(())
    }

    fn migration_sql(table: &TableName) -> String {
        MIGRATION.replace("{table}", table.as_str())
    }

    async fn insert<'c>(
        conn: &'c mut MySqlConnection,
        table: &'c TableName,
        row: &'c NewRow<'c>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {table} (event_id, service, event_type, event_version, event_key, payload, \
                                  max_retries, next_attempt_at, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))"
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
        let lease_us = micros(lease);
        with_retry(|| claim_once(pool, table, service, limit, lease_us, token)).await
    }

    async fn mark_published<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        ids: &'p [i64],
        token: i64,
    ) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE {table} SET status = 1, published_at = UTC_TIMESTAMP(6), locked_until = NULL, \
                    lease_token = 0, updated_at = UTC_TIMESTAMP(6) \
              WHERE id IN ({{ids}}) AND lease_token = ? AND status = 0"
        );
        update_ids(pool, &sql, &[], ids, &[Param::Int(token)]).await
    }

    async fn release<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        ids: &'p [i64],
        token: i64,
        delay: Duration,
        error: &'p str,
    ) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE {table} SET next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                    locked_until = NULL, lease_token = 0, last_error = ?, updated_at = UTC_TIMESTAMP(6) \
              WHERE id IN ({{ids}}) AND lease_token = ? AND status = 0"
        );
        let before = [
            Param::Int(micros(delay)),
            Param::Text(super::truncate_error(error)),
        ];
        update_ids(pool, &sql, &before, ids, &[Param::Int(token)]).await
    }

    async fn mark_dead_leased<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        id: i64,
        token: i64,
        reason: &'p str,
    ) -> Result<bool, sqlx::Error> {
        let sql = format!(
            "UPDATE {table} SET status = 3, attempts = attempts + 1, last_error = ?, \
                    dead_at = UTC_TIMESTAMP(6), locked_until = NULL, lease_token = 0, \
                    updated_at = UTC_TIMESTAMP(6) \
              WHERE id = ? AND lease_token = ? AND status = 0"
        );
        let reason = super::truncate_error(reason);
        let done = with_retry(|| {
            sqlx::query(&sql)
                .bind(reason)
                .bind(id)
                .bind(token)
                .execute(pool)
        })
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn lock_for_consume<'c>(
        conn: &'c mut MySqlConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_id: Uuid,
    ) -> Result<Option<RowState>, sqlx::Error> {
        // A plain read first: a locking read of a row that does not exist would lock a
        // gap under REPEATABLE READ and deadlock with the insert that creates it.
        let id: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM {table} WHERE event_id = ? AND service = ?"
        ))
        .bind(event_id)
        .bind(service.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        let Some(id) = id else {
            return Ok(None);
        };
        let row = sqlx::query(&format!(
            "SELECT {} FROM {table} WHERE id = ? AND service = ? FOR UPDATE",
            row_state_columns()
        ))
        .bind(id)
        .bind(service.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        row.as_ref().map(row_state).transpose()
    }

    async fn lock_batch_for_consume<'c>(
        conn: &'c mut MySqlConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_ids: &'c [Uuid],
    ) -> Result<Vec<(Uuid, RowState)>, sqlx::Error> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        // A plain read first (see `lock_for_consume`), then the locks by primary key.
        let sql = format!(
            "SELECT id FROM {table} WHERE service = ? AND event_id IN ({})",
            placeholders(event_ids.len())
        );
        let mut q = sqlx::query_scalar::<_, i64>(&sql).bind(service.as_str());
        for e in event_ids {
            q = q.bind(*e);
        }
        let ids = q.fetch_all(&mut *conn).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT event_id, {} FROM {table} WHERE id IN ({}) FOR UPDATE SKIP LOCKED",
            row_state_columns(),
            placeholders(ids.len())
        );
        let mut q = sqlx::query(&sql);
        for id in &ids {
            q = q.bind(*id);
        }
        let rows = q.fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("event_id")?, row_state(r)?)))
            .collect()
    }

    async fn has_open_predecessor<'c>(
        conn: &'c mut MySqlConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
        id: i64,
    ) -> Result<bool, sqlx::Error> {
        let found: Option<i32> = sqlx::query_scalar(&format!(
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
        conn: &'c mut MySqlConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        keys: &'c [String],
        below: i64,
        limit: u32,
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT event_key, id FROM {table} \
              WHERE service = ? AND event_key IN ({}) AND status IN (0, 1) AND id < ? LIMIT ?",
            placeholders(keys.len())
        );
        let mut q = sqlx::query(&sql).bind(service.as_str());
        for k in keys {
            q = q.bind(k);
        }
        let rows = q.bind(below).bind(limit).fetch_all(conn).await?;
        rows.iter()
            .map(|r| {
                let key = opt_text(r, "event_key")?.unwrap_or_default();
                Ok((key, r.try_get("id")?))
            })
            .collect()
    }

    async fn mark_consumed<'c>(
        conn: &'c mut MySqlConnection,
        table: &'c TableName,
        ids: &'c [i64],
    ) -> Result<(), sqlx::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE {table} SET status = 2, consumed_at = UTC_TIMESTAMP(6), locked_until = NULL, \
                    lease_token = 0, updated_at = UTC_TIMESTAMP(6) \
              WHERE id IN ({}) AND status IN (0, 1)",
            placeholders(ids.len())
        );
        let mut q = sqlx::query(&sql);
        for id in ids {
            q = q.bind(*id);
        }
        q.execute(conn).await?;
        Ok(())
    }

    async fn defer<'c>(
        conn: &'c mut MySqlConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
        id: i64,
        delay: Duration,
    ) -> Result<u64, sqlx::Error> {
        let republished = sqlx::query(&format!(
            "UPDATE {table} SET status = 0, next_attempt_at = UTC_TIMESTAMP(6), locked_until = NULL, \
                    lease_token = 0, updated_at = UTC_TIMESTAMP(6) \
              WHERE service = ? AND event_key = ? AND status = 1 AND id < ?"
        ))
        .bind(service.as_str())
        .bind(key)
        .bind(id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        sqlx::query(&format!(
            "UPDATE {table} SET status = 0, next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, \
                    locked_until = NULL, lease_token = 0, updated_at = UTC_TIMESTAMP(6) \
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
        // MySQL cannot DELETE with a LIMIT'd subquery on the same table; DELETE ... ORDER
        // BY id LIMIT over the (service, status, id) index does the same in one statement.
        let sql = format!(
            "DELETE FROM {table} WHERE service = ? AND ((status = 2 AND consumed_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND) \
                OR (? IS NOT NULL AND status = 3 AND dead_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND)) \
              ORDER BY id LIMIT ?"
        );
        let consumed = micros(consumed_age);
        let dead = dead_age.map(micros);
        let done = with_retry(|| {
            sqlx::query(&sql)
                .bind(service.as_str())
                .bind(consumed)
                .bind(dead)
                .bind(dead.unwrap_or(0))
                .bind(i64::from(limit))
                .execute(pool)
        })
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
        let sql = format!(
            "UPDATE {table} SET status = 0, attempts = attempts + 1, \
                    next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, last_error = ?, \
                    locked_until = NULL, lease_token = 0, updated_at = UTC_TIMESTAMP(6) \
              WHERE id = ? AND attempts = ? AND status IN (0, 1)"
        );
        let delay = micros(delay);
        let error = super::truncate_error(error);
        let done = with_retry(|| {
            sqlx::query(&sql)
                .bind(delay)
                .bind(error)
                .bind(id)
                .bind(fence.0)
                .execute(pool)
        })
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
        let sql = format!(
            "UPDATE {table} SET status = 3, attempts = attempts + 1, last_error = ?, \
                    dead_at = UTC_TIMESTAMP(6), locked_until = NULL, lease_token = 0, \
                    updated_at = UTC_TIMESTAMP(6) \
              WHERE id = ? AND attempts = ? AND status IN (0, 1)"
        );
        let reason = super::truncate_error(reason);
        let done = with_retry(|| {
            sqlx::query(&sql)
                .bind(reason)
                .bind(id)
                .bind(fence.0)
                .execute(pool)
        })
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
        let sql = format!(
            "UPDATE {table} SET status = 0, next_attempt_at = UTC_TIMESTAMP(6), locked_until = NULL, \
                    lease_token = 0, updated_at = UTC_TIMESTAMP(6) \
              WHERE service = ? AND status = 1 AND published_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND \
                AND (? IS NULL OR published_at >= UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND) \
              ORDER BY id LIMIT ?"
        );
        let older = micros(older_than);
        let newer = newer_than.map(micros);
        let done = with_retry(|| {
            sqlx::query(&sql)
                .bind(service.as_str())
                .bind(older)
                .bind(newer)
                .bind(newer)
                .bind(i64::from(limit))
                .execute(pool)
        })
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
        let sql = format!(
            "UPDATE {table} SET status = 0, attempts = 0, next_attempt_at = UTC_TIMESTAMP(6), dead_at = NULL, \
                    locked_until = NULL, lease_token = 0, updated_at = UTC_TIMESTAMP(6) \
              WHERE service = ? AND status = 3 AND (? IS NULL OR event_id = ?) ORDER BY id LIMIT ?"
        );
        let done = with_retry(|| {
            sqlx::query(&sql)
                .bind(service.as_str())
                .bind(event_id)
                .bind(event_id)
                .bind(i64::from(limit))
                .execute(pool)
        })
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
        sqlx::query_scalar("SELECT UTC_TIMESTAMP(6)")
            .fetch_one(pool)
            .await
    }

    async fn execute_portable<'c>(
        conn: &'c mut MySqlConnection,
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

    #[test]
    fn placeholder_lists() {
        assert_eq!(placeholders(0), "");
        assert_eq!(placeholders(1), "?");
        assert_eq!(placeholders(3), "?, ?, ?");
    }

    #[test]
    fn delays_are_clamped() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), MAX_DELAY_MICROS);
    }

    #[test]
    fn lock_names_fit_get_lock() {
        let long = "t".repeat(crate::names::MAX_TABLE_LEN);
        assert!(migrate_lock_name(&TableName::new(&long).unwrap()).len() <= LOCK_NAME_MAX);
        assert_eq!(
            migrate_lock_name(&TableName::new("orders_outbox").unwrap()),
            "outbox_migrate:orders_outbox"
        );
    }

    #[test]
    fn migration_sql_names_the_table() {
        let sql = <MySql as Backend>::migration_sql(&TableName::new("orders_outbox").unwrap());
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS orders_outbox ("));
        assert!(!sql.contains("{table}"));
    }
}
