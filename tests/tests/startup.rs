//! What `OutboxRuntime::start` and `Outbox` report when the setup is wrong, instead of
//! running silently:
//! - a broker address with nothing listening: `start` fails within `broker_wait`, naming
//!   the address (or warns and runs, with `OnUnreachableBroker::Warn`);
//! - handlers whose service's consumer does not run in this process: one warning
//!   listing them;
//! - a missing outbox table: `start` with `migrate(false)`, and `publish`, fail with an
//!   error that names `migrate` (PostgreSQL, MariaDB, SQLite);
//! - a fresh broker: `start` creates the topics of the services it runs (partitions
//!   configurable), so they exist before any produce and the consumer logs no
//!   `UnknownTopicOrPartition`.
//!
//! And settings given once take effect where they are given: the runtime's
//! `default_max_retries` and `max_payload_bytes` reach the outboxes taken from it
//! (`OutboxRuntime::outbox`; given to a runtime no outbox was taken from, they are a
//! warning at start), an `Outbox::with_config`'s reach that outbox.

use std::time::{Duration, Instant};

use outbox_runtime::{
    Backend, Catalog, Error, KafkaConfig, OnUnreachableBroker, Outbox, OutboxConfig, OutboxRuntime,
    RawEvent, TopicSettings,
};
use outbox_tests::broker::{unique_suffix, TestBroker};
use outbox_tests::db::{TestDatabase, TestPg};
use outbox_tests::logs::Logs;
use outbox_tests::services::{Task, TaskCreated};

/// `127.0.0.1:<port>` with nothing listening (bound, then released).
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    let port = listener.local_addr().expect("its address").port();
    drop(listener);
    format!("127.0.0.1:{port}")
}

