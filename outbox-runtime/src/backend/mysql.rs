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

use sqlx::mysql::MySqlDatabaseError;
use sqlx::{Connection, MySql, Pool};
use uuid::Uuid;

use crate::route::{ServiceName, TableName};

use super::ops::{micros, store_ops, Dialect, Query};
use super::rows::claimed_rows;
use super::statements::{Bounded, HeadOfKey, SqlDialect, Statements};
use super::{Backend, ClaimScope, ClaimedRow};

/// The claim, a short READ COMMITTED transaction of three statements: the ids (locked,
/// skipping rows other claims hold), the lease by primary key, and the read-back of
/// the leased rows (no `UPDATE … RETURNING`).
const CLAIM_IDS: usize = 0;
const CLAIM_LEASE: usize = 1;
const CLAIM_READ: usize = 2;
/// The windowed claim ([`ClaimScope::Window`]) first reads the id of the window's
/// last row, then claims up to it: a bound passed as a parameter is a range the
/// optimizer walks, while the same bound as a subquery is only a filter on a walk of
/// every pending row (measured on MariaDB, 100,000 pending rows on 1,000 keys whose
/// heads another relay holds: 620-790 ms unbounded, 210-340 ms with the subquery,
/// 20-40 ms with the parameter).
const WINDOW_END: usize = 3;
const CLAIM_IDS_UPTO: usize = 4;
/// The claim past the window ([`ClaimScope::PastWindow`]): after its last row.
const CLAIM_IDS_PAST: usize = 5;

pub(crate) const SQL: SqlDialect = SqlDialect {
    name: "mysql",
    numbered: false,
    now: "UTC_TIMESTAMP(6)",
    interval: "INTERVAL {p} MICROSECOND",
    nullable_delay: "{p}",
    nullable_uuid: "{p}",
    nullable_text: "{p}",
    in_ids: "IN ({list})",
    in_list: "IN ({list})",
    for_update: " FOR UPDATE",
    skip_locked: " FOR UPDATE SKIP LOCKED",
    head_of_key: HeadOfKey::FirstId,
    bounded: Bounded::OrderLimit,
    skip_duplicate: ("INSERT IGNORE INTO", ""),
    // Assignments run left to right: `raised_at` compares with the old id.
    raise_watermark: "INSERT INTO {t}_seen (service, event_key, last_event_id, raised_at) \
        VALUES ({p}, {p}, {p}, {now}) ON DUPLICATE KEY UPDATE \
        raised_at = IF(VALUES(last_event_id) > last_event_id, VALUES(raised_at), raised_at), \
        last_event_id = GREATEST(last_event_id, VALUES(last_event_id))",
    own: &[
        "SELECT o.id FROM {t} o WHERE {claimable} ORDER BY o.id LIMIT {p} FOR UPDATE SKIP LOCKED",
        "UPDATE {t} SET {lease} WHERE id {in_ids} AND status = {pending}",
        "SELECT {claimed} FROM {t} WHERE id {in_ids} AND lease_token = {p} ORDER BY id",
        "SELECT MAX(win.id) FROM (SELECT w.id FROM {t} w WHERE w.service = {p} \
            AND w.status = {pending} AND w.next_attempt_at <= {now} \
            AND (w.locked_until IS NULL OR w.locked_until <= {now}) \
            ORDER BY w.id LIMIT {p}) win",
        "SELECT o.id FROM {t} o WHERE {claimable} AND o.id <= {p} ORDER BY o.id LIMIT {p} \
            FOR UPDATE SKIP LOCKED",
        "SELECT o.id FROM {t} o WHERE {claimable} AND o.id > {p} ORDER BY o.id LIMIT {p} \
            FOR UPDATE SKIP LOCKED",
    ],
};

/// How often a deadlocked or timed-out statement is tried again before the error is
/// returned.
const MAX_RETRIES: u32 = 5;

/// Most ids bound into one `IN (…)` list; longer lists are split.
const IN_CHUNK: usize = 1000;

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

/// Opens the claim transaction with a 5 s bound on how long it may sit idle (its
/// process paused: SIGSTOP, a frozen VM, a debugger) before the server closes its
/// connection and rolls it back. Until then every other relay's claim skips the rows it
/// locked (`SKIP LOCKED`), so a paused relay would hold them unpublished for as long as
/// it is paused; a healthy claim goes from statement to statement in milliseconds.
/// MySQL has no transaction-scoped idle timeout (PostgreSQL's
/// `idle_in_transaction_session_timeout`, see the PostgreSQL backend), so the claim
/// lowers the session's `wait_timeout`, which bounds every wait for the client's next
/// command, and keeps the session's own value (a pool's `after_connect` may have set
/// one) to restore.
const CLAIM_BEGIN: &str = "SET @outbox_wait_timeout = @@SESSION.wait_timeout, \
    SESSION wait_timeout = 5; \
    SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";

/// Puts the session's `wait_timeout` back once the claim transaction has ended.
const CLAIM_END: &str = "SET SESSION wait_timeout = @outbox_wait_timeout";

