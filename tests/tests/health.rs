//! `RuntimeHandle::health()` as a readiness probe sees it, on every backend with the
//! mock cluster: ready once the relay and the consumer have worked; when the broker goes
//! down under traffic the relay reports a broker problem (not ready) while the database
//! still answers; when it comes back the runtime is ready again and the event is
//! handled.

use std::time::Duration;

use outbox_runtime::{Backend, Health, OutboxRuntime, Role, Side, Status};
use outbox_tests::broker::TestBroker;
use outbox_tests::chaos::chaos_kafka;
use outbox_tests::db::TestDatabase;
use outbox_tests::e2e::{eventually, prepare, test_config, TestBackend};
use outbox_tests::services::{Notification, NotificationRequested, Script};

fn relay(h: &Health) -> &outbox_runtime::ComponentHealth {
    h.components
        .iter()
        .find(|c| c.role == Role::Relay)
        .expect("a relay")
}

async fn reports_a_broker_outage<T: TestDatabase>()
where
    T::DB: TestBackend,
{
    let db = T::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        chaos_kafka(&broker.bootstrap_servers()),
    )
    .config(test_config())
    .services(["notification"])
    .start()
    .await
    .unwrap();
    let outbox = runtime_outbox::<T::DB>(&pool, &catalog);
    let publish = |seq: u32| {
        let outbox = outbox.clone();
        async move {
            let mut tx = outbox.begin().await.unwrap();
            let id = tx
                .publish(&NotificationRequested {
                    user_id: "ada".into(),
                    seq,
                    script: Script::default(),
                })
                .await
                .unwrap();
            tx.commit().await.unwrap();
            id
        }
    };
    let first = publish(0).await;
    let ready = eventually("ready, with progress", Duration::from_secs(30), || async {
        let h = runtime.health();
        (h.is_ready()
            && h.components.len() == 2
            && h.components.iter().all(|c| c.last_progress.is_some())
            && relay(&h).last_broker_ok.is_some())
        .then_some(h)
    })
    .await;
    assert_eq!(ready.components[0].role, Role::Relay);
    assert_eq!(ready.components[1].role, Role::Consumer);
    assert!(ready
        .components
        .iter()
        .all(|c| c.service == "notification" && c.running));
    eventually("the first event handled", Duration::from_secs(30), || {
        consumed(&pool, first.0)
    })
    .await;

    broker.mock_cluster().unwrap().broker_down(1).unwrap();
    let during = publish(1).await;
    let down = eventually(
        "a broker problem reported",
        Duration::from_secs(60),
        || async {
            let h = runtime.health();
            let r = relay(&h).clone();
            (r.problem.as_ref().is_some_and(|p| p.side == Side::Broker) && !h.is_ready())
                .then_some(r)
        },
    )
    .await;
    assert!(down.running);
    assert!(
        down.last_database_ok
            .is_some_and(|d| d < Duration::from_secs(10)),
        "the database still answers: {down:?}"
    );

    broker.mock_cluster().unwrap().broker_up(1).unwrap();
    eventually("ready again", Duration::from_secs(60), || async {
        runtime.health().is_ready().then_some(())
    })
    .await;
    // Bounded from outside, so that a timeout reports where the event stopped (the row,
    // the relay's and the consumer's counters, the health): it timed out once in CI.
    let handled = tokio::time::timeout(
        Duration::from_secs(60),
        eventually(
            "the event published during the outage handled",
            Duration::from_secs(120),
            || consumed(&pool, during.0),
        ),
    )
    .await;
    if handled.is_err() {
        let row = T::DB::fetch(&pool, &table(), during.0).await;
        panic!(
            "[{}] the event published during the outage was not handled within 60 s of the \
             broker's return; row: {row:?}; relay: {:?}; consumer: {:?}; health: {:?}",
            T::LABEL,
            runtime.relay_stats("notification"),
            runtime.consumer_stats("notification"),
            runtime.health()
        );
    }
    println!(
        "[{}] broker problem: {:?}; health after: {:?}",
        T::LABEL,
        down.problem,
        runtime.health()
    );
    runtime.shutdown().await.unwrap();
    db.cleanup().await;
}

fn table() -> outbox_runtime::TableName {
    "notification_outbox".parse().unwrap()
}

/// `Some` once the event `id` is consumed.
async fn consumed<DB: Backend>(pool: &sqlx::Pool<DB>, id: uuid::Uuid) -> Option<()> {
    let row = DB::fetch(pool, &table(), id).await.unwrap()?;
    (row.status == Status::Consumed).then_some(())
}

fn runtime_outbox<DB: outbox_runtime::Backend>(
    pool: &sqlx::Pool<DB>,
    catalog: &outbox_runtime::Catalog,
) -> outbox_runtime::Outbox<Notification, DB> {
    outbox_runtime::Outbox::with_config(pool.clone(), catalog, test_config()).unwrap()
}

outbox_tests::every_backend!(reports_a_broker_outage);
