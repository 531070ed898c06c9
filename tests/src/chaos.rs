//! The fault suite's harness: a scenario's database (any backend: [`ChaosBackend`]),
//! catalog and topic ([`ChaosEnv`]),
//! ledgered load ([`Load`]), worker processes that tests SIGKILL / SIGSTOP / SIGCONT
//! ([`Worker`], the `chaos-worker` binary), a private PostgreSQL server that may be
//! restarted ([`PrivatePg`]), and the settings every scenario shares.
//!
//! Soak variants: `OUTBOX_CHAOS_SOAK=1` makes every scenario bigger and longer
//! ([`soak`]); the default sizes keep the whole suite within a few minutes on 2 cores.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_runtime::Catalog;
use outbox_runtime::{Backend, KafkaConfig, Outbox, OutboxConfig, OutboxRuntime, PublishOptions};
use outbox_runtime::{Backoff, Waiting};
use rand::Rng;
use sqlx::Pool;

use crate::broker::{unique_suffix, TestBroker};
use crate::db::{TestDatabase, DEFAULT_MYSQL_URL, DEFAULT_PG_URL, MYSQL_URL_ENV, PG_URL_ENV};
use crate::e2e::create_effects;
pub use crate::oracle::ChaosBackend;
use crate::oracle::{self, publish_ledgered, Report, Written};
use crate::services::{Script, Task};

/// Environment variable that turns on the long soak variants.
pub const SOAK_ENV: &str = "OUTBOX_CHAOS_SOAK";

/// `ci` normally, `soak` with `OUTBOX_CHAOS_SOAK=1`.
pub fn soak<T>(ci: T, soak: T) -> T {
    if std::env::var(SOAK_ENV).is_ok_and(|v| v.trim() == "1") {
        soak
    } else {
        ci
    }
}

/// A scenario's CI size: `postgres` on PostgreSQL, `others` on MariaDB and SQLite (to
/// keep the suite's time in CI small), `soak_size` with `OUTBOX_CHAOS_SOAK=1` everywhere.
pub fn ci_size<B: Backend, T>(postgres: T, others: T, soak_size: T) -> T {
    let ci = if B::BACKEND_NAME == "postgres" {
        postgres
    } else {
        others
    };
    soak(ci, soak_size)
}

/// One `#[tokio::test]` per listed backend, each running the generic scenario
/// `$scenario::<Backend>(args)`, so a scenario's body is written once:
///
/// ```ignore
/// chaos_tests!(relay_crash("relay.after_produce") {
///     chaos_b_relay_kill_after_produce: Postgres,
///     chaos_b_relay_kill_after_produce_mysql: MySql,
///     chaos_b_relay_kill_after_produce_sqlite: Sqlite,
/// });
/// ```
#[macro_export]
macro_rules! chaos_tests {
    // `$args` is the parenthesised argument list, one token tree.
    ($scenario:ident $args:tt { $($name:ident: $db:ty),+ $(,)? }) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                $scenario::<$db> $args.await;
            }
        )+
    };
}

/// The state machine with short waits: backoff 200 ms doubling to 2 s, relay failures
/// 100 ms doubling to 1 s, lease 5 s.
pub fn chaos_config() -> OutboxConfig {
    OutboxConfig {
        backoff: Backoff {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(2),
        },
        relay_poll_interval: Duration::from_millis(100),
        relay_lease: Duration::from_secs(5),
        relay_failure_backoff: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        },
        consumer_failure_backoff: Backoff {
            base: Duration::from_millis(50),
            cap: Duration::from_secs(1),
        },
        relay_batch_size: 200,
        // Events no consumer can handle wait 2 s, not an hour, before they are dead.
        waiting: Waiting {
            recheck: Duration::from_millis(300),
            grace: Duration::from_secs(2),
        },
        ..OutboxConfig::default()
    }
}

