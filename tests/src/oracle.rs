//! The ledger oracle of the fault suite, on every backend.
//!
//! * Writers ([`publish_ledgered`]) take the next per-key sequence number from
//!   `ledger_keys` ([`ChaosBackend::next_seq`]: an upsert, which row-locks the key until
//!   the transaction ends, so one key's sequence follows its commit order), publish the
//!   event, and insert a `ledger` row, all in ONE business transaction: a ledger row
//!   exists if and only if the event's transaction committed, whatever a crash or an
//!   ambiguous COMMIT said.
//! * Handlers record their effect in `effects` in the consumed transaction
//!   (`services::record`); `effects.id` is the applied order.
//! * [`check`] compares the three and reports lost, phantom, effect duplicates, per-key
//!   order violations, wrong effects (a handler saw another key or sequence number than
//!   the ledger's: a forged payload), duplicate deliveries (counted by the consumers,
//!   allowed) and dead letters with their reasons. [`Report::assert_pass`]: lost 0,
//!   phantom 0, effect duplicates 0, order violations 0, wrong effects 0, every dead row
//!   has a reason.
//!
//! Only [`ChaosBackend`] differs per backend (DDL, the sequence upsert, a few reads);
//! everything else is shared.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;

use outbox_runtime::{EventId, Outbox, PublishOptions, SqlValue, Status};
use sqlx::{MySql, Pool, Postgres, Sqlite};

use crate::db::{TestDatabase, TestMySql, TestPg, TestSqlite};
use crate::e2e::TestBackend;
use crate::services::{Script, Task, TaskCreated};

/// What the oracle and the fault scenarios need per backend: the ledger's SQL, a lease
/// count, and how a worker process reaches the scenario's database.
pub trait ChaosBackend: TestBackend {
    /// A fresh database of this backend (tests/src/db.rs).
    type TestDb: TestDatabase<DB = Self>;

    /// `ledger` and `ledger_keys`, idempotent.
    const LEDGER_DDL: [&'static str; 2];

    /// In the business transaction on `conn`: the next sequence number of `key` of
    /// service `task`, with the key's `ledger_keys` row locked until the transaction
    /// ends (so a key's sequence is its commit order).
    fn next_seq<'c>(
        conn: &'c mut Self::Connection,
        key: &'c str,
    ) -> impl Future<Output = Result<i64, sqlx::Error>> + Send + 'c;

    /// Ledger rows of service `task`: event id, key, sequence.
    fn ledger(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Vec<(String, String, i64)>, sqlx::Error>> + Send;

    /// Ledger rows (all services).
    fn ledger_len(pool: &Pool<Self>) -> impl Future<Output = Result<i64, sqlx::Error>> + Send;

    /// Pending rows of `table` leased by a relay (`lease_token <> 0`); only those whose
    /// lease has not expired yet (database clock) when `unexpired`.
    fn leased<'p>(
        pool: &'p Pool<Self>,
        table: &'p str,
        unexpired: bool,
    ) -> impl Future<Output = Result<i64, sqlx::Error>> + Send + 'p;

    /// The URL a worker process opens (`postgres://…`, `mysql://…`, `sqlite://<path>`).
    fn url(db: &Self::TestDb) -> String;
}

/// The reads whose SQL is the same on every backend.
macro_rules! common_reads {
    () => {
        async fn ledger(pool: &Pool<Self>) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
            sqlx::query_as("SELECT event_id, event_key, seq FROM ledger WHERE service = 'task'")
                .fetch_all(pool)
                .await
        }

        async fn ledger_len(pool: &Pool<Self>) -> Result<i64, sqlx::Error> {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM ledger")
                .fetch_one(pool)
                .await?;
            Ok(n)
        }
    };
}

impl ChaosBackend for Postgres {
    type TestDb = TestPg;
    const LEDGER_DDL: [&'static str; 2] = [
        "CREATE TABLE IF NOT EXISTS ledger (event_id TEXT PRIMARY KEY, service TEXT NOT NULL, \
         event_key TEXT NOT NULL, seq BIGINT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        "CREATE TABLE IF NOT EXISTS ledger_keys (service TEXT NOT NULL, event_key TEXT NOT NULL, \
         seq BIGINT NOT NULL, PRIMARY KEY (service, event_key))",
    ];

