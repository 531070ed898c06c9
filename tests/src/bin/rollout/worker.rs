//! The part of the rolling-deploy workers (`rollout-v1`, `rollout-v2`) that both
//! releases share: the service, the effect a handler records, and the process: a relay
//! and a consumer of service `rollout`, and a publisher of this release's events until
//! told to stop. Each release's own events and handlers live in its binary, so each
//! process has the catalog its release was built with, as in a real deploy.
//!
//! | variable | meaning |
//! |---|---|
//! | `ROLLOUT_DB_URL` | `postgres://…` or `mysql://…` |
//! | `ROLLOUT_BROKERS` | bootstrap servers |
//! | `ROLLOUT_PREFIX` | topic and group prefix |
//! | `ROLLOUT_DIR` | a directory: `<release>.json` (counters, rewritten every 50 ms) is written there; publishing stops when a file `stop-publishing` appears |
//! | `ROLLOUT_RECHECK_MS` | `OutboxConfig::waiting.recheck` |
//!
//! SIGTERM shuts the runtime down gracefully (as a deploy stops an old instance).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use outbox_runtime::{
    outbox_service, Backend, Catalog, EventId, HandlerContext, HandlerError, KafkaConfig, Outbox,
    OutboxConfig, OutboxRuntime, OutboxTx, SqlValue, Waiting,
};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::Pool;

/// The service being deployed.
#[outbox_service]
pub struct Rollout;

/// What differs between the two builds.
pub trait Release {
    /// `"v1"` or `"v2"`: recorded with every effect.
    const NAME: &'static str;
    /// Publishes this release's `n`-th event on `key`.
    fn publish<'a, DB: Backend>(
        tx: &'a mut OutboxTx<'_, Rollout, DB>,
        key: String,
        n: u32,
    ) -> BoxFuture<'a, outbox_runtime::Result<EventId>>;
}

/// The handler's effect: one row per handling, in the handler's transaction (the test
/// creates the table `rollout_effects`).
pub async fn record<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    release: &str,
    key: &str,
) -> Result<(), HandlerError> {
    let meta = ctx.meta().clone();
    ctx.execute(
        "INSERT INTO rollout_effects (event_id, event_type, version, handled_by, event_key) \
         VALUES (?, ?, ?, ?, ?)",
        &[
            SqlValue::from(meta.event_id.to_string()),
            SqlValue::from(meta.event_type),
            SqlValue::from(meta.version),
            SqlValue::from(release),
            SqlValue::from(key),
        ],
    )
    .await?;
    Ok(())
}

/// The key of a release's `n`-th event. The new release uses keys `k0`…`k7`; the old
/// one mostly keys of its own (`o0`…`o7`), so it keeps handling its own events on the
/// partitions it owns while the new release's events wait there, and every fourth
/// event on a shared key, so some keys mix both releases' events in one order.
fn key_of(release: &str, n: u32) -> String {
    if release == "v1" && !n.is_multiple_of(4) {
        format!("o{}", n % 8)
    } else {
        format!("k{}", n % 8)
    }
}

fn must(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("rollout worker: {name} is not set"))
}

/// The process.
pub fn main<R: Release>() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_TEST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let url = must("ROLLOUT_DB_URL");
        if url.starts_with("mysql://") {
            let pool = MySqlPoolOptions::new()
                .max_connections(8)
                .connect(&url)
                .await;
            serve::<R, _>(pool.expect("connecting")).await;
        } else {
            let pool = PgPoolOptions::new().max_connections(8).connect(&url).await;
            serve::<R, _>(pool.expect("connecting")).await;
        }
    });
}

async fn serve<R: Release, DB: Backend>(pool: Pool<DB>) {
    let prefix = must("ROLLOUT_PREFIX");
    let dir = PathBuf::from(must("ROLLOUT_DIR"));
    let recheck: u64 = must("ROLLOUT_RECHECK_MS")
        .parse()
        .expect("ROLLOUT_RECHECK_MS");
    let catalog = Catalog::builder()
        .topic_prefix(&prefix)
        .group_prefix(&prefix)
        .build()
        .expect("catalog");
    let config = OutboxConfig {
        relay_poll_interval: Duration::from_millis(100),
        waiting: Waiting {
            recheck: Duration::from_millis(recheck),
            ..Waiting::default()
        },
        ..OutboxConfig::default()
    };
    let kafka = KafkaConfig::new(must("ROLLOUT_BROKERS"))
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "500")
        .consumer_property("topic.metadata.refresh.interval.ms", "1000");
    let runtime = OutboxRuntime::new(catalog, pool, kafka)
        .config(config)
        .services(["rollout"])
        .migrate(false);
    let outbox: Outbox<Rollout, DB> = runtime.outbox().expect("outbox");
    let handle = runtime.start().await.expect("starting the runtime");
    let stats = handle.consumer_stats("rollout").cloned().expect("consumer");

    let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (published, done, dir) = (published.clone(), done.clone(), dir.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !dir.join("stop-publishing").exists() {
                let mut tx = outbox.begin().await.expect("begin");
                R::publish(&mut tx, key_of(R::NAME, n), n)
                    .await
                    .expect("publish");
                tx.commit().await.expect("commit");
                published.fetch_add(1, Ordering::SeqCst);
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let path = dir.join(format!("{}.json", R::NAME));
    let write = {
        let stats = stats.clone();
        let (published, done) = (published.clone(), done.clone());
        move || {
            let v = serde_json::json!({
                "published": published.load(Ordering::SeqCst),
                "done_publishing": done.load(Ordering::SeqCst),
                "handled": stats.handled.load(Ordering::Relaxed),
                "waiting": stats.waiting.load(Ordering::Relaxed),
                "dead": stats.dead.load(Ordering::Relaxed),
                "duplicates": stats.duplicates.load(Ordering::Relaxed),
            });
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, v.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tick.tick() => write(),
        }
    }
    publisher.abort();
    handle.shutdown().await.expect("shutdown");
    write();
}
