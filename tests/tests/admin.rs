//! Operators list dead letters with their reasons and replay them after a fix, on every
//! backend: the replayed event goes through relay and consumer again and is applied
//! once.

use std::time::Duration;

use outbox_runtime::{Admin, KafkaConfig, Outbox, OutboxRuntime, PublishOptions, Status};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::{TestMySql, TestPg, TestSqlite};
use outbox_tests::e2e::{eventually, prepare, test_config, TestBackend};
use outbox_tests::services::{Notification, NotificationRequested, Script};

async fn replay_after_fix<DB: TestBackend>(pool: sqlx::Pool<DB>) {
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    {
        let mut conn = pool.acquire().await.unwrap();
        DB::execute_portable(
            &mut conn,
            "CREATE TABLE fixes (event_key VARCHAR(64) NOT NULL, hits BIGINT NOT NULL)",
            &[],
        )
        .await
        .unwrap();
    }
    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(test_config())
    .services(["notification"])
    .start()
    .await
    .unwrap();
    let outbox =
        Outbox::<Notification, DB>::with_config(pool.clone(), &catalog, test_config()).unwrap();
    let admin = Admin::new(pool.clone(), catalog.clone());

    let mut tx = outbox.begin().await.unwrap();
    let broken = tx
        .publish_with(
            &NotificationRequested {
                user_id: "grace".into(),
                seq: 0,
                script: Script {
                    needs_fix: true,
                    ..Script::default()
                },
            },
            PublishOptions {
                max_retries: Some(0),
                ..PublishOptions::default()
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let dead = eventually("the event to go dead", Duration::from_secs(30), || async {
        let dead = admin.dead_letters("notification", 10).await.unwrap();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id, broken.0);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("no fix for grace yet"),
        "{:?}",
        dead[0].last_error
    );
    assert!(DB::effects(&pool).await.is_empty());
    // Replaying something that is not dead does nothing.
    assert!(!admin
        .replay("notification", outbox_runtime::EventId::new())
        .await
        .unwrap());

    // The operator fixes the cause, then replays.
    {
        let mut conn = pool.acquire().await.unwrap();
        DB::execute_portable(
            &mut conn,
            "INSERT INTO fixes (event_key, hits) VALUES ('grace', 0)",
            &[],
        )
        .await
        .unwrap();
    }
    assert!(admin.replay("notification", broken).await.unwrap());
    eventually(
        "the replayed event to be consumed",
        Duration::from_secs(30),
        || async {
            let row = DB::fetch(&pool, &"notification_outbox".parse().unwrap(), broken.0)
                .await
                .unwrap()?;
            (row.status == Status::Consumed).then_some(())
        },
    )
    .await;
    runtime.shutdown().await.unwrap();
    let effects = DB::effects(&pool).await;
    assert_eq!(effects.len(), 1);
    assert_eq!(effects[0].event_id, broken.to_string());
    assert_eq!(admin.counts("notification").await.unwrap().dead, 0);
    assert_eq!(admin.replay_dead("notification", 10).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_replay_after_fix() {
    let db = TestPg::create().await;
    replay_after_fix(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_replay_after_fix() {
    let db = TestMySql::create().await;
    replay_after_fix(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_replay_after_fix() {
    let db = TestSqlite::create().await;
    replay_after_fix(db.pool().clone()).await;
    db.cleanup().await;
}
