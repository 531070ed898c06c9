//! A relay and/or consumer of service `task` in a process of its own, for the crash
//! scenarios of the fault suite (`tests/tests/chaos_crash.rs`), which SIGKILL, SIGSTOP
//! and SIGCONT it. Configured by environment variables (see [`outbox_tests::chaos`]):
//!
//! | variable | meaning |
//! |---|---|
//! | `CHAOS_DB_URL` | the scenario's database: `postgres://…`, `mysql://…` or `sqlite://<file path>` |
//! | `CHAOS_BROKERS` | bootstrap servers |
//! | `CHAOS_PREFIX` | topic and group prefix of the scenario's catalog |
//! | `CHAOS_ROLE` | `relay`, `consumer` or `both` (of `task`), or `subscriber`: `notification`'s subscription to `task`'s events, on this database (its inbox) |
//! | `CHAOS_RETENTION_MS` | subscriber: sweep the inbox this often, deleting settled rows at once |
//! | `CHAOS_LEASE_MS` | relay lease |
//! | `CHAOS_STATS` | file the counters are written to (JSON, every 50 ms and at exit) |
//! | `CHAOS_FREEZE` | a failpoint name: freeze there (see below) |
//! | `CHAOS_FREEZE_SKIP` | hits of that failpoint to let pass first (default 0) |
//! | `CHAOS_FREEZE_MS` | how long to stay frozen; 0 or unset = until killed |
//! | `CHAOS_MARKER` | file created when the freeze begins (the test polls it) |
//! | `FAILPOINTS` | any other `fail` crate configuration, e.g. `relay.after_produce=1*sleep(60000)` |
//!
//! SIGTERM shuts the runtime down gracefully and writes the final counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_runtime::sqlite::sqlite_connect_options;
use outbox_runtime::Catalog;
use outbox_runtime::ConsumerStats;
use outbox_runtime::RelayStats;
use outbox_runtime::{outbox_handler, Backend, HandlerContext, HandlerError, OutboxRuntime};
use outbox_tests::chaos::{chaos_config, WorkerStats};
use outbox_tests::services::{record, Notification, TaskCreated};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::Pool;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn must(name: &str) -> String {
    var(name).unwrap_or_else(|| panic!("chaos-worker: {name} is not set"))
}