/// Client settings for the scenarios: short sessions (a SIGKILLed member leaves the
/// group within 3 s), short produce timeouts (an outage ends rounds quickly, so the
/// give-back path runs), and no topic auto-creation by the relay's producer (librdkafka
/// asks for it by default): topics are created by the scenario, as an operator does on a
/// cluster with auto-creation off, so a broker that lost its topics (scenario k) does
/// not get one with its own default partition count from the relay's first metadata
/// request.
pub fn chaos_kafka(brokers: &str) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .producer_property("allow.auto.create.topics", "false")
        .consumer_property("session.timeout.ms", "3000")
        .consumer_property("heartbeat.interval.ms", "300")
        .consumer_property("topic.metadata.refresh.interval.ms", "1000")
        .producer_property("message.timeout.ms", "5000")
        .producer_property("linger.ms", "1")
}

/// Counters a worker writes to its stats file: the sums of its relays' `RelayStats`
/// (`published` … `idles`, `producer_restarts`, `failed_probes`, `redelivered_lost`) and
/// its consumer's `ConsumerStats` (`handled` … `db_retries`, `mismatched`, `not_due`,
/// `republished`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerStats {
    pub published: u64,
    pub released: u64,
    pub relay_dead: u64,
    pub fenced: u64,
    pub rounds: u64,
    pub relay_errors: u64,
    pub handled: u64,
    pub duplicates: u64,
    pub deferred: u64,
    pub retried: u64,
    pub consumer_dead: u64,
    pub skipped: u64,
    pub db_retries: u64,
    /// Consumer: records whose headers, key or payload disagree with the row their
    /// event id names (`ConsumerStats::mismatched`).
    #[serde(default)]
    pub mismatched: u64,
    /// Consumer: records for a row pending and not yet due (`ConsumerStats::not_due`).
    #[serde(default)]
    pub not_due: u64,
    /// Relay: producers replaced because the old one could no longer work
    /// (`RelayStats::producer_restarts`).
    #[serde(default)]
    pub producer_restarts: u64,
    /// Relay: broker probes that failed while it waited for its producer
    /// (`RelayStats::failed_probes`).
    #[serde(default)]
    pub failed_probes: u64,
    /// Relay: times it found nothing due and went idle (`RelayStats::idles`).
    #[serde(default)]
    pub idles: u64,
    /// Relay: rows made pending again because the partition log went back (records lost
    /// with the broker: `RelayStats::redelivered_lost`).
    #[serde(default)]
    pub redelivered_lost: u64,
    /// Consumer: published predecessors made pending again because a later event of
    /// their key arrived first (`ConsumerStats::republished`).
    #[serde(default)]
    pub republished: u64,
    /// Written after a graceful shutdown.
    pub stopped: bool,
    /// How many times the file was written (a snapshot with a higher number was taken
    /// later).
    #[serde(default)]
    pub writes: u64,
}

/// The URL of database `name` on the shared server ([`PG_URL_ENV`]).
pub fn pg_url(name: &str) -> String {
    let base = std::env::var(PG_URL_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.to_owned());
    with_database(&base, name)
}

/// The URL of database `name` on the shared MySQL/MariaDB server ([`MYSQL_URL_ENV`]).
pub fn mysql_url(name: &str) -> String {
    let base = std::env::var(MYSQL_URL_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_MYSQL_URL.to_owned());
    with_database(&base, name)
}

fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// One scenario's world: a fresh database with the `task` outbox, `effects` and the
/// ledger; a catalog with a fresh prefix; the `task` topic created.
pub struct ChaosEnv<B: ChaosBackend> {
    pub db: B::TestDb,
    pub catalog: Catalog,
    pub prefix: String,
    pub table: String,
    pub topic: String,
}

impl<B: ChaosBackend> ChaosEnv<B> {
    /// Sets up a scenario on `broker` with a `partitions`-partition task topic.
    pub async fn new(broker: &TestBroker, partitions: i32) -> ChaosEnv<B> {
        let db = B::TestDb::create().await;
        let (catalog, prefix) = prepare(db.pool(), broker, partitions).await;
        let route = catalog.route("task").expect("task route").clone();
        ChaosEnv {
            db,
            catalog,
            prefix,
            table: route.table().to_string(),
            topic: route.topic().to_string(),
        }
    }