/// A catalog with topics and groups of their own.
fn fresh_catalog() -> Catalog {
    let prefix = format!("t{}-", unique_suffix());
    Catalog::builder()
        .topic_prefix(&prefix)
        .group_prefix(&prefix)
        .build()
        .expect("the test catalog is valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_fails_within_the_wait_naming_the_address() {
    let db = TestPg::create().await;
    let address = dead_address();
    let wait = Duration::from_secs(2);
    let began = Instant::now();
    let result = OutboxRuntime::new(
        fresh_catalog(),
        db.pool().clone(),
        KafkaConfig::new(&address),
    )
    .services(["task"])
    .broker_wait(wait)
    .start()
    .await;
    let took = began.elapsed();
    let Err(e) = result else {
        panic!("start succeeded with no broker at {address}");
    };
    assert!(matches!(e, Error::BrokerUnreachable { .. }), "{e:?}");
    let message = e.to_string();
    assert!(message.contains(&address), "{message}");
    assert!(message.contains("broker_wait"), "{message}");
    assert!(
        took >= wait && took < wait + Duration::from_secs(3),
        "start took {took:?} with a wait of {wait:?}"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_only_warns_when_configured() {
    let logs = Logs::capture();
    let db = TestPg::create().await;
    let address = dead_address();
    let runtime = OutboxRuntime::new(
        fresh_catalog(),
        db.pool().clone(),
        KafkaConfig::new(&address),
    )
    .services(["task"])
    .broker_wait(Duration::from_millis(500))
    .on_unreachable_broker(OnUnreachableBroker::Warn)
    .start()
    .await
    .expect("start only warns");
    let warned = logs.lines_with("no Kafka broker answered");
    assert_eq!(warned.len(), 1, "{}", logs.text());
    assert!(
        warned[0].contains("WARN") && warned[0].contains(&address),
        "{warned:?}"
    );
    runtime.shutdown().await.expect("shutdown");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_without_a_consumer_here_are_listed_in_one_warning() {
    let logs = Logs::capture();
    let db = TestPg::create().await;
    let broker = TestBroker::mock().await;
    let runtime = task_runtime(&db, &broker).start().await.expect("start");
    let warned = logs.lines_with("handlers whose service's consumer does not run");
    assert_eq!(warned.len(), 1, "{}", logs.text());
    let line = &warned[0];
    assert!(line.contains("WARN"), "{line}");
    for other in [
        "on_memory_stored (service memory)",
        "on_notification_requested (service notification)",
        "on_agent_run_requested (service agent)",
        "on_job_scheduled (service active-scheduler)",
    ] {
        assert!(line.contains(other), "{other} missing from {line}");
    }
    assert!(
        !line.contains("on_task_created"),
        "task's consumer runs here: {line}"
    );
    runtime.shutdown().await.expect("shutdown");
    db.cleanup().await;
}

/// A missing table: `start` without migrating fails before the broker is asked (none
/// listens here), and so does publishing into it; both errors name `migrate`.
async fn missing_table_is_an_error_naming_migrate<T: TestDatabase>() {
    let db = T::create().await;
    let catalog = fresh_catalog();
    let e = OutboxRuntime::new(
        catalog.clone(),
        db.pool().clone(),
        KafkaConfig::new(dead_address()),
    )
    .services(["task"])
    .migrate(false)
    .start()
    .await
    .err()
    .expect("start with a missing table fails");
    assert!(
        matches!(e, Error::MissingTable { .. }),
        "{}: {e:?}",
        T::LABEL
    );
    assert!(
        e.to_string().contains("task_outbox") && e.to_string().contains("migrate"),
        "{}: {e}",
        T::LABEL
    );

    let outbox = Outbox::<Task, T::DB>::new(db.pool().clone(), &catalog).unwrap();
    let mut tx = outbox.begin().await.unwrap();
    let e = tx.publish(&created()).await.expect_err("publish fails");
    assert!(
        matches!(e, Error::MissingTable { .. }),
        "{}: {e:?}",
        T::LABEL
    );
    assert!(e.to_string().contains("migrate"), "{}: {e}", T::LABEL);
    drop(tx);
    db.cleanup().await;
}

outbox_tests::every_backend!(missing_table_is_an_error_naming_migrate);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_creates_the_topics_of_its_services_on_a_fresh_broker() {
    let Some(broker) = TestBroker::tansu_or_skip("start_creates_the_topics") else {
        return;
    };
    let logs = Logs::capture();
    let db = TestPg::create().await;
    let catalog = fresh_catalog();
    let topic = catalog.route("task").unwrap().topic().to_string();
    let other = catalog.route("memory").unwrap().topic().to_string();
    assert!(
        broker.partitions(&topic).await.is_err(),
        "{topic} exists before start"
    );

    let runtime = OutboxRuntime::new(
        catalog.clone(),
        db.pool().clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .services(["task"])
    .create_topics(Some(TopicSettings {
        partitions: Some(3),
        replication: None,
    }))
    .start()
    .await
    .expect("start");
    // Nothing was published: the topic exists because `start` created it.
    assert_eq!(
        broker.partitions(&topic).await,
        Ok(3),
        "{topic} after start"
    );
    assert!(
        broker.partitions(&other).await.is_err(),
        "only the services run here"
    );
    // The consumer subscribed to an existing topic: no UnknownTopicOrPartition.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let unknown = logs.lines_with("UnknownTopicOrPartition");
    assert!(unknown.is_empty(), "{unknown:?}");
    runtime.shutdown().await.expect("shutdown");

    // The broker's defaults when nothing is configured.
    let catalog = fresh_catalog();
    let topic = catalog.route("task").unwrap().topic().to_string();
    let runtime = OutboxRuntime::new(
        catalog,
        db.pool().clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .services(["task"])
    .start()
    .await
    .expect("start");
    let partitions = broker.partitions(&topic).await;
    assert!(
        matches!(partitions, Ok(n) if n >= 1),
        "{topic}: {partitions:?}"
    );
    runtime.shutdown().await.expect("shutdown");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_settings_take_effect_where_they_are_given() {
    let db = TestPg::create().await;
    let pool = db.pool().clone();
    let catalog = fresh_catalog();
    outbox_runtime::migrate(&pool, &catalog, ["task"])
        .await
        .expect("migrate");
    let table = catalog.route("task").unwrap().table().clone();
    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(dead_address()),
    )
    .config(OutboxConfig {
        default_max_retries: 3,
        max_payload_bytes: 2_000,
        ..OutboxConfig::default()
    });
    let defaults = OutboxConfig::default();
    let cases = [
        (
            "OutboxRuntime::config",
            runtime.outbox::<Task>().unwrap(),
            3,
            2_000,
        ),
        (
            "Outbox::with_config",
            Outbox::<Task, sqlx::Postgres>::with_config(
                pool.clone(),
                &catalog,
                OutboxConfig {
                    default_max_retries: 7,
                    max_payload_bytes: 5_000,
                    ..OutboxConfig::default()
                },
            )
            .unwrap(),
            7,
            5_000,
        ),
        (
            "Outbox::new",
            Outbox::<Task, sqlx::Postgres>::new(pool.clone(), &catalog).unwrap(),
            defaults.default_max_retries,
            defaults.max_payload_bytes,
        ),
    ];
    for (given, outbox, retries, limit) in cases {
        let raw = |len: usize| RawEvent {
            event_type: "TaskCreated".into(),
            version: 1,
            key: None,
            payload: format!("\"{}\"", "x".repeat(len - 2)),
            max_retries: None,
        };
        let mut tx = outbox.begin().await.unwrap();
        match tx.publish_raw(&raw(limit + 1)).await {
            Err(Error::PayloadTooLarge { limit: l, .. }) => assert_eq!(l, limit, "{given}"),
            other => panic!("{given}: a payload over {limit} bytes: {other:?}"),
        }
        let id = tx.publish_raw(&raw(limit)).await.expect(given);
        let typed = tx.publish(&created()).await.expect(given);
        tx.commit().await.unwrap();
        for id in [id, typed] {
            let row = sqlx::Postgres::fetch(&pool, &table, id.0)
                .await
                .unwrap()
                .expect("the row");
            assert_eq!(row.max_retries, retries as i32, "{given}");
        }
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_settings_no_outbox_was_taken_for_are_a_warning() {
    let logs = Logs::capture();
    let db = TestPg::create().await;
    let broker = TestBroker::mock().await;
    let runtime = task_runtime(&db, &broker)
        .config(OutboxConfig {
            default_max_retries: 3,
            ..OutboxConfig::default()
        })
        .start()
        .await
        .expect("start");
    let warned = logs.lines_with("no outbox was taken from it");
    assert_eq!(warned.len(), 1, "{}", logs.text());
    assert!(warned[0].contains("default_max_retries = 3"), "{warned:?}");
    runtime.shutdown().await.expect("shutdown");
    db.cleanup().await;
}

/// A runtime of service `task` alone, on `db` and the mock cluster `broker`.
fn task_runtime(db: &TestPg, broker: &TestBroker) -> OutboxRuntime<sqlx::Postgres> {
    OutboxRuntime::new(
        fresh_catalog(),
        db.pool().clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .services(["task"])
}

fn created() -> TaskCreated {
    TaskCreated {
        task_id: "t-1".into(),
        seq: 1,
        script: Default::default(),
    }
}
