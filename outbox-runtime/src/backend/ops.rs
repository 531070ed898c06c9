//! The store's operations, written once: [`Dialect`] is what a backend tells them (its
//! [`SqlDialect`], how it binds lists and delays, whether it retries), and
//! [`store_ops!`] expands the [`Backend`] methods that every database runs the same
//! way inside each backend's `impl Backend`. The methods are expanded rather than
//! generic so that each backend's binds and futures are checked on its concrete types
//! (a generic sqlx body needs a bound per bound type, per lifetime).
//!
//! A backend file writes by hand only what truly differs: its claim, its migration
//! and its wake-ups.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::statements::{self, SqlDialect, Statements};
use super::Backend;
use crate::route::TableName;

/// A query with the database's own arguments.
pub(crate) type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>;

/// What the shared operations need to know of one database.
pub(crate) trait Dialect: Backend {
    /// Its statements' spelling.
    const SQL: &'static SqlDialect;
    /// The statement that opens a write transaction ([`Backend::begin`]).
    const BEGIN: &'static str;
    /// The DDL template, `{table}` to be replaced.
    const MIGRATION: &'static str;
    /// The inbox's extra DDL template (`<table>_seen`), run after [`MIGRATION`](Self::MIGRATION).
    const INBOX_MIGRATION: &'static str;
    /// Most row ids bound to one statement; longer lists are split.
    const ID_CHUNK: usize;
    /// Most event ids or keys bound to one statement; longer lists are split.
    const LIST_CHUNK: usize;
    /// Whether the consumer's locks first find rows with a plain read and then lock
    /// them by primary key (MySQL: a locking read of a row that does not exist would
    /// lock a gap and deadlock with the insert that creates it).
    const FIND_BEFORE_LOCK: bool;

    /// A delay as bound: seconds (PostgreSQL) or microseconds, clamped to 100 years.
    type Delay;

    /// `d` as bound.
    fn delay(d: Duration) -> Self::Delay;

    /// Binds the ids of an `{in_ids}`.
    fn bind_ids<'q>(q: Query<'q, Self>, ids: &'q [i64]) -> Query<'q, Self>;

    /// Binds the event ids of an `{in_list}`.
    fn bind_uuids<'q>(q: Query<'q, Self>, ids: &'q [Uuid]) -> Query<'q, Self>;

    /// Runs a statement of a pool-level method, repeating it on the errors that are
    /// worth repeating (the default: none).
    fn retry<T, F, Fut>(mut op: F) -> impl Future<Output = Result<T, sqlx::Error>> + Send
    where
        T: Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, sqlx::Error>> + Send,
    {
        async move { op().await }
    }

    /// The statements for `table`, rendered once.
    fn statements(table: &TableName) -> Arc<Statements> {
        statements::statements(Self::SQL, table)
    }
}

/// 100 years in microseconds: the longest delay applied, so time arithmetic in SQL can
/// never overflow.
pub(crate) const MAX_DELAY_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// A delay in microseconds, clamped to [`MAX_DELAY_MICROS`].
#[cfg_attr(not(any(feature = "mysql", feature = "sqlite")), allow(dead_code))]
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_DELAY_MICROS)
}

