//! PostgreSQL: row locks with `FOR NO KEY UPDATE SKIP LOCKED`, claims as
//! `UPDATE … FROM (SELECT … SKIP LOCKED) RETURNING`, times from `now()`.

use std::time::Duration;

use sqlx::{PgConnection, Pool, Postgres};
use uuid::Uuid;

use crate::route::{ServiceName, TableName};

use super::ops::{store_ops, Dialect, Query};
use super::rows::claimed_rows;
use super::statements::{self, Bounded, HeadOfKey, SqlDialect};
use super::{Backend, ClaimScope, ClaimedRow, WakeStream};

/// Serialises concurrent `migrate` calls (CREATE … IF NOT EXISTS races on the catalog).
const MIGRATE_LOCK: i64 = 0x6f7574626f78; // "outbox"

impl super::sealed::Sealed for Postgres {}

/// The claim, with `$bound` spliced in among the conditions on `o` (see [`claim_sql`]).
/// Its parameters are numbered by hand: their order is documented for operators.
///
/// The claimed ids are an array (an InitPlan) that the UPDATE looks up by primary key.
/// As a join (`UPDATE … FROM (SELECT …) AS due WHERE t.id = due.id`), the generic plan
/// PostgreSQL switches a prepared statement to after five runs hash-joined the claimed
/// rows with a sequential scan of the whole table: 140-470 ms per claim on 200,000
/// rows, against 6-13 ms by primary key.
macro_rules! claim_template {
    ($($bound:tt)*) => {
        concat!(
            "UPDATE {t} AS t \
                SET lease_token = $3, locked_until = now() + make_interval(secs => $4), \
                    updated_at = now() \
              WHERE t.id = ANY(ARRAY(SELECT o.id FROM {t} o \
                      WHERE o.service = $1 AND o.status = {pending} AND o.next_attempt_at <= now() \
                        AND (o.locked_until IS NULL OR o.locked_until <= now()) ",
            $($bound)*
            "AND (o.event_key IS NULL OR NOT EXISTS ( \
                              SELECT 1 FROM {t} p \
                               WHERE p.service = o.service AND p.event_key = o.event_key \
                                 AND p.status = {pending} AND p.id < o.id)) \
                      ORDER BY o.next_attempt_at, o.id \
                      LIMIT $2 \
                      FOR NO KEY UPDATE SKIP LOCKED)) \
             RETURNING t.id, t.event_id, t.event_type, t.event_version, t.event_key, t.payload, \
                       t.attempts, t.created_at, t.trace_context"
        )
    };
}

/// The window's last row, (next_attempt_at, id), as an InitPlan: the due index walked
/// up to the `$5`-th due, unleased row. No row (NULL) when nothing is due.
macro_rules! window_end {
    () => {
        "(SELECT win.next_attempt_at, win.id FROM ( \
           SELECT w.next_attempt_at, w.id FROM {t} w \
            WHERE w.service = $1 AND w.status = {pending} AND w.next_attempt_at <= now() \
              AND (w.locked_until IS NULL OR w.locked_until <= now()) \
            ORDER BY w.next_attempt_at, w.id LIMIT $5) win \
          ORDER BY win.next_attempt_at DESC, win.id DESC LIMIT 1) "
    };
}

/// [`claim_sql`] without a window.
const CLAIM: &str = claim_template!();
/// [`claim_sql`] with a window, compared as (next_attempt_at, id) so rows that share a
/// due time (one transaction's rows share `now()`) are cut at the window's last id too.
const CLAIM_WINDOWED: &str = claim_template!("AND (o.next_attempt_at, o.id) <= ", window_end!(),);
/// The claim past the window ([`ClaimScope::PastWindow`]).
const CLAIM_PAST_WINDOW: &str = claim_template!("AND (o.next_attempt_at, o.id) > ", window_end!(),);

pub(crate) const SQL: SqlDialect = SqlDialect {
    name: "postgres",
    numbered: true,
    now: "now()",
    interval: "make_interval(secs => {p})",
    nullable_delay: "{p}::float8",
    nullable_uuid: "{p}::uuid",
    nullable_text: "{p}::text",
    in_ids: "= ANY({p})",
    in_list: "= ANY({p})",
    for_update: " FOR UPDATE",
    skip_locked: " FOR UPDATE SKIP LOCKED",
    head_of_key: HeadOfKey::NoneBefore,
    bounded: Bounded::Subquery,
    skip_duplicate: ("INSERT INTO", " ON CONFLICT (event_id) DO NOTHING"),
    raise_watermark: "INSERT INTO {t}_seen (service, event_key, last_event_id, raised_at) \
        VALUES ({p}, {p}, {p}, {now}) ON CONFLICT (service, event_key) DO UPDATE \
        SET last_event_id = excluded.last_event_id, raised_at = excluded.raised_at \
        WHERE {t}_seen.last_event_id < excluded.last_event_id",
    own: &[CLAIM, CLAIM_WINDOWED, CLAIM_PAST_WINDOW],
};