    pub fn pool(&self) -> &Pool<B> {
        self.db.pool()
    }

    /// The database's URL, for worker processes.
    pub fn url(&self) -> String {
        B::url(&self.db)
    }

    /// Service `task`'s rows by status.
    pub async fn counts(&self) -> outbox_runtime::StatusCounts {
        B::counts(
            self.pool(),
            &self.table.parse().unwrap(),
            &"task".parse().unwrap(),
        )
        .await
        .expect("counting rows by status")
    }

    /// Pending rows leased by a relay (unexpired leases only when `unexpired`).
    pub async fn leased(&self, unexpired: bool) -> i64 {
        B::leased(self.pool(), &self.table, unexpired)
            .await
            .expect("counting leased rows")
    }

    /// The task outbox, with the scenario settings.
    pub fn outbox(&self) -> Outbox<Task, B> {
        Outbox::with_config(self.pool().clone(), &self.catalog, chaos_config()).expect("outbox")
    }

    /// Starts relays and/or consumers of `task` in this process.
    pub async fn runtime(
        &self,
        broker: &TestBroker,
        relays: usize,
        consumers: bool,
        config: OutboxConfig,
    ) -> outbox_runtime::RuntimeHandle {
        start_runtime(
            self.pool(),
            &self.catalog,
            &chaos_kafka(&broker.bootstrap_servers()),
            relays,
            consumers,
            config,
        )
        .await
    }

    /// The oracle's report.
    pub async fn check(&self, scenario: &str, duplicate_deliveries: u64) -> Report {
        oracle::check(scenario, self.pool(), &self.table, duplicate_deliveries).await
    }

    /// Waits until no row of `task` is open (pending or published).
    pub async fn settled(&self, timeout: Duration) {
        settled(self.pool(), &self.table, timeout).await
    }