    async fn next_seq(conn: &mut sqlx::PgConnection, key: &str) -> Result<i64, sqlx::Error> {
        let (seq,): (i64,) = sqlx::query_as(
            "INSERT INTO ledger_keys (service, event_key, seq) VALUES ('task', $1, 1) \
             ON CONFLICT (service, event_key) DO UPDATE SET seq = ledger_keys.seq + 1 RETURNING seq",
        )
        .bind(key)
        .fetch_one(conn)
        .await?;
        Ok(seq)
    }

    common_reads!();

    async fn leased(pool: &Pool<Self>, table: &str, unexpired: bool) -> Result<i64, sqlx::Error> {
        let expiry = if unexpired {
            " AND locked_until > now()"
        } else {
            ""
        };
        let (n,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(*) FROM {table} WHERE status = 0 AND lease_token <> 0{expiry}"
        ))
        .fetch_one(pool)
        .await?;
        Ok(n)
    }

    fn url(db: &TestPg) -> String {
        crate::chaos::pg_url(db.name())
    }
}

impl ChaosBackend for MySql {
    type TestDb = TestMySql;
    // The database's default collation (the scenarios' keys differ in more than case):
    // sqlx reads a `utf8mb4_bin` VARCHAR as VARBINARY, which does not decode as String.
    const LEDGER_DDL: [&'static str; 2] = [
        "CREATE TABLE IF NOT EXISTS ledger (event_id VARCHAR(64) PRIMARY KEY, \
         service VARCHAR(64) NOT NULL, \
         event_key VARCHAR(255) NOT NULL, seq BIGINT NOT NULL, \
         at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE = InnoDB",
        "CREATE TABLE IF NOT EXISTS ledger_keys (service VARCHAR(64) NOT NULL, \
         event_key VARCHAR(255) NOT NULL, seq BIGINT NOT NULL, \
         PRIMARY KEY (service, event_key)) ENGINE = InnoDB",
    ];

    async fn next_seq(conn: &mut sqlx::MySqlConnection, key: &str) -> Result<i64, sqlx::Error> {
        // No RETURNING: the upsert takes the key's row lock, which holds until the
        // transaction ends, so the SELECT after it reads this transaction's own value.
        sqlx::query(
            "INSERT INTO ledger_keys (service, event_key, seq) VALUES ('task', ?, 1) \
             ON DUPLICATE KEY UPDATE seq = seq + 1",
        )
        .bind(key)
        .execute(&mut *conn)
        .await?;
        let (seq,): (i64,) =
            sqlx::query_as("SELECT seq FROM ledger_keys WHERE service = 'task' AND event_key = ?")
                .bind(key)
                .fetch_one(conn)
                .await?;
        Ok(seq)
    }

    common_reads!();

    async fn leased(pool: &Pool<Self>, table: &str, unexpired: bool) -> Result<i64, sqlx::Error> {
        let expiry = if unexpired {
            " AND locked_until > UTC_TIMESTAMP(6)"
        } else {
            ""
        };
        let (n,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(*) FROM {table} WHERE status = 0 AND lease_token <> 0{expiry}"
        ))
        .fetch_one(pool)
        .await?;
        Ok(n)
    }

    fn url(db: &TestMySql) -> String {
        crate::chaos::mysql_url(db.name())
    }
}

impl ChaosBackend for Sqlite {
    type TestDb = TestSqlite;
    const LEDGER_DDL: [&'static str; 2] = [
        "CREATE TABLE IF NOT EXISTS ledger (event_id TEXT PRIMARY KEY, service TEXT NOT NULL, \
         event_key TEXT NOT NULL, seq INTEGER NOT NULL, at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        "CREATE TABLE IF NOT EXISTS ledger_keys (service TEXT NOT NULL, event_key TEXT NOT NULL, \
         seq INTEGER NOT NULL, PRIMARY KEY (service, event_key))",
    ];

