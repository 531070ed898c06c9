//! PostgreSQL: row locks with `FOR NO KEY UPDATE SKIP LOCKED`, claims as
//! `UPDATE … FROM (SELECT … SKIP LOCKED) RETURNING`, times from `now()`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Pool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::route::{ServiceName, TableName};

use super::{
    AttemptsFence, Backend, ClaimedRow, NewRow, OutboxRow, RowState, SqlValue, Status,
    StatusCounts, WakeStream,
};

const MIGRATION: &str = include_str!("../../migrations/postgres/outbox_table.sql");

/// Serialises concurrent `migrate` calls (CREATE … IF NOT EXISTS races on the catalog).
const MIGRATE_LOCK: i64 = 0x6f7574626f78; // "outbox"

impl super::sealed::Sealed for Postgres {}

fn status(v: i16) -> Result<Status, sqlx::Error> {
    Status::from_i16(v)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown outbox status {v}").into()))
}

/// A consumer's view of a row ([`super::ROW_STATE_COLUMNS`]).
fn row_state(r: &PgRow) -> Result<RowState, sqlx::Error> {
    Ok(RowState {
        id: r.try_get("id")?,
        status: status(r.try_get("status")?)?,
        attempts: r.try_get("attempts")?,
        max_retries: r.try_get("max_retries")?,
        key: r.try_get("event_key")?,
        event_type: r.try_get("event_type")?,
        version: r.try_get("event_version")?,
        payload: r.try_get("payload")?,
        due: r.try_get::<i32, _>("due")? == 1,
    })
}

fn row_state_columns() -> String {
    super::ROW_STATE_COLUMNS.replace("{now}", "now()")
}

/// Seconds for `make_interval`, capped at 100 years so a huge `Duration` cannot make
/// the statement fail.
fn secs(d: Duration) -> f64 {
    d.as_secs_f64().min(100.0 * 365.0 * 86_400.0)
}

const ROW_COLUMNS: &str =
    "id, event_id, service, event_type, event_version, event_key, payload, status, \
     attempts, max_retries, next_attempt_at, last_error, created_at, updated_at, published_at, \
     consumed_at, dead_at";

fn outbox_row(r: &PgRow) -> Result<OutboxRow, sqlx::Error> {
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
        next_attempt_at: r.try_get("next_attempt_at")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        published_at: r.try_get("published_at")?,
        consumed_at: r.try_get("consumed_at")?,
        dead_at: r.try_get("dead_at")?,
    })
}

/// The relay's claim statement on PostgreSQL, for `table`: heads of key among the
/// due, unleased rows of one service, in due order (`next_attempt_at`, then id; the
/// migration's `{table}_due_idx`), leased to a token; with `windowed`, only among the
/// first `$5` of those rows (the relay's default, [`Backend::claim_window`]).
///
/// Parameters: `$1` service (text), `$2` limit (bigint), `$3` lease token (bigint),
/// `$4` lease in seconds (double precision), `$5` window (bigint, only if `windowed`).
/// It returns the claimed rows. Public so operators can `EXPLAIN` it against their
/// own table; the relay runs it under a per-service advisory lock (claims take turns).
/// `table` must already have been checked against the name grammar.
pub fn claim_sql(table: &TableName, windowed: bool) -> String {
    // The bound is an InitPlan: the due index is walked up to the window's last row,
    // compared as (next_attempt_at, id) so rows that share a due time (one
    // transaction's rows share `now()`) are cut at the window's last id too.
    let bound = if windowed {
        format!(
            "AND (o.next_attempt_at, o.id) <= (SELECT win.next_attempt_at, win.id FROM ( \
                           SELECT w.next_attempt_at, w.id FROM {table} w \
                            WHERE w.service = $1 AND w.status = 0 AND w.next_attempt_at <= now() \
                              AND (w.locked_until IS NULL OR w.locked_until <= now()) \
                            ORDER BY w.next_attempt_at, w.id LIMIT $5) win \
                          ORDER BY win.next_attempt_at DESC, win.id DESC LIMIT 1)"
        )
    } else {
        String::new()
    };
    format!(
        "UPDATE {table} AS t \
            SET lease_token = $3, locked_until = now() + make_interval(secs => $4), updated_at = now() \
           FROM (SELECT o.id FROM {table} o \
                  WHERE o.service = $1 AND o.status = 0 AND o.next_attempt_at <= now() \
                    AND (o.locked_until IS NULL OR o.locked_until <= now()) {bound} \
                    AND (o.event_key IS NULL OR NOT EXISTS ( \
                          SELECT 1 FROM {table} p \
                           WHERE p.service = o.service AND p.event_key = o.event_key \
                             AND p.status = 0 AND p.id < o.id)) \
                  ORDER BY o.next_attempt_at, o.id \
                  LIMIT $2 \
                  FOR NO KEY UPDATE SKIP LOCKED) AS due \
          WHERE t.id = due.id \
         RETURNING t.id, t.event_id, t.event_type, t.event_version, t.event_key, t.payload, t.attempts, t.created_at"
    )
}