fn install_freeze() {
    let Some(point) = var("CHAOS_FREEZE") else {
        return;
    };
    let skip: u64 = var("CHAOS_FREEZE_SKIP")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let freeze_ms: u64 = var("CHAOS_FREEZE_MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let marker = must("CHAOS_MARKER");
    let hits = Arc::new(AtomicU64::new(0));
    let name = point.clone();
    fail::cfg_callback(point.clone(), move || {
        let n = hits.fetch_add(1, Ordering::SeqCst);
        if n != skip {
            return;
        }
        let _ = std::fs::write(&marker, format!("frozen at {name} (hit {})\n", n + 1));
        if freeze_ms == 0 {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        std::thread::sleep(Duration::from_millis(freeze_ms));
    })
    .unwrap_or_else(|e| panic!("chaos-worker: failpoint {point}: {e}"));
}

fn write_stats(path: &str, stats: &WorkerStats) {
    let tmp = format!("{path}.tmp");
    if std::fs::write(&tmp, serde_json::to_vec(stats).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// The subscription the `subscriber` role runs: `notification` handles `task`'s
/// events in its own database, recording the effect as `task`'s consumer does (the
/// oracle reads the subscriber's `effects`).
#[outbox_handler(subscriber = Notification)]
async fn notification_on_task_created<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: TaskCreated,
) -> Result<(), HandlerError> {
    record(ctx, &event.task_id, event.seq, &event.script).await
}

struct Counters {
    relays: Vec<Arc<RelayStats>>,
    consumer: Option<Arc<ConsumerStats>>,
    /// A subscriber's intake counters (its repeats add to `duplicates`).
    intake: Option<Arc<outbox_runtime::IntakeStats>>,
}

fn collect(counters: &Counters) -> WorkerStats {
    let mut s = WorkerStats::default();
    for r in &counters.relays {
        s.published += r.published.load(Ordering::Relaxed);
        s.released += r.released.load(Ordering::Relaxed);
        s.relay_dead += r.dead.load(Ordering::Relaxed);
        s.fenced += r.fenced.load(Ordering::Relaxed);
        s.rounds += r.rounds.load(Ordering::Relaxed);
        s.relay_errors += r.errors.load(Ordering::Relaxed);
        s.idles += r.idles.load(Ordering::Relaxed);
        s.producer_restarts += r.producer_restarts.load(Ordering::Relaxed);
        s.failed_probes += r.failed_probes.load(Ordering::Relaxed);
        s.redelivered_lost += r.redelivered_lost.load(Ordering::Relaxed);
    }
    if let Some(c) = &counters.consumer {
        s.handled = c.handled.load(Ordering::Relaxed);
        s.duplicates = c.duplicates.load(Ordering::Relaxed);
        s.deferred = c.deferred.load(Ordering::Relaxed);
        s.retried = c.retried.load(Ordering::Relaxed);
        s.consumer_dead = c.dead.load(Ordering::Relaxed);
        s.skipped = c.skipped.load(Ordering::Relaxed);
        s.db_retries = c.db_retries.load(Ordering::Relaxed);
        s.mismatched = c.mismatched.load(Ordering::Relaxed);
        s.not_due = c.not_due.load(Ordering::Relaxed);
        s.republished = c.republished.load(Ordering::Relaxed);
    }
    if let Some(i) = &counters.intake {
        s.duplicates += i.duplicates.load(Ordering::Relaxed);
    }
    s
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_TEST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let _scenario = fail::FailScenario::setup();
    install_freeze();
    // The handlers live in the library; name one so it is linked in.
    let _ = std::any::type_name::<TaskCreated>();

    let url = must("CHAOS_DB_URL");
    const CONNECTING: &str = "chaos-worker: connecting to the database";
    // The backend follows the URL's scheme.
    if let Some(path) = url.strip_prefix("sqlite://") {
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(sqlite_connect_options(path))
            .await
            .expect(CONNECTING);
        serve(pool).await;
    } else if url.starts_with("mysql://") {
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect(CONNECTING);
        serve(pool).await;
    } else {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect(CONNECTING);
        serve(pool).await;
    }
}

/// Runs the relay and/or consumer on `pool` until SIGTERM.
async fn serve<DB: Backend>(pool: Pool<DB>) {
    let prefix = must("CHAOS_PREFIX");
    let role = must("CHAOS_ROLE");
    let lease_ms: u64 = var("CHAOS_LEASE_MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let stats_path = must("CHAOS_STATS");
    let catalog = Catalog::builder()
        .topic_prefix(&prefix)
        .group_prefix(&prefix)
        .build()
        .expect("catalog");
    let mut config = chaos_config();
    config.relay_lease = Duration::from_millis(lease_ms);
    if let Some(every) = var("CHAOS_RETENTION_MS").and_then(|v| v.parse().ok()) {
        config.retention = Some(outbox_runtime::Retention {
            consumed_after: Duration::ZERO,
            dead_after: None,
            batch: 1000,
            interval: Duration::from_millis(every),
        });
    }
    let kafka = outbox_tests::chaos::chaos_kafka(&must("CHAOS_BROKERS"));
    let subscriber = role == "subscriber";
    let handle = OutboxRuntime::new(catalog, pool, kafka)
        .config(config)
        .services([if subscriber { "notification" } else { "task" }])
        .relays(role == "relay" || role == "both")
        .consumers(role == "consumer" || role == "both" || subscriber)
        .migrate(false)
        // A worker may start while the fault holds the broker down: it runs and
        // connects when the broker returns, as before startup checked the broker.
        .broker_wait(Duration::from_secs(1))
        .on_unreachable_broker(outbox_runtime::OnUnreachableBroker::Warn)
        .start()
        .await
        .expect("chaos-worker: starting the runtime");

    let counters = match handle.subscriber_stats("notification", "task") {
        Some((intake, settled)) => Counters {
            relays: Vec::new(),
            consumer: Some(settled.clone()),
            intake: Some(intake.clone()),
        },
        None => Counters {
            relays: handle.relay_stats("task").to_vec(),
            consumer: handle.consumer_stats("task").cloned(),
            intake: None,
        },
    };
    // Counters are written by a plain thread: a frozen runtime worker must not stop them.
    let counters = Arc::new(counters);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let counters = counters.clone();
        let stop = stop.clone();
        let path = stats_path.clone();
        std::thread::spawn(move || {
            let mut writes = 0;
            while !stop.load(Ordering::SeqCst) {
                writes += 1;
                let mut s = collect(&counters);
                s.writes = writes;
                write_stats(&path, &s);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    term.recv().await;
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join();
    let result = handle.shutdown().await;
    let mut last = collect(&counters);
    last.stopped = true;
    write_stats(&stats_path, &last);
    if let Err(e) = result {
        eprintln!("chaos-worker: shutdown error: {e}");
        std::process::exit(2);
    }
}