    async fn next_seq(conn: &mut sqlx::SqliteConnection, key: &str) -> Result<i64, sqlx::Error> {
        // The business transaction is `BEGIN IMMEDIATE` (Outbox::begin): it holds the
        // database's write lock, so any upsert follows commit order.
        let (seq,): (i64,) = sqlx::query_as(
            "INSERT INTO ledger_keys (service, event_key, seq) VALUES ('task', ?, 1) \
             ON CONFLICT (service, event_key) DO UPDATE SET seq = ledger_keys.seq + 1 RETURNING seq",
        )
        .bind(key)
        .fetch_one(conn)
        .await?;
        Ok(seq)
    }

    common_reads!();

    async fn leased(pool: &Pool<Self>, table: &str, unexpired: bool) -> Result<i64, sqlx::Error> {
        // Times are unix microseconds (outbox_runtime's SQLite backend).
        let expiry = if unexpired {
            " AND locked_until > CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000"
        } else {
            ""
        };
        let (n,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(*) FROM {table} WHERE status = 0 AND lease_token <> 0{expiry}"
        ))
        .fetch_one(pool)
        .await?;
        Ok(n)
    }

    fn url(db: &TestSqlite) -> String {
        format!("sqlite://{}", db.dir().join("outbox.db").display())
    }
}

/// Creates `ledger` and `ledger_keys` (idempotent).
pub async fn create_ledger<B: ChaosBackend>(pool: &Pool<B>) {
    let mut conn = pool.acquire().await.expect("connection");
    for ddl in B::LEDGER_DDL {
        B::execute_portable(&mut conn, ddl, &[])
            .await
            .expect("creating the ledger");
    }
}

/// What one ledgered publish ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Committed, with this event id and per-key sequence.
    Committed(EventId, i64),
    /// Rolled back on purpose.
    RolledBack,
    /// Failed somewhere (the database went away, ...). If the failure was at COMMIT the
    /// event may exist: the ledger says.
    Failed,
}

/// Publishes one `TaskCreated` for `key` with its ledger row in one transaction;
/// commits, or rolls back when `commit` is false.
pub async fn publish_ledgered<B: ChaosBackend>(
    outbox: &Outbox<Task, B>,
    key: &str,
    script: Script,
    options: PublishOptions,
    commit: bool,
) -> Written {
    let go = async {
        let mut tx = outbox.begin().await.map_err(|e| e.to_string())?;
        let seq = B::next_seq(&mut **tx.transaction(), key)
            .await
            .map_err(|e| e.to_string())?;
        let event = TaskCreated {
            task_id: key.to_owned(),
            seq: u32::try_from(seq).unwrap_or(u32::MAX),
            script,
        };
        let id = tx
            .publish_with(&event, options)
            .await
            .map_err(|e| e.to_string())?;
        B::execute_portable(
            &mut **tx.transaction(),
            "INSERT INTO ledger (event_id, service, event_key, seq) VALUES (?, 'task', ?, ?)",
            &[
                SqlValue::from(id.to_string()),
                SqlValue::from(key),
                SqlValue::from(seq),
            ],
        )
        .await
        .map_err(|e| e.to_string())?;
        if commit {
            tx.commit().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(Written::Committed(id, seq))
        } else {
            tx.rollback().await.map_err(|e| e.to_string())?;
            Ok(Written::RolledBack)
        }
    };
    match go.await {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "ledgered publish failed");
            Written::Failed
        }
    }
}