/// Takes `service`'s claim turn on `table` for the rest of the transaction on `conn`:
/// the relays of that service claim one at a time under this lock (a
/// transaction-scoped advisory lock on
/// `hashtextextended('outbox-claim:<table>:<service>', 0)`), so an operator's
/// transaction that takes it holds them off until it ends. Other services do not wait.
pub async fn take_claim_turn(
    conn: &mut PgConnection,
    table: &TableName,
    service: &ServiceName,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(claim_lock_key(table, service))
        .execute(conn)
        .await?;
    Ok(())
}

fn claim_lock_key(table: &TableName, service: &ServiceName) -> String {
    format!("outbox-claim:{table}:{service}")
}

/// How long a relay's claim transaction may sit idle (its process paused: SIGSTOP, a
/// frozen VM, a debugger) before PostgreSQL ends its session. It holds the service's
/// claim turn, which every other relay of the service waits for; a healthy claim goes
/// from statement to statement in milliseconds.
const CLAIM_IDLE_TIMEOUT: &str = "5s";

/// Runs [`claim_sql`] (with a window if `window` is given) in its own short
/// transaction, after [`take_claim_turn`].
async fn claim_heads(
    pool: &Pool<Postgres>,
    table: &TableName,
    service: &ServiceName,
    limit: u32,
    window: Option<u32>,
    lease: Duration,
    token: i64,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let sql = claim_sql(table, window.is_some());
    let mut query = sqlx::query(&sql)
        .bind(service.as_str())
        .bind(i64::from(limit))
        .bind(token)
        .bind(secs(lease));
    if let Some(window) = window {
        query = query.bind(i64::from(window));
    }
    // Claims of one service take turns (a transaction-scoped advisory lock): concurrent
    // claims would walk the same heads of key and lock rows the other is about to
    // lease, which made extra relays slower than one on few keys. Each claim's
    // statement then sees the previous claim's leases committed.
    let mut tx = pool.begin().await?;
    // The turn, and a bound on how long a paused relay can hold it (one statement).
    sqlx::query(
        "SELECT set_config('idle_in_transaction_session_timeout', $2, true), \
                pg_advisory_xact_lock(hashtextextended($1, 0))",
    )
    .bind(claim_lock_key(table, service))
    .bind(CLAIM_IDLE_TIMEOUT)
    .execute(&mut *tx)
    .await?;
    let rows = query.fetch_all(&mut *tx).await?;
    tx.commit().await?;
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
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    claimed.sort_by_key(|r| r.id);
    Ok(claimed)
}