/// The [`Backend`] methods every database runs the same way, for `impl Backend for X`
/// where `X:` [`Dialect`] (which must be in scope: the bodies call `Self::statements`).
macro_rules! store_ops {
    () => {
        async fn begin(
            pool: &sqlx::Pool<Self>,
        ) -> Result<sqlx::Transaction<'static, Self>, sqlx::Error> {
            pool.begin_with(Self::BEGIN).await
        }

        fn migration_sql(table: &$crate::route::TableName) -> String {
            Self::MIGRATION.replace("{table}", table.as_str())
        }

        fn inbox_migration_sql(table: &$crate::route::TableName) -> String {
            format!("{}\n{}", Self::MIGRATION, Self::INBOX_MIGRATION)
                .replace("{table}", table.as_str())
        }

        async fn watermarks<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            service: &'c $crate::route::ServiceName,
            keys: &'c [String],
            settled_for: Option<std::time::Duration>,
        ) -> Result<Vec<(String, uuid::Uuid)>, sqlx::Error> {
            let mut out = Vec::new();
            for chunk in keys.chunks($crate::backend::statements::INSERT_ROWS) {
                let sql = $crate::backend::statements::watermarks(
                    Self::SQL,
                    table,
                    chunk.len(),
                    settled_for.is_some(),
                );
                let mut q = sqlx::query_as::<_, ($crate::backend::rows::DbText, uuid::Uuid)>(&sql);
                if let Some(settle) = settled_for {
                    q = q.bind(Self::delay(settle));
                }
                q = q.bind(service.as_str());
                for key in chunk {
                    q = q.bind(key.as_str());
                }
                out.extend(
                    q.fetch_all(&mut *conn)
                        .await?
                        .into_iter()
                        .map(|(k, id)| (k.0, id)),
                );
            }
            Ok(out)
        }

        async fn purge_inbox<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
            consumed_age: std::time::Duration,
            dead_age: Option<std::time::Duration>,
            limit: u32,
            settle: std::time::Duration,
        ) -> Result<(u64, u64), sqlx::Error> {
            let mut tx = Self::begin(pool).await?;
            let sql = $crate::backend::statements::purge_candidates(Self::SQL, table);
            let rows: Vec<(i64, Option<$crate::backend::rows::DbText>, uuid::Uuid)> =
                sqlx::query_as(&sql)
                    .bind(service.as_str())
                    .bind(Self::delay(consumed_age))
                    .bind(dead_age.map(Self::delay))
                    .bind(Self::delay(dead_age.unwrap_or_default()))
                    .bind(i64::from(limit))
                    .fetch_all(&mut *tx)
                    .await?;
            if rows.is_empty() {
                return Ok((0, 0));
            }
            let rows: Vec<(i64, Option<String>, uuid::Uuid)> = rows
                .into_iter()
                .map(|(id, k, e)| (id, k.map(|k| k.0), e))
                .collect();
            let mut keys: Vec<String> = rows
                .iter()
                .map(|(_, k, _)| k.clone().unwrap_or_default())
                .collect();
            keys.sort();
            keys.dedup();
            let settled: std::collections::HashMap<String, uuid::Uuid> =
                Self::watermarks(&mut tx, table, service, &keys, Some(settle))
                    .await?
                    .into_iter()
                    .collect();
            let mut delete = Vec::new();
            let mut raise: std::collections::BTreeMap<String, uuid::Uuid> = Default::default();
            for (id, key, event_id) in rows {
                let key = key.unwrap_or_default();
                if settled.get(&key).is_some_and(|w| event_id <= *w) {
                    delete.push(id);
                } else {
                    let w = raise.entry(key).or_insert(event_id);
                    if event_id > *w {
                        *w = event_id;
                    }
                }
            }
            let mut deleted = 0;
            for chunk in delete.chunks($crate::backend::statements::INSERT_ROWS) {
                let sql =
                    $crate::backend::statements::delete_settled(Self::SQL, table, chunk.len());
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(*id);
                }
                deleted += q.execute(&mut *tx).await?.rows_affected();
            }
            let sql = $crate::backend::statements::raise_watermark(Self::SQL, table);
            for (key, event_id) in &raise {
                sqlx::query(&sql)
                    .bind(service.as_str())
                    .bind(key.as_str())
                    .bind(*event_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok((deleted, raise.len() as u64))
        }

        async fn insert<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            row: &'c $crate::backend::NewRow<'c>,
        ) -> Result<(), sqlx::Error> {
            let s = Self::statements(table);
            let sql = match row.trace_context {
                Some(_) => &s.insert_traced,
                None => &s.insert,
            };
            let query = sqlx::query(sql.text())
                .bind(row.event_id)
                .bind(row.service.as_str())
                .bind(row.event_type)
                .bind(row.version)
                .bind(row.key)
                .bind(row.payload)
                .bind(row.max_retries);
            match row.trace_context {
                Some(context) => query.bind(context),
                None => query,
            }
            .execute(conn)
            .await?;
            Ok(())
        }

        async fn insert_many<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            rows: &'c [$crate::backend::NewRow<'c>],
        ) -> Result<(), sqlx::Error> {
            // One column list for the whole call: the trace context column is named only
            // if some row has one (a table `migrate` has not upgraded still takes the rest).
            let traced = rows.iter().any(|r| r.trace_context.is_some());
            for chunk in rows.chunks($crate::backend::statements::INSERT_ROWS) {
                let sql =
                    $crate::backend::statements::insert_many(Self::SQL, table, chunk.len(), traced);
                let mut q = sqlx::query(&sql);
                for row in chunk {
                    q = q
                        .bind(row.event_id)
                        .bind(row.service.as_str())
                        .bind(row.event_type)
                        .bind(row.version)
                        .bind(row.key)
                        .bind(row.payload)
                        .bind(row.max_retries);
                    if traced {
                        q = q.bind(row.trace_context);
                    }
                }
                q.execute(&mut *conn).await?;
            }
            Ok(())
        }

        async fn insert_inbox<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            rows: &'c [$crate::backend::NewInboxRow<'c>],
        ) -> Result<u64, sqlx::Error> {
            let mut inserted = 0;
            for chunk in rows.chunks($crate::backend::statements::INSERT_ROWS) {
                let sql = $crate::backend::statements::insert_inbox(Self::SQL, table, chunk.len());
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    let status = match r.dead {
                        Some(_) => $crate::backend::Status::Dead,
                        None => $crate::backend::Status::Pending,
                    };
                    q = q
                        .bind(r.row.event_id)
                        .bind(r.row.service.as_str())
                        .bind(r.row.event_type)
                        .bind(r.row.version)
                        .bind(r.row.key)
                        .bind(r.row.payload)
                        .bind(r.row.max_retries)
                        .bind(r.row.trace_context)
                        .bind(status.as_i16())
                        .bind(r.dead.map(|(reason, _)| reason))
                        .bind(r.dead.map(|(_, class)| class.as_str()))
                        .bind(r.dead.is_some());
                }
                inserted += q.execute(&mut *conn).await?.rows_affected();
            }
            Ok(inserted)
        }

        async fn mark_published<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            ids: &'p [i64],
            token: i64,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let mut changed = 0;
            for chunk in ids.chunks(Self::ID_CHUNK) {
                let sql = s.mark_published.get(chunk.len());
                changed += Self::retry(|| {
                    let q = sqlx::query(&sql);
                    Self::bind_ids(q, chunk).bind(token).execute(pool)
                })
                .await?
                .rows_affected();
            }
            Ok(changed)
        }

        async fn release<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            ids: &'p [i64],
            token: i64,
            delay: std::time::Duration,
            error: &'p str,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let delay = Self::delay(delay);
            let error = $crate::backend::truncate_error(error);
            let mut changed = 0;
            for chunk in ids.chunks(Self::ID_CHUNK) {
                let sql = s.release.get(chunk.len());
                changed += Self::retry(|| {
                    let q = sqlx::query(&sql).bind(delay).bind(error);
                    Self::bind_ids(q, chunk).bind(token).execute(pool)
                })
                .await?
                .rows_affected();
            }
            Ok(changed)
        }

        async fn mark_dead_leased<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            id: i64,
            token: i64,
            reason: &'p str,
        ) -> Result<bool, sqlx::Error> {
            let s = Self::statements(table);
            let reason = $crate::backend::truncate_error(reason);
            let done = Self::retry(|| {
                sqlx::query(s.mark_dead_leased.text())
                    .bind(reason)
                    .bind($crate::backend::DeadReason::TooLarge.as_str())
                    .bind(id)
                    .bind(token)
                    .execute(pool)
            })
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn lock_for_consume<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            service: &'c $crate::route::ServiceName,
            event_id: uuid::Uuid,
        ) -> Result<Option<$crate::backend::RowState>, sqlx::Error> {
            use $crate::backend::rows::OutboxRowExt as _;
            let s = Self::statements(table);
            let row = if Self::FIND_BEFORE_LOCK {
                let id: Option<i64> = sqlx::query_scalar(s.find_by_event.text())
                    .bind(event_id)
                    .bind(service.as_str())
                    .fetch_optional(&mut *conn)
                    .await?;
                let Some(id) = id else {
                    return Ok(None);
                };
                sqlx::query(s.lock_by_id.text())
                    .bind(id)
                    .bind(service.as_str())
                    .fetch_optional(&mut *conn)
                    .await?
            } else {
                sqlx::query(s.lock_by_event.text())
                    .bind(event_id)
                    .bind(service.as_str())
                    .fetch_optional(&mut *conn)
                    .await?
            };
            row.as_ref().map(|r| r.row_state()).transpose()
        }

        async fn lock_batch_for_consume<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            service: &'c $crate::route::ServiceName,
            event_ids: &'c [uuid::Uuid],
        ) -> Result<Vec<(uuid::Uuid, $crate::backend::RowState)>, sqlx::Error> {
            use sqlx::Row as _;
            use $crate::backend::rows::OutboxRowExt as _;
            let s = Self::statements(table);
            let mut states = Vec::with_capacity(event_ids.len());
            for chunk in event_ids.chunks(Self::LIST_CHUNK) {
                let rows = if Self::FIND_BEFORE_LOCK {
                    let sql = s.find_by_events.get(chunk.len());
                    let q = sqlx::query(&sql).bind(service.as_str());
                    let ids: Vec<i64> = Self::bind_uuids(q, chunk)
                        .fetch_all(&mut *conn)
                        .await?
                        .iter()
                        .map(|r| r.try_get(0))
                        .collect::<Result<_, _>>()?;
                    if ids.is_empty() {
                        continue;
                    }
                    let sql = s.lock_by_ids.get(ids.len());
                    let q = sqlx::query(&sql);
                    Self::bind_ids(q, &ids).fetch_all(&mut *conn).await?
                } else {
                    let sql = s.lock_by_events.get(chunk.len());
                    let q = sqlx::query(&sql);
                    Self::bind_uuids(q, chunk)
                        .bind(service.as_str())
                        .fetch_all(&mut *conn)
                        .await?
                };
                for r in &rows {
                    states.push((r.try_get("event_id")?, r.row_state()?));
                }
            }
            Ok(states)
        }

        async fn mark_consumed<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            ids: &'c [i64],
        ) -> Result<(), sqlx::Error> {
            let s = Self::statements(table);
            for chunk in ids.chunks(Self::ID_CHUNK) {
                let sql = s.mark_consumed.get(chunk.len());
                let q = sqlx::query(&sql);
                Self::bind_ids(q, chunk).execute(&mut *conn).await?;
            }
            Ok(())
        }

        async fn defer<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            service: &'c $crate::route::ServiceName,
            key: &'c str,
            id: i64,
            delay: std::time::Duration,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let republished = sqlx::query(s.republish_predecessors.text())
                .bind(service.as_str())
                .bind(key)
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            sqlx::query(s.defer.text())
                .bind(Self::delay(delay))
                .bind(id)
                .execute(conn)
                .await?;
            Ok(republished)
        }

        async fn wait<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            id: i64,
            delay: std::time::Duration,
            grace: std::time::Duration,
            reason: &'c str,
        ) -> Result<bool, sqlx::Error> {
            let s = Self::statements(table);
            let done = sqlx::query(s.wait.text())
                .bind(Self::delay(delay))
                .bind($crate::backend::truncate_error(reason))
                .bind(id)
                .bind(Self::delay(grace))
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn backlog<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
        ) -> Result<$crate::backend::Backlog, sqlx::Error> {
            use sqlx::Row as _;
            use $crate::backend::rows::DbTime;
            let s = Self::statements(table);
            let rows = sqlx::query(s.backlog.text())
                .bind(service.as_str())
                .fetch_all(pool)
                .await?;
            let mut b = $crate::backend::Backlog::default();
            let age = |now: DbTime, at: Option<DbTime>| {
                at.map_or(0.0, |at| {
                    (now.0 - at.0).num_milliseconds().max(0) as f64 / 1000.0
                })
            };
            for r in &rows {
                let status: i16 = r.try_get(0)?;
                let n = r.try_get::<i64, _>(1)?.max(0) as u64;
                let now: DbTime = r.try_get(6)?;
                match $crate::backend::Status::from_i16(status) {
                    Some($crate::backend::Status::Pending) => {
                        b.pending = n;
                        b.due = r.try_get::<i64, _>(2)?.max(0) as u64;
                        b.oldest_due = age(now, r.try_get(3)?);
                        b.waiting = r.try_get::<i64, _>(5)?.max(0) as u64;
                    }
                    Some($crate::backend::Status::Published) => {
                        b.unconsumed = n;
                        b.oldest_unconsumed = age(now, r.try_get(4)?);
                    }
                    Some($crate::backend::Status::Dead) => b.dead = n,
                    _ => {}
                }
            }
            Ok(b)
        }

        async fn waiting<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
        ) -> Result<Vec<$crate::backend::WaitingCount>, sqlx::Error> {
            use sqlx::Row as _;
            use $crate::backend::rows::{DbText, DbTime};
            let s = Self::statements(table);
            sqlx::query(s.waiting.text())
                .bind(service.as_str())
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok($crate::backend::WaitingCount {
                        event_type: r.try_get::<DbText, _>(0)?.0,
                        reason: r
                            .try_get::<Option<DbText>, _>(1)?
                            .map(|t| t.0)
                            .unwrap_or_default(),
                        count: r.try_get::<i64, _>(2)?.max(0) as u64,
                        oldest_since: r.try_get::<DbTime, _>(3)?.0,
                    })
                })
                .collect()
        }

        async fn purge<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
            consumed_age: std::time::Duration,
            dead_age: Option<std::time::Duration>,
            limit: u32,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let consumed = Self::delay(consumed_age);
            let dead = dead_age.map(Self::delay);
            let any_dead = Self::delay(dead_age.unwrap_or_default());
            let done = Self::retry(|| {
                sqlx::query(s.purge.text())
                    .bind(service.as_str())
                    .bind(consumed)
                    .bind(dead)
                    .bind(any_dead)
                    .bind(i64::from(limit))
                    .execute(pool)
            })
            .await?;
            Ok(done.rows_affected())
        }

        async fn retry_later<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            id: i64,
            fence: $crate::backend::AttemptsFence,
            delay: std::time::Duration,
            error: &'p str,
        ) -> Result<bool, sqlx::Error> {
            let s = Self::statements(table);
            let delay = Self::delay(delay);
            let error = $crate::backend::truncate_error(error);
            let done = Self::retry(|| {
                sqlx::query(s.retry_later.text())
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
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            id: i64,
            fence: $crate::backend::AttemptsFence,
            reason: &'p str,
            class: $crate::backend::DeadReason,
        ) -> Result<bool, sqlx::Error> {
            let s = Self::statements(table);
            let reason = $crate::backend::truncate_error(reason);
            let done = Self::retry(|| {
                sqlx::query(s.mark_dead.text())
                    .bind(reason)
                    .bind(class.as_str())
                    .bind(id)
                    .bind(fence.0)
                    .execute(pool)
            })
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn redeliver_stale<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
            older_than: std::time::Duration,
            newer_than: Option<std::time::Duration>,
            limit: u32,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let older = Self::delay(older_than);
            let newer = newer_than.map(Self::delay);
            let done = Self::retry(|| {
                sqlx::query(s.redeliver_stale.text())
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
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
            limit: u32,
        ) -> Result<Vec<$crate::backend::OutboxRow>, sqlx::Error> {
            use $crate::backend::rows::OutboxRowExt as _;
            let s = Self::statements(table);
            sqlx::query(s.fetch_dead.text())
                .bind(service.as_str())
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| r.outbox_row())
                .collect()
        }

        async fn revive<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
            event_id: Option<uuid::Uuid>,
            limit: u32,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let done = Self::retry(|| {
                sqlx::query(s.revive.text())
                    .bind(service.as_str())
                    .bind(event_id)
                    .bind(event_id)
                    .bind(i64::from(limit))
                    .execute(pool)
            })
            .await?;
            Ok(done.rows_affected())
        }

        async fn committed_events<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
            event_ids: &'p [uuid::Uuid],
        ) -> Result<Vec<uuid::Uuid>, sqlx::Error> {
            use sqlx::Row as _;
            let s = Self::statements(table);
            let mut found = Vec::new();
            for chunk in event_ids.chunks(Self::ID_CHUNK) {
                let sql = s.find_by_events.get(chunk.len());
                let q = sqlx::query(&sql).bind(service.as_str());
                for r in Self::bind_uuids(q, chunk).fetch_all(pool).await? {
                    found.push(r.try_get("event_id")?);
                }
            }
            Ok(found)
        }

        async fn fetch<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            event_id: uuid::Uuid,
        ) -> Result<Option<$crate::backend::OutboxRow>, sqlx::Error> {
            use $crate::backend::rows::OutboxRowExt as _;
            let s = Self::statements(table);
            sqlx::query(s.fetch.text())
                .bind(event_id)
                .fetch_optional(pool)
                .await?
                .map(|r| r.outbox_row())
                .transpose()
        }

        async fn fetch_all<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
        ) -> Result<Vec<$crate::backend::OutboxRow>, sqlx::Error> {
            use $crate::backend::rows::OutboxRowExt as _;
            let s = Self::statements(table);
            sqlx::query(s.fetch_all.text())
                .bind(service.as_str())
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| r.outbox_row())
                .collect()
        }

        async fn counts<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
        ) -> Result<$crate::backend::StatusCounts, sqlx::Error> {
            let s = Self::statements(table);
            let rows: Vec<(i16, i64)> = sqlx::query_as(s.counts.text())
                .bind(service.as_str())
                .fetch_all(pool)
                .await?;
            Ok($crate::backend::counts_from(rows))
        }

        async fn dead_page<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
            filter: &'p $crate::backend::DeadFilter,
            after: i64,
            limit: u32,
        ) -> Result<Vec<$crate::backend::OutboxRow>, sqlx::Error> {
            use $crate::backend::rows::OutboxRowExt as _;
            let s = Self::statements(table);
            let pattern = filter.error_pattern();
            let q = sqlx::query(s.dead_page.text());
            $crate::backend::ops::bind_dead_filter!(q, service, filter, pattern)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| r.outbox_row())
                .collect()
        }

        async fn dead_count<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
            filter: &'p $crate::backend::DeadFilter,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let pattern = filter.error_pattern();
            let q = sqlx::query_scalar::<_, i64>(s.dead_count.text());
            let n = $crate::backend::ops::bind_dead_filter!(q, service, filter, pattern)
                .fetch_one(pool)
                .await?;
            Ok(n.max(0) as u64)
        }

        async fn revive_ids<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            service: &'c $crate::route::ServiceName,
            ids: &'c [i64],
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let mut changed = 0;
            for chunk in ids.chunks(Self::ID_CHUNK) {
                let sql = s.revive_ids.get(chunk.len());
                let q = sqlx::query(&sql);
                changed += Self::bind_ids(q, chunk)
                    .bind(service.as_str())
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
            }
            Ok(changed)
        }

        async fn discard<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            service: &'c $crate::route::ServiceName,
            event_id: uuid::Uuid,
        ) -> Result<bool, sqlx::Error> {
            let s = Self::statements(table);
            let done = sqlx::query(s.discard.text())
                .bind(service.as_str())
                .bind(event_id)
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn park<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            service: &'c $crate::route::ServiceName,
            key: &'c str,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let hold = Self::delay(std::time::Duration::MAX);
            let done = sqlx::query(s.park.text())
                .bind(hold)
                .bind(service.as_str())
                .bind(key)
                .execute(conn)
                .await?;
            Ok(done.rows_affected())
        }

        async fn unpark<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            service: &'c $crate::route::ServiceName,
            key: &'c str,
        ) -> Result<u64, sqlx::Error> {
            let s = Self::statements(table);
            let done = sqlx::query(s.unpark.text())
                .bind(service.as_str())
                .bind(key)
                .execute(conn)
                .await?;
            Ok(done.rows_affected())
        }

        async fn parked<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
        ) -> Result<Vec<$crate::backend::ParkedKey>, sqlx::Error> {
            use sqlx::Row as _;
            use $crate::backend::rows::{DbText, DbTime};
            let s = Self::statements(table);
            sqlx::query(s.parked.text())
                .bind(service.as_str())
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok($crate::backend::ParkedKey {
                        key: r.try_get::<DbText, _>(0)?.0,
                        pending: r.try_get::<i64, _>(1)?.max(0) as u64,
                        parked_since: r.try_get::<DbTime, _>(2)?.0,
                    })
                })
                .collect()
        }

        async fn key_counts<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: &'p $crate::route::ServiceName,
        ) -> Result<$crate::backend::KeyCounts, sqlx::Error> {
            let s = Self::statements(table);
            let (failing, parked): (i64, i64) = sqlx::query_as(s.key_counts.text())
                .bind(service.as_str())
                .fetch_one(pool)
                .await?;
            Ok($crate::backend::KeyCounts {
                failing: failing.max(0) as u64,
                parked: parked.max(0) as u64,
            })
        }

        async fn audit_insert<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            reference: uuid::Uuid,
            entry: &'c $crate::backend::NewAudit<'c>,
        ) -> Result<(), sqlx::Error> {
            let s = Self::statements(table);
            sqlx::query(s.audit_insert.text())
                .bind(reference)
                .bind(entry.actor)
                .bind(entry.action)
                .bind(entry.service.as_str())
                .bind(entry.target)
                .bind(i64::try_from(entry.affected).unwrap_or(i64::MAX))
                .execute(conn)
                .await?;
            Ok(())
        }

        async fn audit_add<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            table: &'c $crate::route::TableName,
            reference: uuid::Uuid,
            affected: u64,
        ) -> Result<(), sqlx::Error> {
            let s = Self::statements(table);
            sqlx::query(s.audit_add.text())
                .bind(i64::try_from(affected).unwrap_or(i64::MAX))
                .bind(reference)
                .execute(conn)
                .await?;
            Ok(())
        }

        async fn audit<'p>(
            pool: &'p sqlx::Pool<Self>,
            table: &'p $crate::route::TableName,
            service: Option<&'p $crate::route::ServiceName>,
            limit: u32,
        ) -> Result<Vec<$crate::backend::AuditEntry>, sqlx::Error> {
            use sqlx::Row as _;
            use $crate::backend::rows::{DbText, DbTime};
            let s = Self::statements(table);
            let service = service.map(|s| s.as_str());
            sqlx::query(s.audit_list.text())
                .bind(service)
                .bind(service)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok($crate::backend::AuditEntry {
                        id: r.try_get(0)?,
                        at: r.try_get::<DbTime, _>(1)?.0,
                        actor: r.try_get::<DbText, _>(2)?.0,
                        action: r.try_get::<DbText, _>(3)?.0,
                        service: r.try_get::<DbText, _>(4)?.0,
                        target: r.try_get::<DbText, _>(5)?.0,
                        affected: r.try_get::<i64, _>(6)?.max(0) as u64,
                    })
                })
                .collect()
        }

        async fn now(
            pool: &sqlx::Pool<Self>,
        ) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error> {
            static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            let sql = SQL.get_or_init(|| format!("SELECT {}", Self::SQL.now));
            let now: $crate::backend::rows::DbTime =
                sqlx::query_scalar(sql.as_str()).fetch_one(pool).await?;
            Ok(now.0)
        }

        async fn execute_portable<'c>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            sql: &'c str,
            args: &'c [$crate::backend::SqlValue],
        ) -> Result<u64, sqlx::Error> {
            use $crate::backend::SqlValue;
            let sql = if Self::SQL.numbered {
                std::borrow::Cow::Owned($crate::backend::statements::numbered(sql))
            } else {
                std::borrow::Cow::Borrowed(sql)
            };
            let mut q = sqlx::query(&sql);
            for a in args {
                q = match a {
                    SqlValue::Null => q.bind(None::<String>),
                    SqlValue::Int(i) => q.bind(*i),
                    SqlValue::Text(t) => q.bind(t.as_str()),
                };
            }
            Ok(q.execute(conn).await?.rows_affected())
        }
    };
}
pub(crate) use store_ops;

/// Binds a [`super::DeadFilter`] to a statement rendered with `{dead_filter}`: the
/// service, then each field twice (its NULL test, its value). `pattern` is the filter's
/// `error_pattern()`, owned by the caller.
macro_rules! bind_dead_filter {
    ($q:expr, $service:expr, $filter:expr, $pattern:expr) => {{
        let f: &$crate::backend::DeadFilter = $filter;
        let reason = f.reason.map(|r| r.as_str());
        let older = f.older_than.map(Self::delay);
        let newer = f.newer_than.map(Self::delay);
        $q.bind($service.as_str())
            .bind(f.event_type.as_deref())
            .bind(f.event_type.as_deref())
            .bind(reason)
            .bind(reason)
            .bind($pattern.as_deref())
            .bind($pattern.as_deref())
            .bind(f.key.as_deref())
            .bind(f.key.as_deref())
            .bind(older)
            .bind(older)
            .bind(newer)
            .bind(newer)
    }};
}
pub(crate) use bind_dead_filter;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_clamped() {
        assert_eq!(micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(micros(Duration::MAX), MAX_DELAY_MICROS);
    }
}
