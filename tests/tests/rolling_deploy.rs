//! A rolling deploy, for real: two consumer instances of service `rollout` in one
//! consumer group, in processes of their own, built from two releases
//! (`rollout-v1`: `rollout.Noted` v1 and its handler; `rollout-v2`: `rollout.Noted` v2
//! and a new type `rollout.Renamed`, with handlers). Both publish while both run (the new
//! release on 8 keys, the old one on 8 keys of its own and on the new release's keys
//! for one event in four), so the old instance is handed events of the new release for
//! the partitions it owns, and keeps handling its own. Then the old instance stops (SIGTERM, as a deploy stops it).
//!
//! Checked: the old instance sent new events back to wait (its counter) and made none
//! dead; in the end every event is consumed, none is dead, each was handled exactly once
//! (one effect per event id), every `rollout.Renamed` and every version-2 event by the
//! new release, and each key's events took effect in their commit order. On PostgreSQL
//! and MariaDB, over librdkafka's mock cluster and over tansu (a real Kafka-protocol
//! broker).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_runtime::{ServiceName, Status, TableName};
use outbox_tests::broker::{unique_suffix, TestBroker};
use outbox_tests::chaos::ChaosBackend;
use outbox_tests::db::TestDatabase;
use outbox_tests::e2e::eventually;

/// One release's process, SIGKILLed on drop if still running.
struct Instance {
    child: Option<Child>,
    stats: std::path::PathBuf,
}

impl Instance {
    fn spawn(
        exe: &str,
        url: &str,
        brokers: &str,
        prefix: &str,
        dir: &Path,
        name: &str,
    ) -> Instance {
        let child = Command::new(exe)
            .env("ROLLOUT_DB_URL", url)
            .env("ROLLOUT_BROKERS", brokers)
            .env("ROLLOUT_PREFIX", prefix)
            .env("ROLLOUT_DIR", dir)
            .env("ROLLOUT_RECHECK_MS", "1000")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
        Instance {
            child: Some(child),
            stats: dir.join(format!("{name}.json")),
        }
    }

    fn stats(&self) -> serde_json::Value {
        std::fs::read(&self.stats)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn counter(&self, name: &str) -> u64 {
        self.stats()[name].as_u64().unwrap_or(0)
    }

    /// SIGTERM, and wait for a graceful exit.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "the instance exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "the instance ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn effects_ddl(backend: &str) -> &'static str {
    if backend == "mysql" {
        "CREATE TABLE rollout_effects (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
         event_id VARCHAR(64) NOT NULL, event_type VARCHAR(128) NOT NULL, version BIGINT NOT NULL, \
         handled_by VARCHAR(8) NOT NULL, event_key VARCHAR(64) NOT NULL)"
    } else {
        "CREATE TABLE rollout_effects (id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, \
         event_type TEXT NOT NULL, version BIGINT NOT NULL, handled_by TEXT NOT NULL, \
         event_key TEXT NOT NULL)"
    }
}

/// One effect: (effect id, event id, type, version, handled by).
type Effect = (i64, String, String, i64, String);

async fn effects(url: &str) -> Vec<Effect> {
    // Read through a pool of the right kind (the test's pool is generic).
    let sql =
        "SELECT id, event_id, event_type, version, handled_by FROM rollout_effects ORDER BY id";
    if url.starts_with("mysql://") {
        let pool = sqlx::MySqlPool::connect(url).await.unwrap();
        let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    }
}