impl Backend for Postgres {
    const BACKEND_NAME: &'static str = "postgres";
    const BACKEND_NAMES: &'static [&'static str] = &["postgres"];
    const HAS_NOTIFY: bool = true;
    const CONCURRENT_RELAYS: bool = true;
    const BOUNDED_CLAIM: bool = true;

    async fn begin(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        pool.begin().await
    }

    async fn migrate(pool: &Pool<Self>, table: &TableName) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATE_LOCK)
            .execute(&mut *tx)
            .await?;
        let sql = Self::migration_sql(table);
        sqlx::Executor::execute(&mut *tx, sql.as_str()).await?;
        tx.commit().await
    }

    fn migration_sql(table: &TableName) -> String {
        MIGRATION.replace("{table}", table.as_str())
    }

    async fn insert<'c>(
        conn: &'c mut PgConnection,
        table: &'c TableName,
        row: &'c NewRow<'c>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {table} (event_id, service, event_type, event_version, event_key, payload, max_retries) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)"
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
        claim_heads(pool, table, service, limit, None, lease, token).await
    }

    async fn claim_window<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
        window: u32,
        lease: Duration,
        token: i64,
    ) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        claim_heads(pool, table, service, limit, Some(window), lease, token).await
    }

    async fn mark_published<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        ids: &'p [i64],
        token: i64,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {table} SET status = 1, published_at = now(), locked_until = NULL, lease_token = 0, \
                    updated_at = now() \
              WHERE id = ANY($1) AND lease_token = $2 AND status = 0"
        ))
        .bind(ids)
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
        let done = sqlx::query(&format!(
            "UPDATE {table} SET next_attempt_at = now() + make_interval(secs => $3), locked_until = NULL, \
                    lease_token = 0, last_error = $4, updated_at = now() \
              WHERE id = ANY($1) AND lease_token = $2 AND status = 0"
        ))
        .bind(ids)
        .bind(token)
        .bind(secs(delay))
        .bind(super::truncate_error(error))
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
            "UPDATE {table} SET status = 3, attempts = attempts + 1, last_error = $3, dead_at = now(), \
                    locked_until = NULL, lease_token = 0, updated_at = now() \
              WHERE id = $1 AND lease_token = $2 AND status = 0"
        ))
        .bind(id)
        .bind(token)
        .bind(super::truncate_error(reason))
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn lock_for_consume<'c>(
        conn: &'c mut PgConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_id: Uuid,
    ) -> Result<Option<RowState>, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM {table} WHERE event_id = $1 AND service = $2 FOR UPDATE",
            row_state_columns()
        ))
        .bind(event_id)
        .bind(service.as_str())
        .fetch_optional(conn)
        .await?;
        row.as_ref().map(row_state).transpose()
    }

    async fn lock_batch_for_consume<'c>(
        conn: &'c mut PgConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        event_ids: &'c [Uuid],
    ) -> Result<Vec<(Uuid, RowState)>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT event_id, {} FROM {table} \
              WHERE event_id = ANY($1) AND service = $2 FOR UPDATE SKIP LOCKED",
            row_state_columns()
        ))
        .bind(event_ids)
        .bind(service.as_str())
        .fetch_all(conn)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("event_id")?, row_state(r)?)))
            .collect()
    }

    async fn has_open_predecessor<'c>(
        conn: &'c mut PgConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
        id: i64,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {table} \
              WHERE service = $1 AND event_key = $2 AND id < $3 AND status IN (0, 1))"
        ))
        .bind(service.as_str())
        .bind(key)
        .bind(id)
        .fetch_one(conn)
        .await
    }

    async fn open_rows_of_keys<'c>(
        conn: &'c mut PgConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        keys: &'c [String],
        below: i64,
        limit: u32,
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT event_key, id FROM {table} \
              WHERE service = $1 AND event_key = ANY($2) AND id < $3 AND status IN (0, 1) \
              LIMIT $4"
        ))
        .bind(service.as_str())
        .bind(keys)
        .bind(below)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await
    }

    async fn mark_consumed<'c>(
        conn: &'c mut PgConnection,
        table: &'c TableName,
        ids: &'c [i64],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {table} SET status = 2, consumed_at = now(), locked_until = NULL, lease_token = 0, \
                    updated_at = now() \
              WHERE id = ANY($1) AND status IN (0, 1)"
        ))
        .bind(ids)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn defer<'c>(
        conn: &'c mut PgConnection,
        table: &'c TableName,
        service: &'c ServiceName,
        key: &'c str,
        id: i64,
        delay: Duration,
    ) -> Result<u64, sqlx::Error> {
        let republished = sqlx::query(&format!(
            "UPDATE {table} SET status = 0, next_attempt_at = now(), locked_until = NULL, lease_token = 0, \
                    updated_at = now() \
              WHERE service = $1 AND event_key = $2 AND id < $3 AND status = 1"
        ))
        .bind(service.as_str())
        .bind(key)
        .bind(id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        sqlx::query(&format!(
            "UPDATE {table} SET status = 0, next_attempt_at = now() + make_interval(secs => $2), \
                    locked_until = NULL, lease_token = 0, updated_at = now() \
              WHERE id = $1 AND status IN (0, 1)"
        ))
        .bind(id)
        .bind(secs(delay))
        .execute(conn)
        .await?;
        Ok(republished)
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
            "UPDATE {table} SET status = 0, attempts = attempts + 1, \
                    next_attempt_at = now() + make_interval(secs => $3), last_error = $4, \
                    locked_until = NULL, lease_token = 0, updated_at = now() \
              WHERE id = $1 AND attempts = $2 AND status IN (0, 1)"
        ))
        .bind(id)
        .bind(fence.0)
        .bind(secs(delay))
        .bind(super::truncate_error(error))
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
            "UPDATE {table} SET status = 3, attempts = attempts + 1, last_error = $3, dead_at = now(), \
                    locked_until = NULL, lease_token = 0, updated_at = now() \
              WHERE id = $1 AND attempts = $2 AND status IN (0, 1)"
        ))
        .bind(id)
        .bind(fence.0)
        .bind(super::truncate_error(reason))
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
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
              WHERE service = $1 AND ((status = 2 AND consumed_at < now() - make_interval(secs => $2)) \
                 OR ($3::float8 IS NOT NULL AND status = 3 AND dead_at < now() - make_interval(secs => $3))) \
              LIMIT $4) AND status IN (2, 3)"
        ))
        .bind(service.as_str())
        .bind(secs(consumed_age))
        .bind(dead_age.map(secs))
        .bind(i64::from(limit))
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn redeliver_stale<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        older_than: Duration,
        newer_than: Option<Duration>,
        limit: u32,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {table} SET status = 0, next_attempt_at = now(), locked_until = NULL, lease_token = 0, \
                    updated_at = now() \
              WHERE id IN (SELECT id FROM {table} WHERE service = $1 AND status = 1 \
                             AND published_at < now() - make_interval(secs => $2) \
                             AND ($4::float8 IS NULL OR published_at >= now() - make_interval(secs => $4)) \
                             ORDER BY id LIMIT $3) \
                AND status = 1"
        ))
        .bind(service.as_str())
        .bind(secs(older_than))
        .bind(i64::from(limit))
        .bind(newer_than.map(secs))
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
            "SELECT {ROW_COLUMNS} FROM {table} WHERE service = $1 AND status = 3 ORDER BY id LIMIT $2"
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
            "UPDATE {table} SET status = 0, attempts = 0, next_attempt_at = now(), dead_at = NULL, \
                    locked_until = NULL, lease_token = 0, updated_at = now() \
              WHERE id IN (SELECT id FROM {table} WHERE service = $1 AND status = 3 \
                             AND ($2::uuid IS NULL OR event_id = $2) ORDER BY id LIMIT $3) \
                AND status = 3"
        ))
        .bind(service.as_str())
        .bind(event_id)
        .bind(i64::from(limit))
        .execute(pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn fetch<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        event_id: Uuid,
    ) -> Result<Option<OutboxRow>, sqlx::Error> {
        sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM {table} WHERE event_id = $1"
        ))
        .bind(event_id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(outbox_row)
        .transpose()
    }

    async fn fetch_all<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM {table} WHERE service = $1 ORDER BY id"
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
            "SELECT status, count(*) FROM {table} WHERE service = $1 GROUP BY status"
        ))
        .bind(service.as_str())
        .fetch_all(pool)
        .await?;
        Ok(super::counts_from(rows))
    }

    async fn now(pool: &Pool<Self>) -> Result<DateTime<Utc>, sqlx::Error> {
        sqlx::query_scalar("SELECT now()").fetch_one(pool).await
    }

    async fn execute_portable<'c>(
        conn: &'c mut PgConnection,
        sql: &'c str,
        args: &'c [SqlValue],
    ) -> Result<u64, sqlx::Error> {
        let mut numbered = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                numbered.push('$');
                numbered.push_str(&n.to_string());
            } else {
                numbered.push(c);
            }
        }
        let mut q = sqlx::query(&numbered);
        for a in args {
            q = match a {
                SqlValue::Null => q.bind(None::<String>),
                SqlValue::Int(i) => q.bind(*i),
                SqlValue::Text(t) => q.bind(t.as_str()),
            };
        }
        Ok(q.execute(conn).await?.rows_affected())
    }

    async fn notify<'p>(
        pool: &'p Pool<Self>,
        channel: &'p str,
        payload: &'p str,
    ) -> Result<(), sqlx::Error> {
        // A hint, not data: its own tiny transaction need not wait for a WAL flush, so
        // a wake-up never costs the publisher an extra fsync.
        sqlx::query("SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn listen<'p>(
        pool: &'p Pool<Self>,
        channel: &'p str,
    ) -> Result<Option<WakeStream>, sqlx::Error> {
        use futures::StreamExt;
        // A pool of one connection of its own (the listener reconnects through it), so
        // LISTEN never holds one of the application's connections.
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with((*pool.connect_options()).clone());
        let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
        listener.listen(channel).await?;
        Ok(Some(
            listener
                .into_stream()
                .map(|n| n.map(|n| n.payload().to_owned()))
                .boxed(),
        ))
    }
}