/// The oracle's figures for one scenario.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Ledger rows (committed events).
    pub committed: usize,
    /// Distinct events with an effect.
    pub applied: usize,
    /// Ledger rows with no effect whose row is not dead.
    pub lost: Vec<String>,
    /// Effects with no ledger row.
    pub phantom: Vec<String>,
    /// Extra effects of an event (count - 1, summed).
    pub effect_duplicates: usize,
    /// The events applied more than once: event id, key, sequence and the ids of its
    /// effects (their applied order).
    pub duplicated: Vec<String>,
    /// Effects applied out of per-key sequence order.
    pub order_violations: Vec<String>,
    /// Effects whose key or sequence number differ from their event's ledger row: the
    /// handler saw a payload other than the one committed (a forged record handled).
    pub wrong_effects: Vec<String>,
    /// Deliveries the consumers recognised as already settled (allowed).
    pub duplicate_deliveries: u64,
    /// Dead rows: event id and reason.
    pub dead: Vec<(String, String)>,
    /// Dead rows with an empty reason.
    pub dead_without_reason: usize,
    /// Outbox rows of the service without a ledger row (raw rows a scenario injected,
    /// or a rolled-back event that exists after all).
    pub unledgered_rows: usize,
    /// Outbox rows still pending or published.
    pub open_rows: usize,
}

impl Report {
    /// Whether the pass criteria hold.
    pub fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.phantom.is_empty()
            && self.effect_duplicates == 0
            && self.order_violations.is_empty()
            && self.wrong_effects.is_empty()
            && self.dead_without_reason == 0
    }

    /// Prints the figures and panics (with them) unless the pass criteria hold.
    pub fn assert_pass(&self) {
        println!("{self}");
        assert!(self.passed(), "oracle FAILED:\n{self:#?}");
    }

    /// Dead reasons, by event id.
    pub fn dead_reasons(&self) -> BTreeMap<&str, &str> {
        self.dead
            .iter()
            .map(|(id, r)| (id.as_str(), r.as_str()))
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ORACLE {}: committed {} applied {} lost {} phantom {} effect-duplicates {} \
             order-violations {} wrong-effects {} duplicate-deliveries {} dead {} \
             (without reason {}) unledgered-rows {} open-rows {} => {}",
            self.scenario,
            self.committed,
            self.applied,
            self.lost.len(),
            self.phantom.len(),
            self.effect_duplicates,
            self.order_violations.len(),
            self.wrong_effects.len(),
            self.duplicate_deliveries,
            self.dead.len(),
            self.dead_without_reason,
            self.unledgered_rows,
            self.open_rows,
            if self.passed() { "PASS" } else { "FAIL" }
        )?;
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for (_, r) in &self.dead {
            // Group by the reason's first words (the rest names ids and offsets).
            let head: String = r.split_whitespace().take(6).collect::<Vec<_>>().join(" ");
            *reasons.entry(head).or_default() += 1;
        }
        for (r, n) in reasons {
            write!(f, "\n  dead x{n}: {r}")?;
        }
        Ok(())
    }
}

/// Compares ledger, effects and outbox rows of service `task` in `table`.
/// `duplicate_deliveries` is the sum of the consumers' `ConsumerStats.duplicates`.
pub async fn check<B: ChaosBackend>(
    scenario: &str,
    pool: &Pool<B>,
    table: &str,
    duplicate_deliveries: u64,
) -> Report {
    check_subscriber(scenario, pool, pool, table, duplicate_deliveries).await
}