/// One claim attempt (see [`CLAIM_IDS`]) of the rows of `scope`. The transaction runs with the idle
/// bound of [`CLAIM_BEGIN`], lifted on its connection afterwards.
///
/// # Cancel safety
/// Dropped mid-claim, the transaction is rolled back when its connection is next used,
/// but the connection goes back to the pool with the short `wait_timeout`: the server
/// may close it while it idles there, and the pool replaces it (it is tested before
/// it is handed out).
async fn claim_once(
    pool: &Pool<MySql>,
    s: &Statements,
    service: &ServiceName,
    limit: u32,
    scope: ClaimScope,
    lease_us: i64,
    token: i64,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    // The transaction, in a block of its own so that the restore below runs whatever
    // it returned.
    let claimed: Result<Vec<ClaimedRow>, sqlx::Error> = async {
        let mut tx = Connection::begin_with(&mut *conn, CLAIM_BEGIN).await?;
        let ids: Vec<i64> = match scope {
            ClaimScope::All => {
                sqlx::query_scalar(s.own[CLAIM_IDS].text())
                    .bind(service.as_str())
                    .bind(i64::from(limit))
                    .fetch_all(&mut *tx)
                    .await?
            }
            ClaimScope::Window(window) | ClaimScope::PastWindow(window) => {
                let end: Option<i64> = sqlx::query_scalar(s.own[WINDOW_END].text())
                    .bind(service.as_str())
                    .bind(i64::from(window))
                    .fetch_one(&mut *tx)
                    .await?;
                let claim = match scope {
                    ClaimScope::PastWindow(_) => CLAIM_IDS_PAST,
                    _ => CLAIM_IDS_UPTO,
                };
                match end {
                    Some(end) => {
                        sqlx::query_scalar(s.own[claim].text())
                            .bind(service.as_str())
                            .bind(end)
                            .bind(i64::from(limit))
                            .fetch_all(&mut *tx)
                            .await?
                    }
                    None => Vec::new(),
                }
            }
        };
        if ids.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let sql = s.own[CLAIM_LEASE].get(ids.len());
        let lease = sqlx::query(&sql).bind(token).bind(lease_us);
        MySql::bind_ids(lease, &ids).execute(&mut *tx).await?;
        // Tests freeze a relay here, holding the claimed rows' locks.
        failpoint!("store.claim_locked");
        let sql = s.own[CLAIM_READ].get(ids.len());
        let rows = MySql::bind_ids(sqlx::query(&sql), &ids)
            .bind(token)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        claimed_rows(&rows)
    }
    .await;
    let restored = sqlx::query(CLAIM_END).execute(&mut *conn).await;
    if restored.is_err() {
        // Never hand a connection with the short idle bound back to the pool.
        conn.close_on_drop();
    }
    let rows = claimed?;
    restored?;
    Ok(rows)
}

impl Dialect for MySql {
    const SQL: &'static SqlDialect = &SQL;
    /// `SET TRANSACTION` applies to the next transaction of the connection only, so
    /// pooled connections keep their defaults.
    const BEGIN: &'static str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION";
    const MIGRATION: &'static str = include_str!("../../migrations/mysql/outbox_table.sql");
    const INBOX_MIGRATION: &'static str = include_str!("../../migrations/mysql/inbox_seen.sql");
    const ID_CHUNK: usize = IN_CHUNK;
    const LIST_CHUNK: usize = usize::MAX;
    const FIND_BEFORE_LOCK: bool = true;

    type Delay = i64;

    fn delay(d: Duration) -> i64 {
        micros(d)
    }

    fn bind_ids<'q>(q: Query<'q, Self>, ids: &'q [i64]) -> Query<'q, Self> {
        ids.iter().fold(q, |q, id| q.bind(*id))
    }

    fn bind_uuids<'q>(q: Query<'q, Self>, ids: &'q [Uuid]) -> Query<'q, Self> {
        ids.iter().fold(q, |q, id| q.bind(*id))
    }

    fn retry<T, F, Fut>(op: F) -> impl Future<Output = Result<T, sqlx::Error>> + Send
    where
        T: Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, sqlx::Error>> + Send,
    {
        with_retry(op)
    }
}

impl Backend for MySql {
    const BACKEND_NAME: &'static str = "mysql";
    const BACKEND_NAMES: &'static [&'static str] = &["mysql"];
    const HAS_NOTIFY: bool = false;
    const CONCURRENT_RELAYS: bool = true;

    store_ops!();

    async fn migrate_ddl(
        pool: &Pool<Self>,
        table: &TableName,
        sql: String,
    ) -> Result<(), sqlx::Error> {
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
        let ddl = async {
            super::upgrade::add_missing_columns::<Self>(
                &mut conn,
                table,
                "SELECT CAST(column_name AS CHAR) FROM information_schema.columns \
                 WHERE table_schema = DATABASE() AND table_name = ?",
                |c| c.mysql,
            )
            .await?;
            // Text protocol: DDL, and the template may hold several statements.
            sqlx::Executor::execute(&mut *conn, sql.as_str()).await
        }
        .await;
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

    async fn claim<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
        lease: Duration,
        token: i64,
    ) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        claim_scoped(pool, table, service, limit, ClaimScope::All, lease, token).await
    }

    const BOUNDED_CLAIM: bool = true;

    async fn claim_in<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
        scope: ClaimScope,
        lease: Duration,
        token: i64,
    ) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        claim_scoped(pool, table, service, limit, scope, lease, token).await
    }
}

/// A claim of the rows of `scope`, retried after a deadlock or lock-wait timeout.
async fn claim_scoped(
    pool: &Pool<MySql>,
    table: &TableName,
    service: &ServiceName,
    limit: u32,
    scope: ClaimScope,
    lease: Duration,
    token: i64,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let s = MySql::statements(table);
    let lease_us = micros(lease);
    with_retry(|| claim_once(pool, &s, service, limit, scope, lease_us, token)).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