    /// Waits until every row of `task` is consumed or dead (none pending or published):
    /// the "stuck 0" check. Returns how long it took, or, after `timeout`, a description
    /// of what is stuck: open rows by status and up to 10 of them (row id, event id, key,
    /// status, attempts, lease, last error).
    pub async fn quiesce(&self, timeout: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        loop {
            let (open, _) = oracle::open_rows(self.pool(), &self.table).await;
            if open == 0 {
                return Ok(t.elapsed());
            }
            if t.elapsed() >= timeout {
                return Err(self.stuck_rows().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Open (pending or published) rows of `task`, described for a failure message.
    pub async fn stuck_rows(&self) -> String {
        let rows = B::fetch_all(
            self.pool(),
            &self.table.parse().expect("table name"),
            &"task".parse().expect("service name"),
        )
        .await
        .expect("reading the outbox");
        let open: Vec<_> = rows.iter().filter(|r| !r.status.is_terminal()).collect();
        let pending = open
            .iter()
            .filter(|r| r.status == outbox_runtime::Status::Pending)
            .count();
        let leased = self.leased(false).await;
        let mut text = format!(
            "stuck {} of {} rows: {pending} pending (leased by a relay a moment later: \
             {leased}), {} published (acknowledged by the broker, never consumed)",
            open.len(),
            rows.len(),
            open.len() - pending
        );
        for r in open.iter().take(10) {
            text.push_str(&format!(
                "\n  row {} event {} key {:?} {:?} attempts {} published_at {:?} \
                 next_attempt_at {} last_error {:?}",
                r.id,
                r.event_id,
                r.key,
                r.status,
                r.attempts,
                r.published_at,
                r.next_attempt_at,
                r.last_error
            ));
        }
        text
    }

    /// The environment of a worker process for this scenario.
    pub fn worker(&self, broker: &TestBroker, role: &str) -> WorkerSpec {
        WorkerSpec {
            envs: vec![
                ("CHAOS_DB_URL".into(), self.url()),
                ("CHAOS_BROKERS".into(), broker.bootstrap_servers()),
                ("CHAOS_PREFIX".into(), self.prefix.clone()),
                ("CHAOS_ROLE".into(), role.into()),
            ],
        }
    }
}

/// Migrates `task`, creates `effects` and the ledger, and a catalog with a fresh prefix
/// whose task topic exists on `broker`.
pub async fn prepare<B: ChaosBackend>(
    pool: &Pool<B>,
    broker: &TestBroker,
    partitions: i32,
) -> (Catalog, String) {
    let prefix = format!("c{}-", unique_suffix());
    let catalog = Catalog::builder()
        .topic_prefix(&prefix)
        .group_prefix(&prefix)
        .build()
        .expect("catalog");
    outbox_runtime::migrate(pool, &catalog, ["task"])
        .await
        .expect("migrate");
    create_effects(pool).await;
    oracle::create_ledger(pool).await;
    let topic = catalog.route("task").expect("task").topic().to_string();
    broker.create_topic(&topic, partitions).await;
    (catalog, prefix)
}

/// Starts relays (`relays` of them; 0 = none) and/or a consumer of `task`.
pub async fn start_runtime<B: Backend>(
    pool: &Pool<B>,
    catalog: &Catalog,
    kafka: &KafkaConfig,
    relays: usize,
    consumers: bool,
    config: OutboxConfig,
) -> outbox_runtime::RuntimeHandle {
    OutboxRuntime::new(catalog.clone(), pool.clone(), kafka.clone())
        .config(config)
        .services(["task"])
        .relays(relays > 0)
        .relays_per_service(relays.max(1))
        .consumers(consumers)
        .migrate(false)
        // A worker may start while the fault holds the broker down: it runs and
        // connects when the broker returns, as before startup checked the broker.
        .broker_wait(Duration::from_secs(1))
        .on_unreachable_broker(outbox_runtime::OnUnreachableBroker::Warn)
        .start()
        .await
        .expect("runtime starts")
}

/// Waits until no row of `task` in `table` is open.
pub async fn settled<B: ChaosBackend>(pool: &Pool<B>, table: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (open, ledger) = oracle::open_rows(pool, table).await;
        if open == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not settled after {timeout:?}: {open} rows open, ledger {ledger}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it returns `Some`, panicking with `what` after `timeout`.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    crate::e2e::eventually(what, timeout, check).await
}

/// What a load run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadReport {
    pub committed: u64,
    pub rolled_back: u64,
    pub failed: u64,
    /// Slowest committed business transaction.
    pub max_latency: Duration,
}

/// A ledgered load: `writers` tasks publish `total` events over `keys` keys, rolling
/// back `rollback_pct` percent, optionally paced.
#[derive(Debug, Clone)]
pub struct Load {
    pub total: u64,
    pub keys: u32,
    pub writers: u32,
    pub rollback_pct: u32,
    /// Pause after each transaction of a writer (load pacing).
    pub pace: Duration,
    /// Key prefix.
    pub key_prefix: String,
}

impl Load {
    pub fn new(total: u64, keys: u32) -> Load {
        Load {
            total,
            keys,
            writers: 4,
            rollback_pct: 5,
            pace: Duration::ZERO,
            key_prefix: "k".into(),
        }
    }

    /// Runs the load to completion.
    pub async fn run<B: ChaosBackend>(&self, outbox: &Outbox<Task, B>) -> LoadReport {
        self.spawn(outbox).await.expect("load task")
    }

    /// Runs the load in the background.
    pub fn spawn<B: ChaosBackend>(
        &self,
        outbox: &Outbox<Task, B>,
    ) -> tokio::task::JoinHandle<LoadReport> {
        self.spawn_inner(outbox, None)
    }

    /// Runs the load in the background until `stop` turns true (or `total` events were
    /// written, whichever comes first): for scenarios that keep writing through a fault
    /// for a set time.
    pub fn spawn_until<B: ChaosBackend>(
        &self,
        outbox: &Outbox<Task, B>,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<LoadReport> {
        self.spawn_inner(outbox, Some(stop))
    }

    fn spawn_inner<B: ChaosBackend>(
        &self,
        outbox: &Outbox<Task, B>,
        stop: Option<Arc<AtomicBool>>,
    ) -> tokio::task::JoinHandle<LoadReport> {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..self.writers {
            let outbox = outbox.clone();
            let next = next.clone();
            let load = self.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = LoadReport::default();
                let stopped = || stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
                while !stopped() && next.fetch_add(1, Ordering::Relaxed) < load.total {
                    let (key, commit) = {
                        let mut rng = rand::thread_rng();
                        (
                            format!("{}{}", load.key_prefix, rng.gen_range(0..load.keys)),
                            rng.gen_range(0..100) >= load.rollback_pct,
                        )
                    };
                    let t = Instant::now();
                    match publish_ledgered(
                        &outbox,
                        &key,
                        Script::default(),
                        PublishOptions::default(),
                        commit,
                    )
                    .await
                    {
                        Written::Committed(..) => {
                            r.committed += 1;
                            r.max_latency = r.max_latency.max(t.elapsed());
                        }
                        Written::RolledBack => r.rolled_back += 1,
                        Written::Failed => r.failed += 1,
                    }
                    if !load.pace.is_zero() {
                        tokio::time::sleep(load.pace).await;
                    }
                }
                r
            }));
        }
        tokio::spawn(async move {
            let mut total = LoadReport::default();
            for t in tasks {
                let r = t.await.expect("writer panicked");
                total.committed += r.committed;
                total.rolled_back += r.rolled_back;
                total.failed += r.failed;
                total.max_latency = total.max_latency.max(r.max_latency);
            }
            total
        })
    }
}

/// How to start a `chaos-worker` process.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    envs: Vec<(String, String)>,
}