/// [`check`] for a subscriber of `task`'s events: the ledger is in the publisher's
/// database, the effects and the rows (its inbox, `table`) in the subscriber's, which
/// may be another backend. `duplicate_deliveries`: the repeats its intake skipped and
/// its settlement found settled.
pub async fn check_subscriber<P: ChaosBackend, S: ChaosBackend>(
    scenario: &str,
    publisher: &Pool<P>,
    subscriber: &Pool<S>,
    table: &str,
    duplicate_deliveries: u64,
) -> Report {
    let ledger = P::ledger(publisher).await.expect("reading the ledger");
    let effects: Vec<(i64, String, String, i64)> = S::effects(subscriber)
        .await
        .into_iter()
        .filter(|e| e.service == "task")
        .map(|e| (e.id, e.event_id, e.event_key, e.seq))
        .collect();
    let rows = S::fetch_all(
        subscriber,
        &table.parse().unwrap(),
        &"task".parse().unwrap(),
    )
    .await
    .expect("reading the outbox");

    let ledger_ids: BTreeSet<&str> = ledger.iter().map(|(id, _, _)| id.as_str()).collect();
    let ledger_by_id: BTreeMap<&str, (&str, i64)> = ledger
        .iter()
        .map(|(id, key, seq)| (id.as_str(), (key.as_str(), *seq)))
        .collect();
    let mut per_event: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, id, _, _) in &effects {
        *per_event.entry(id.as_str()).or_default() += 1;
    }
    let row_by_id: BTreeMap<String, &outbox_runtime::OutboxRow> =
        rows.iter().map(|r| (r.event_id.to_string(), r)).collect();

    let mut report = Report {
        scenario: scenario.to_owned(),
        committed: ledger.len(),
        applied: per_event.len(),
        duplicate_deliveries,
        ..Report::default()
    };
    for (id, key, seq) in &ledger {
        if per_event.contains_key(id.as_str()) {
            continue;
        }
        let dead = row_by_id.get(id).is_some_and(|r| r.status == Status::Dead);
        if !dead {
            let status = row_by_id.get(id).map(|r| format!("{:?}", r.status));
            report.lost.push(format!(
                "{id} key {key} seq {seq}: row {}",
                status.as_deref().unwrap_or("MISSING")
            ));
        }
    }
    for (id, n) in &per_event {
        if !ledger_ids.contains(id) {
            report.phantom.push((*id).to_owned());
        }
        report.effect_duplicates += n - 1;
        if *n > 1 {
            let mine: Vec<String> = effects
                .iter()
                .filter(|(_, e, _, _)| e == id)
                .map(|(effect_id, _, _, _)| effect_id.to_string())
                .collect();
            let (key, seq) = ledger_by_id.get(id).copied().unwrap_or(("?", -1));
            report.duplicated.push(format!(
                "event {id} key {key} seq {seq}: effects {}",
                mine.join(", ")
            ));
        }
    }
    for (effect_id, id, key, seq) in &effects {
        if let Some((want_key, want_seq)) = ledger_by_id.get(id.as_str()) {
            if key != want_key || seq != want_seq {
                report.wrong_effects.push(format!(
                    "event {id} (effect {effect_id}): handler saw key {key} seq {seq}, \
                     committed key {want_key} seq {want_seq}"
                ));
            }
        }
    }
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for (effect_id, id, key, seq) in &effects {
        if let Some(prev) = last.insert(key.as_str(), *seq) {
            if prev >= *seq {
                report.order_violations.push(format!(
                    "key {key}: seq {seq} (event {id}, effect {effect_id}) applied after seq {prev}"
                ));
            }
        }
    }
    for r in &rows {
        let id = r.event_id.to_string();
        if !ledger_ids.contains(id.as_str()) {
            report.unledgered_rows += 1;
        }
        match r.status {
            Status::Dead | Status::Discarded => {
                let reason = r.last_error.clone().unwrap_or_default();
                if reason.trim().is_empty() {
                    report.dead_without_reason += 1;
                }
                report.dead.push((id, reason));
            }
            Status::Pending | Status::Published => report.open_rows += 1,
            Status::Consumed => {}
        }
    }
    report
}

/// Rows of service `task` in `table` that are still open (pending or published), and
/// the ledger's size: the usual "settled" condition is `open == 0`.
pub async fn open_rows<B: ChaosBackend>(pool: &Pool<B>, table: &str) -> (u64, u64) {
    let c = B::counts(pool, &table.parse().unwrap(), &"task".parse().unwrap())
        .await
        .unwrap_or_default();
    let n = B::ledger_len(pool).await.unwrap_or(0);
    (c.pending + c.published, n as u64)
}

/// Sums `duplicates` over consumer stats.
pub fn duplicates_of<'a>(
    stats: impl IntoIterator<Item = &'a std::sync::Arc<outbox_runtime::ConsumerStats>>,
) -> u64 {
    stats
        .into_iter()
        .map(|s| s.duplicates.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}