async fn rolling_deploy<B: ChaosBackend>(broker: TestBroker) {
    let db = B::TestDb::create().await;
    let pool = db.pool();
    let url = B::url(&db);
    let prefix = format!("rollout{}-", unique_suffix());
    // This process is built without service `rollout` (only the releases have it): its
    // names by the catalog's default rules.
    let table: TableName = "rollout_outbox".parse().unwrap();
    let service: ServiceName = "rollout".parse().unwrap();
    broker
        .create_topic(&format!("{prefix}outbox.rollout"), 4)
        .await;
    B::migrate(pool, &table).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    B::execute_portable(&mut conn, effects_ddl(B::BACKEND_NAME), &[])
        .await
        .unwrap();
    drop(conn);

    let dir = tempfile::tempdir().unwrap();
    let brokers = broker.bootstrap_servers();
    let mut old = Instance::spawn(
        env!("CARGO_BIN_EXE_rollout-v1"),
        &url,
        &brokers,
        &prefix,
        dir.path(),
        "v1",
    );
    let mut new = Instance::spawn(
        env!("CARGO_BIN_EXE_rollout-v2"),
        &url,
        &brokers,
        &prefix,
        dir.path(),
        "v2",
    );

    // Both run, both publish; the old instance is handed new events and handles old ones.
    eventually(
        "the old instance to send new events back to wait and handle its own",
        Duration::from_secs(120),
        || async {
            (old.counter("waiting") >= 3
                && old.counter("handled") >= 3
                && new.counter("handled") >= 3)
                .then_some(())
        },
    )
    .await;
    std::fs::write(dir.path().join("stop-publishing"), b"").unwrap();
    eventually(
        "both to stop publishing",
        Duration::from_secs(30),
        || async {
            (old.stats()["done_publishing"] == true && new.stats()["done_publishing"] == true)
                .then_some(())
        },
    )
    .await;
    // The deploy stops the old instance.
    old.stop().await;
    let old_stats = old.stats();
    assert_eq!(
        old_stats["dead"], 0,
        "the old instance made events dead: {old_stats}"
    );

    let rows = eventually(
        "every event consumed by the new instance",
        Duration::from_secs(120),
        || async {
            let rows = B::fetch_all(pool, &table, &service).await.ok()?;
            rows.iter()
                .all(|r| r.status == Status::Consumed || r.status == Status::Dead)
                .then_some(rows)
        },
    )
    .await;
    new.stop().await;
    let new_stats = new.stats();
    let dead: Vec<_> = rows.iter().filter(|r| r.status == Status::Dead).collect();
    assert!(dead.is_empty(), "dead events: {dead:?}");
    let effects = effects(&url).await;
    let mut per_event: BTreeMap<&str, Vec<&Effect>> = BTreeMap::new();
    for e in &effects {
        per_event.entry(e.1.as_str()).or_default().push(e);
    }
    let (mut new_kinds, mut old_kinds) = (0, 0);
    for row in &rows {
        let id = row.event_id.to_string();
        let handled = per_event.get(id.as_str()).map_or(0, Vec::len);
        assert_eq!(
            handled, 1,
            "event {id} ({} v{}) handled {handled} times",
            row.event_type, row.version
        );
        let by = &per_event[id.as_str()][0].4;
        if row.event_type == "rollout.Renamed" || row.version == 2 {
            new_kinds += 1;
            assert_eq!(
                by, "v2",
                "{} v{} handled by {by}",
                row.event_type, row.version
            );
        } else {
            old_kinds += 1;
        }
    }
    // Per key, effects in commit (row id) order.
    let row_id: BTreeMap<String, (i64, Option<String>)> = rows
        .iter()
        .map(|r| (r.event_id.to_string(), (r.id, r.key.clone())))
        .collect();
    let mut last: BTreeMap<Option<String>, i64> = BTreeMap::new();
    for e in &effects {
        let (id, key) = &row_id[&e.1];
        let prev = last.insert(key.clone(), *id).unwrap_or(0);
        assert!(
            prev < *id,
            "key {key:?}: row {id} took effect after row {prev}"
        );
    }
    println!(
        "[{} over {}] {} events ({new_kinds} of the new release, {old_kinds} of the old), all \
         consumed once, none dead; the old instance sent {} back to wait and handled {}; the new \
         one handled {} (duplicates seen: old {}, new {})",
        B::BACKEND_NAME,
        broker.tier(),
        rows.len(),
        old_stats["waiting"],
        old_stats["handled"],
        new_stats["handled"],
        old_stats["duplicates"],
        new_stats["duplicates"],
    );
    assert!(new_kinds > 0 && old_kinds > 0);
    db.cleanup().await;
}

async fn on_mock<B: ChaosBackend>() {
    rolling_deploy::<B>(TestBroker::mock().await).await;
}

async fn on_tansu<B: ChaosBackend>() {
    let Some(broker) = TestBroker::tansu_or_skip("rolling_deploy") else {
        return;
    };
    rolling_deploy::<B>(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_over_the_mock_cluster() {
    on_mock::<sqlx::Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_over_the_mock_cluster() {
    on_mock::<sqlx::MySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_over_tansu() {
    on_tansu::<sqlx::Postgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_over_tansu() {
    on_tansu::<sqlx::MySql>().await;
}