impl WorkerSpec {
    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: impl ToString) -> Self {
        self.envs.push((k.into(), v.to_string()));
        self
    }

    /// Relay lease.
    pub fn lease(self, lease: Duration) -> Self {
        self.env("CHAOS_LEASE_MS", lease.as_millis())
    }

    /// Freeze at failpoint `point` after letting `skip` hits pass; forever when
    /// `for_ms` is 0.
    pub fn freeze(self, point: &str, skip: u64, for_ms: u64) -> Self {
        self.env("CHAOS_FREEZE", point)
            .env("CHAOS_FREEZE_SKIP", skip)
            .env("CHAOS_FREEZE_MS", for_ms)
    }

    /// Starts the worker binary at `exe` (`env!("CARGO_BIN_EXE_chaos-worker")`).
    pub fn spawn(self, exe: &str) -> Worker {
        let dir = tempfile::Builder::new()
            .prefix("chaos-worker-")
            .tempdir()
            .expect("temp dir");
        let stats = dir.path().join("stats.json");
        let marker = dir.path().join("frozen");
        let mut cmd = Command::new(exe);
        cmd.envs(self.envs)
            .env("CHAOS_STATS", &stats)
            .env("CHAOS_MARKER", &marker)
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
        Worker {
            child: Some(child),
            stats,
            marker,
            _dir: dir,
        }
    }
}

/// A running `chaos-worker` process, SIGKILLed on drop.
pub struct Worker {
    child: Option<Child>,
    stats: PathBuf,
    marker: PathBuf,
    _dir: tempfile::TempDir,
}

impl Worker {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// The last counters it wrote.
    pub fn stats(&self) -> Option<WorkerStats> {
        read_stats(&self.stats)
    }

    /// Whether it reached its freeze point.
    pub fn frozen(&self) -> bool {
        self.marker.exists()
    }

