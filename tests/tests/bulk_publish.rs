//! Bulk publishing (`publish_all`) on every backend: many events in a few multi-row
//! statements, rows in the slice's order (so each key's order holds), all or nothing
//! with the transaction, every event checked before anything is written, and the relay
//! and consumer handle them like any others.

use std::time::Duration;

use outbox_runtime::{Error, KafkaConfig, Outbox, OutboxRuntime, Status};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::{TestMySql, TestPg, TestSqlite};
use outbox_tests::e2e::{
    assert_key_order, effects_per_event, eventually, prepare, test_config, TestBackend,
};
use outbox_tests::services::{Script, Task, TaskCreated};

fn events(n: u32) -> Vec<TaskCreated> {
    (0..n)
        .map(|seq| TaskCreated {
            task_id: format!("k{}", seq % 7),
            seq,
            script: Script::default(),
        })
        .collect()
}

async fn bulk<DB: TestBackend>(pool: sqlx::Pool<DB>) {
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let outbox = Outbox::<Task, DB>::with_config(pool.clone(), &catalog, test_config()).unwrap();
    let table = "task_outbox".parse().unwrap();
    let service = "task".parse().unwrap();
    let all_rows = || DB::fetch_all(&pool, &table, &service);

    // Rolled back: nothing.
    let mut tx = outbox.begin().await.unwrap();
    tx.publish_all(&events(10)).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(all_rows().await.unwrap().is_empty());

    // One bad event (key too long) refuses the whole call before anything is written.
    let mut bad = events(3);
    bad[1].task_id = "x".repeat(300);
    let mut tx = outbox.begin().await.unwrap();
    let err = tx.publish_all(&bad).await.unwrap_err();
    assert!(matches!(err, Error::KeyTooLong { .. }), "{err}");
    tx.commit().await.unwrap();
    assert!(all_rows().await.unwrap().is_empty());

    // 1,200 events: three statements (500, 500, 200), rows in the slice's order.
    let mut tx = outbox.begin().await.unwrap();
    let ids = tx.publish_all(&events(1200)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ids.len(), 1200);
    let rows = all_rows().await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.event_id).collect::<Vec<_>>(),
        ids.iter().map(|id| id.0).collect::<Vec<_>>()
    );
    assert!(rows
        .iter()
        .all(|r| r.status == Status::Pending && r.key.is_some()));
    assert_eq!(
        rows[3].payload,
        r#"{"task_id":"k3","seq":3,"script":{"fail_times":0,"always_fail":false,"panic_times":0,"permanent":false,"needs_fix":false}}"#
    );

    // Relayed and handled like any others, each once, in key order.
    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(test_config())
    .services(["task"])
    .start()
    .await
    .unwrap();
    eventually(
        "every bulk event consumed",
        Duration::from_secs(120),
        || async {
            let c = DB::counts(&pool, &table, &service).await.unwrap();
            (c.consumed == 1200).then_some(())
        },
    )
    .await;
    runtime.shutdown().await.unwrap();
    let effects = DB::effects(&pool).await;
    assert_key_order(&effects);
    assert!(effects_per_event(&effects).values().all(|n| *n == 1));
    assert_eq!(effects.len(), 1200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_bulk_publish() {
    let db = TestPg::create().await;
    bulk(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_bulk_publish() {
    let db = TestMySql::create().await;
    bulk(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_bulk_publish() {
    let db = TestSqlite::create().await;
    bulk(db.pool().clone()).await;
    db.cleanup().await;
}
