//! Size limits, as the README promises them:
//! - `publish` refuses a payload over `max_payload_bytes` and a key over 255 bytes with a
//!   typed error, inside the business transaction (nothing is written);
//! - a record the broker can never take (over the producer's `message.max.bytes`) ends
//!   dead at once with the reason, and its neighbours flow.

use std::time::Duration;

use outbox_runtime::{
    Backend, Error, KafkaConfig, Outbox, OutboxConfig, OutboxRuntime, RawEvent, Status,
};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::TestPg;
use outbox_tests::e2e::{eventually, prepare, test_config};
use outbox_tests::services::{Script, Task, TaskCreated};
use sqlx::Postgres;

fn event(key: &str) -> TaskCreated {
    TaskCreated {
        task_id: key.into(),
        seq: 0,
        script: Script::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_refuses_oversized_payloads_and_keys_inside_the_transaction() {
    let db = TestPg::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let config = OutboxConfig {
        max_payload_bytes: 1_000,
        ..test_config()
    };
    let outbox = Outbox::<Task, Postgres>::with_config(pool.clone(), &catalog, config).unwrap();
    let mut tx = outbox.begin().await.unwrap();
    let big = RawEvent {
        event_type: "TaskCreated".into(),
        version: 1,
        key: None,
        payload: format!("{{\"pad\":\"{}\"}}", "x".repeat(2_000)),
        max_retries: None,
    };
    match tx.publish_raw(&big).await {
        Err(Error::PayloadTooLarge { size, limit, .. }) => assert!(size > limit && limit == 1_000),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    match tx.publish(&event(&"k".repeat(256))).await {
        Err(Error::KeyTooLong {
            len: 256,
            limit: 255,
            ..
        }) => {}
        other => panic!("expected KeyTooLong, got {other:?}"),
    }
    tx.publish(&event(&"k".repeat(255)))
        .await
        .expect("a 255-byte key is fine");
    tx.commit().await.unwrap();
    let rows = <Postgres as Backend>::fetch_all(
        &pool,
        &"task_outbox".parse().unwrap(),
        &"task".parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "only the valid event was written");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_the_broker_refuses_is_dead_at_once_with_the_reason() {
    let db = TestPg::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    // The outbox accepts 3 MB; the producer's `message.max.bytes` (1 MB default) does not.
    let config = OutboxConfig {
        max_payload_bytes: 3_000_000,
        ..test_config()
    };
    let outbox =
        Outbox::<Task, Postgres>::with_config(pool.clone(), &catalog, config.clone()).unwrap();
    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(config)
    .services(["task"])
    .start()
    .await
    .unwrap();
    let mut tx = outbox.begin().await.unwrap();
    let huge = tx
        .publish_raw(&RawEvent {
            event_type: "TaskCreated".into(),
            version: 1,
            key: Some("huge".into()),
            payload: format!("{{\"pad\":\"{}\"}}", "x".repeat(1_500_000)),
            max_retries: None,
        })
        .await
        .unwrap();
    let neighbour = tx.publish(&event("neighbour")).await.unwrap();
    tx.commit().await.unwrap();

    let (huge_row, neighbour_row) =
        eventually("both events settled", Duration::from_secs(30), || async {
            let h = <Postgres as Backend>::fetch(&pool, &"task_outbox".parse().unwrap(), huge.0)
                .await
                .unwrap()?;
            let n =
                <Postgres as Backend>::fetch(&pool, &"task_outbox".parse().unwrap(), neighbour.0)
                    .await
                    .unwrap()?;
            (h.status.is_terminal() && n.status.is_terminal()).then_some((h, n))
        })
        .await;
    runtime.shutdown().await.unwrap();
    assert_eq!(huge_row.status, Status::Dead, "{huge_row:?}");
    assert_eq!(huge_row.attempts, 1, "dead at once, not retried");
    let reason = huge_row.last_error.unwrap_or_default();
    assert!(reason.contains("the broker refuses the record"), "{reason}");
    assert_eq!(neighbour_row.status, Status::Consumed);
    db.cleanup().await;
}
