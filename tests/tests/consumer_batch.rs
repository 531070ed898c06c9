//! Consumer-side batching (`OutboxConfig::consumer_batch_size`), on every backend.
//!
//! A backlog is relayed into the topic first, then one consumer lane starts on it, so
//! records queue up and are settled many per transaction. Events that leave the happy
//! path sit among them: a transient failure, a panic, a permanent failure. Checks:
//! - batches did commit (`ConsumerStats::batched`), and the failures were settled one
//!   by one after their batch rolled back;
//! - every event that can succeed has exactly one effect (the rolled-back batch left
//!   none behind), in per-key order; the permanent failure is dead with its reason and
//!   has no effect.

use std::sync::atomic::Ordering;
use std::time::Duration;

use outbox_runtime::{KafkaConfig, Outbox, OutboxConfig, OutboxRuntime, Status};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::{TestMySql, TestPg, TestSqlite};
use outbox_tests::e2e::{
    all_rows, assert_key_order, effects_per_event, eventually, prepare, test_config, TestBackend,
};
use outbox_tests::services::{Script, Task, TaskCreated};

const KEYS: u32 = 8;
const PER_KEY: u32 = 25;

/// The scripted failure of event `seq` of key `k`, if any.
fn script(k: u32, seq: u32) -> Script {
    match (k, seq) {
        (1, 10) => Script {
            fail_times: 1,
            ..Script::default()
        },
        (2, 12) => Script {
            panic_times: 1,
            ..Script::default()
        },
        (3, 14) => Script {
            permanent: true,
            ..Script::default()
        },
        _ => Script::default(),
    }
}

async fn batches_settle_every_event_once<DB: TestBackend>(pool: sqlx::Pool<DB>) {
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let config = OutboxConfig {
        consumer_lanes: 1,
        consumer_batch_size: 16,
        ..test_config()
    };
    let kafka = KafkaConfig::new(broker.bootstrap_servers());
    let outbox = Outbox::<Task, DB>::with_config(pool.clone(), &catalog, config.clone()).unwrap();
    let total = KEYS * PER_KEY;
    // One transaction per round of keys, so ids of keys interleave.
    for seq in 0..PER_KEY {
        let mut tx = outbox.begin().await.unwrap();
        for k in 0..KEYS {
            tx.publish(&TaskCreated {
                task_id: format!("b{k}"),
                seq,
                script: script(k, seq),
            })
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }

    // Relay only: the whole backlog into the topic.
    let relay = OutboxRuntime::new(catalog.clone(), pool.clone(), kafka.clone())
        .config(config.clone())
        .services(["task"])
        .consumers(false)
        .start()
        .await
        .unwrap();
    eventually("the backlog published", Duration::from_secs(30), || {
        let (pool, catalog) = (pool.clone(), catalog.clone());
        async move {
            let rows = all_rows(&pool, &catalog).await;
            let published = rows
                .values()
                .filter(|r| r.status == Status::Published)
                .count();
            (published == total as usize).then_some(())
        }
    })
    .await;
    // Keep the relay running: the failures go back to pending and are re-published.
    let consumer = OutboxRuntime::new(catalog.clone(), pool.clone(), kafka)
        .config(config)
        .services(["task"])
        .relays(false)
        .start()
        .await
        .unwrap();

    let rows = eventually("every event settled", Duration::from_secs(60), || {
        let (pool, catalog) = (pool.clone(), catalog.clone());
        async move {
            let rows = all_rows(&pool, &catalog).await;
            rows.values()
                .all(|r| matches!(r.status, Status::Consumed | Status::Dead))
                .then_some(rows)
        }
    })
    .await;
    let stats = consumer.consumer_stats("task").unwrap().clone();
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();

    let dead: Vec<_> = rows.values().filter(|r| r.status == Status::Dead).collect();
    assert_eq!(
        dead.len(),
        1,
        "only the permanent failure is dead: {dead:?}"
    );
    assert_eq!(dead[0].key.as_deref(), Some("b3"));
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("scripted permanent failure")),
        "the dead row keeps its reason: {:?}",
        dead[0].last_error
    );

    let effects = DB::effects(&pool).await;
    let per_event = effects_per_event(&effects);
    assert_eq!(
        per_event.len(),
        total as usize - 1,
        "every event but the dead one has an effect"
    );
    assert!(
        per_event.values().all(|&n| n == 1),
        "no effect twice: {per_event:?}"
    );
    assert!(
        !effects.iter().any(|e| e.event_key == "b3" && e.seq == 14),
        "the dead event left no effect"
    );
    assert_key_order(&effects);

    let batched = stats.batched.load(Ordering::Relaxed);
    assert!(
        batched >= u64::from(total) / 4,
        "most records were settled in shared transactions, got {batched} of {total}"
    );
    assert!(
        stats.retried.load(Ordering::Relaxed) >= 2,
        "the transient failure and the panic were retried"
    );
    assert_eq!(stats.dead.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_batches_settle_every_event_once() {
    let db = TestPg::create().await;
    batches_settle_every_event_once(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_batches_settle_every_event_once() {
    let db = TestMySql::create().await;
    batches_settle_every_event_once(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_batches_settle_every_event_once() {
    let db = TestSqlite::create().await;
    batches_settle_every_event_once(db.pool().clone()).await;
    db.cleanup().await;
}