/// Seconds for `make_interval`, capped at 100 years so a huge `Duration` cannot make
/// the statement fail.
fn secs(d: Duration) -> f64 {
    d.as_secs_f64().min(100.0 * 365.0 * 86_400.0)
}

/// The relay's claim statement on PostgreSQL, for `table`: heads of key among the
/// due, unleased rows of one service, in due order (`next_attempt_at`, then id; the
/// migration's `{table}_due_idx`), leased to a token; with `windowed`, only among the
/// first `$5` of those rows (the relay's default, [`ClaimScope::Window`]).
///
/// Parameters: `$1` service (text), `$2` limit (bigint), `$3` lease token (bigint),
/// `$4` lease in seconds (double precision), `$5` window (bigint, only if `windowed`).
/// It returns the claimed rows. Public so operators can `EXPLAIN` it against their
/// own table; the relay runs it under a per-service advisory lock (claims take turns).
/// `table` must already have been checked against the name grammar.
pub fn claim_sql(table: &TableName, windowed: bool) -> String {
    let tpl = if windowed { CLAIM_WINDOWED } else { CLAIM };
    statements::render(&SQL, table, tpl).text().to_owned()
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

/// Runs a claim of `scope` ([`claim_sql`] for the first two) in its own short
/// transaction, after [`take_claim_turn`].
async fn claim_heads(
    pool: &Pool<Postgres>,
    table: &TableName,
    service: &ServiceName,
    limit: u32,
    scope: ClaimScope,
    lease: Duration,
    token: i64,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let s = Postgres::statements(table);
    let (statement, window) = match scope {
        ClaimScope::All => (0, None),
        ClaimScope::Window(w) => (1, Some(w)),
        ClaimScope::PastWindow(w) => (2, Some(w)),
    };
    let mut query = sqlx::query(s.own[statement].text())
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
    // The turn, a bound on how long a paused relay can hold it, and a plan made for the
    // table as it is now (one statement). Without `force_custom_plan` the prepared claim
    // could switch to a generic plan while the table was small (new, or just emptied,
    // before autovacuum first analyzed it) and keep it as the backlog grew: a
    // head-of-key check through the due index, or a scan of the whole table, per claim
    // (0.1-0.5 s per claim of 500 at 5,000 events/s, and the relay fell behind). Planning
    // each claim costs about 0.4 ms.
    sqlx::query(
        "SELECT set_config('idle_in_transaction_session_timeout', $2, true), \
                set_config('plan_cache_mode', 'force_custom_plan', true), \
                pg_advisory_xact_lock(hashtextextended($1, 0))",
    )
    .bind(claim_lock_key(table, service))
    .bind(CLAIM_IDLE_TIMEOUT)
    .execute(&mut *tx)
    .await?;
    let rows = query.fetch_all(&mut *tx).await?;
    // Tests freeze a relay here, holding the claim turn and the claimed rows' locks.
    failpoint!("store.claim_locked");
    tx.commit().await?;
    claimed_rows(&rows)
}

impl Dialect for Postgres {
    const SQL: &'static SqlDialect = &SQL;
    const BEGIN: &'static str = "BEGIN";
    const MIGRATION: &'static str = include_str!("../../migrations/postgres/outbox_table.sql");
    const INBOX_MIGRATION: &'static str = include_str!("../../migrations/postgres/inbox_seen.sql");
    const ID_CHUNK: usize = usize::MAX;
    const LIST_CHUNK: usize = usize::MAX;
    const FIND_BEFORE_LOCK: bool = false;

    type Delay = f64;

    fn delay(d: Duration) -> f64 {
        secs(d)
    }

    fn bind_ids<'q>(q: Query<'q, Self>, ids: &'q [i64]) -> Query<'q, Self> {
        q.bind(ids)
    }

    fn bind_uuids<'q>(q: Query<'q, Self>, ids: &'q [Uuid]) -> Query<'q, Self> {
        q.bind(ids)
    }
}

impl Backend for Postgres {
    const BACKEND_NAME: &'static str = "postgres";
    const BACKEND_NAMES: &'static [&'static str] = &["postgres"];
    const HAS_NOTIFY: bool = true;
    const CONCURRENT_RELAYS: bool = true;
    const BOUNDED_CLAIM: bool = true;

    store_ops!();

    async fn migrate_ddl(
        pool: &Pool<Self>,
        table: &TableName,
        sql: String,
    ) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATE_LOCK)
            .execute(&mut *tx)
            .await?;
        super::upgrade::add_missing_columns::<Self>(
            &mut tx,
            table,
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
            |c| c.postgres,
        )
        .await?;
        sqlx::Executor::execute(&mut *tx, sql.as_str()).await?;
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
        claim_heads(pool, table, service, limit, ClaimScope::All, lease, token).await
    }

    async fn claim_in<'p>(
        pool: &'p Pool<Self>,
        table: &'p TableName,
        service: &'p ServiceName,
        limit: u32,
        scope: ClaimScope,
        lease: Duration,
        token: i64,
    ) -> Result<Vec<ClaimedRow>, sqlx::Error> {
        claim_heads(pool, table, service, limit, scope, lease, token).await
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
