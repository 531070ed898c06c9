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

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outbox_runtime::backend::OutboxRow;
use outbox_runtime::{
    Catalog, EventId, KafkaConfig, Outbox, OutboxConfig, OutboxRuntime, RuntimeHandle, Status,
};
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

/// The test's outbox setup: a backlog of `KEYS × PER_KEY` events (with the scripted
/// failures), all relayed into the topic by a relay that keeps running.
struct Relayed {
    catalog: Catalog,
    config: OutboxConfig,
    kafka: KafkaConfig,
    relay: RuntimeHandle,
    total: u32,
}

async fn relayed_backlog<DB: TestBackend>(pool: &sqlx::Pool<DB>, broker: &TestBroker) -> Relayed {
    let catalog = prepare(pool, broker).await;
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
    Relayed {
        catalog,
        config,
        kafka,
        relay,
        total,
    }
}

/// Every event but the permanent failure has exactly one effect, in per-key order; that
/// one is dead with its reason.
async fn assert_settled_once<DB: TestBackend>(
    pool: &sqlx::Pool<DB>,
    rows: &BTreeMap<EventId, OutboxRow>,
    total: u32,
) {
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

    let effects = DB::effects(pool).await;
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
}

async fn all_settled<DB: TestBackend>(
    pool: &sqlx::Pool<DB>,
    catalog: &Catalog,
) -> BTreeMap<EventId, OutboxRow> {
    eventually("every event settled", Duration::from_secs(60), || {
        let (pool, catalog) = (pool.clone(), catalog.clone());
        async move {
            let rows = all_rows(&pool, &catalog).await;
            rows.values()
                .all(|r| matches!(r.status, Status::Consumed | Status::Dead))
                .then_some(rows)
        }
    })
    .await
}

async fn batches_settle_every_event_once<DB: TestBackend>(
    pool: sqlx::Pool<DB>,
    broker: TestBroker,
) {
    let Relayed {
        catalog,
        config,
        kafka,
        relay,
        total,
    } = relayed_backlog(&pool, &broker).await;
    // Keep the relay running: the failures go back to pending and are re-published.
    let consumer = OutboxRuntime::new(catalog.clone(), pool.clone(), kafka)
        .config(config)
        .services(["task"])
        .relays(false)
        .start()
        .await
        .unwrap();

    let rows = all_settled(&pool, &catalog).await;
    let stats = consumer.consumer_stats("task").unwrap().clone();
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
    assert_settled_once(&pool, &rows, total).await;

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
    // A batch handles a key's events one after the other (each one's open predecessor
    // is the one it just handled): only the successors of the two events retried wait.
    let waited = (PER_KEY - 11) + (PER_KEY - 13);
    let deferred = stats.deferred.load(Ordering::Relaxed);
    assert!(
        deferred <= u64::from(waited),
        "deferred {deferred} records, more than the {waited} successors of retried events"
    );
}

/// A batch that meets a row another transaction holds (as a relay's mark would) waits
/// for it holding no lock of its own, then settles; nothing is lost or done twice.
/// PostgreSQL and MySQL/MariaDB: on SQLite no one else can hold a row.
async fn batches_wait_out_a_held_row<DB: TestBackend>(pool: sqlx::Pool<DB>) {
    let broker = TestBroker::mock().await;
    let Relayed {
        catalog,
        config,
        kafka,
        relay,
        total,
    } = relayed_backlog(&pool, &broker).await;
    // Hold a row in the middle of the backlog, where the lane's batches are full.
    let table = catalog.route("task").expect("route").table().clone();
    let rows = all_rows(&pool, &catalog).await;
    let mut by_id: Vec<_> = rows.values().collect();
    by_id.sort_by_key(|r| r.id);
    let held = by_id[by_id.len() / 3].event_id;
    let mut holder = DB::begin(&pool).await.unwrap();
    DB::lock_for_consume(&mut *holder, &table, &"task".parse().unwrap(), held)
        .await
        .unwrap()
        .expect("row");

    let consumer = OutboxRuntime::new(catalog.clone(), pool.clone(), kafka)
        .config(config)
        .services(["task"])
        .relays(false)
        .start()
        .await
        .unwrap();
    let stats = consumer.consumer_stats("task").unwrap().clone();
    eventually(
        "a batch waiting for the held row",
        Duration::from_secs(30),
        || {
            let stats = stats.clone();
            async move { (stats.batch_lock_waits.load(Ordering::Relaxed) > 0).then_some(()) }
        },
    )
    .await;
    holder.commit().await.unwrap();

    let rows = all_settled(&pool, &catalog).await;
    consumer.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();
    assert_settled_once(&pool, &rows, total).await;
    assert!(stats.batched.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_batches_wait_out_a_held_row() {
    let db = TestPg::create().await;
    batches_wait_out_a_held_row(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_batches_wait_out_a_held_row() {
    let db = TestMySql::create().await;
    batches_wait_out_a_held_row(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_batches_settle_every_event_once() {
    let db = TestPg::create().await;
    batches_settle_every_event_once(db.pool().clone(), TestBroker::mock().await).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_batches_settle_every_event_once() {
    let db = TestMySql::create().await;
    batches_settle_every_event_once(db.pool().clone(), TestBroker::mock().await).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_batches_settle_every_event_once() {
    let db = TestSqlite::create().await;
    batches_settle_every_event_once(db.pool().clone(), TestBroker::mock().await).await;
    db.cleanup().await;
}

/// The same on a real broker (tansu): records come in fetches of their own sizes and
/// the relay's marks take real round trips, so batches and held rows fall differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_batches_settle_every_event_once_tansu() {
    let Some(broker) = TestBroker::tansu_or_skip("postgres_batches_settle_every_event_once_tansu")
    else {
        return;
    };
    let db = TestPg::create().await;
    batches_settle_every_event_once(db.pool().clone(), broker).await;
    db.cleanup().await;
}