    /// Waits until it reached its freeze point.
    pub async fn wait_frozen(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.frozen() {
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("worker exited before freezing: {status}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "worker did not reach its freeze point within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a snapshot of its counters taken after this call (the writer thread keeps
    /// running while the runtime is frozen).
    pub async fn fresh_stats(&self, timeout: Duration) -> WorkerStats {
        let w0 = self.stats().map_or(0, |s| s.writes);
        self.wait_stats("a fresh snapshot", timeout, |s| s.writes >= w0 + 2)
            .await
    }

    /// Waits up to `timeout` for counters that satisfy `f`; `None` if they never did
    /// (for checks that report a failure instead of panicking on the spot).
    pub async fn poll_stats(
        &self,
        timeout: Duration,
        f: impl Fn(&WorkerStats) -> bool,
    ) -> Option<WorkerStats> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.stats().filter(|s| f(s)) {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until its counters satisfy `f`.
    pub async fn wait_stats(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&WorkerStats) -> bool,
    ) -> WorkerStats {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.stats().filter(|s| f(s)) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "worker stats never showed {what} within {timeout:?}: {:?} ({})",
                self.stats(),
                std::fs::read_to_string(&self.marker)
                    .unwrap_or_default()
                    .trim()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGSTOP.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn cont(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGTERM (graceful shutdown), waits for its exit up to `timeout` (then SIGKILL),
    /// and returns its final counters.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<WorkerStats> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        if let Some(c) = &mut self.child {
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() >= deadline {
                    eprintln!("worker ignored SIGTERM for {timeout:?}; killing it");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.kill();
        self.stats()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cont();
        self.kill();
    }
}

fn read_stats(path: &Path) -> Option<WorkerStats> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A private PostgreSQL server (initdb in a temporary directory, a free port, run as
/// the `postgres` user when we are root), for the database-restart scenario: the shared
/// server on 5432 is never restarted. Stopped (immediate) on drop.
pub struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PrivatePg {
    /// `None` when no PostgreSQL server binaries are installed.
    pub fn start() -> Option<PrivatePg> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())?;
        let dir = tempfile::Builder::new()
            .prefix("outbox-pg-")
            .tempdir()
            .expect("temp dir");
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "chown of the private PostgreSQL dir failed"
            );
        }
        let port = free_port();
        let pg = PrivatePg {
            dir,
            bin,
            port,
            as_postgres,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nmax_connections = 100\nshared_buffers = 32MB\n",
            pg.dir.path().display()
        );
        let conf_path = pg.dir.path().join("data").join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("writing postgresql.conf");
        pg.pg_ctl(&["start", "-w", "-t", "60"]);
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        let log = self.dir.path().join("pg.log").display().to_string();
        let mut all = vec!["-D", &data, "-l", &log];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    /// `pg_ctl restart -m immediate`: every connection dies, uncommitted work is lost,
    /// committed work survives (crash recovery).
    pub fn restart_immediate(&self) {
        self.pg_ctl(&["restart", "-m", "immediate", "-w", "-t", "60"]);
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let data = self.data();
        let exe = self.bin.join("pg_ctl");
        let args = ["-D", data.as_str(), "stop", "-m", "immediate", "-w"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        };
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sums `duplicates` over the consumers of some runtimes.
pub fn consumer_duplicates(handles: &[&outbox_runtime::RuntimeHandle]) -> u64 {
    oracle::duplicates_of(handles.iter().filter_map(|h| h.consumer_stats("task")))
}

/// Sums a relay counter over the relays of some runtimes.
pub fn relay_sum(
    handle: &outbox_runtime::RuntimeHandle,
    f: impl Fn(&outbox_runtime::RelayStats) -> &AtomicU64,
) -> u64 {
    handle
        .relay_stats("task")
        .iter()
        .map(|s| f(s).load(Ordering::Relaxed))
        .sum()
}

/// Initialises test logging (`OUTBOX_TEST_LOG`, default `warn`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_TEST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_urls() {
        assert_eq!(
            super::with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://u@h:1/test?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(super::with_database("postgres://h", "x"), "postgres://h/x");
    }
}
