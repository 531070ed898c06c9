//! Every input path checked, on every backend (PostgreSQL, MySQL/MariaDB, SQLite), each
//! on a fresh database:
//! - `publish_raw` refuses an unknown event type, another service's type and a version
//!   newer than the catalog's, before writing anything: the business transaction
//!   stays usable and commits its other writes;
//! - keys are trimmed, and an empty or blank key is stored as no key (NULL);
//! - a poison payload ends dead with a `last_error` that says where and why, never the
//!   values it carried (a consumer run on librdkafka's in-process mock cluster).
//!
//! Waiting is polling against a deadline, never a sleep used as synchronisation.

use std::time::Duration;

use outbox_runtime::{
    Backend, Catalog, Error, EventId, KafkaConfig, Outbox, OutboxRow, OutboxRuntime,
    PublishOptions, RawEvent, SqlValue, Status,
};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::TestDatabase;
use outbox_tests::e2e::{eventually, prepare, test_config};
use outbox_tests::services::{ActiveScheduler, Script, Task, TaskCreated};
use sqlx::Pool;

/// What a leaked payload would look like; no part of it may reach `last_error`.
const SECRET: &str = "bob@example.com IBAN DE89370400440532013000";
const SECRET_PARTS: &[&str] = &["bob@", "example.com", "IBAN", "DE89", "370400440532013000"];

/// A fresh database with every outbox table of the test services, and a table for
/// the business writes.
async fn setup<T: TestDatabase>() -> (T, Catalog) {
    let db = T::create().await;
    let catalog = Catalog::global().expect("the test catalog is valid");
    outbox_runtime::migrate(
        db.pool(),
        &catalog,
        catalog.routes().map(|r| r.service().as_str()),
    )
    .await
    .expect("migrate");
    let mut conn = db.pool().acquire().await.expect("connection");
    T::DB::execute_portable(
        &mut conn,
        "CREATE TABLE business (id VARCHAR(64) NOT NULL)",
        &[],
    )
    .await
    .expect("creating the business table");
    (db, catalog)
}

fn raw(event_type: &str, version: u32, key: Option<&str>) -> RawEvent {
    RawEvent {
        event_type: event_type.into(),
        version,
        key: key.map(str::to_owned),
        payload: r#"{"task_id":"t","seq":1}"#.into(),
        max_retries: None,
    }
}

fn task(task_id: &str) -> TaskCreated {
    TaskCreated {
        task_id: task_id.into(),
        seq: 0,
        script: Script::default(),
    }
}

async fn row<DB: Backend>(pool: &Pool<DB>, table: &str, id: EventId) -> OutboxRow {
    DB::fetch(pool, &table.parse().unwrap(), id.0)
        .await
        .expect("fetch")
        .unwrap_or_else(|| panic!("row {id} exists"))
}

async fn rows_of<DB: Backend>(pool: &Pool<DB>, table: &str, service: &str) -> Vec<OutboxRow> {
    DB::fetch_all(pool, &table.parse().unwrap(), &service.parse().unwrap())
        .await
        .expect("fetch_all")
}

/// Deletes business row `id`; returns whether it existed (committed).
async fn take_business_row<DB: Backend>(pool: &Pool<DB>, id: &str) -> bool {
    let mut conn = pool.acquire().await.expect("connection");
    DB::execute_portable(
        &mut conn,
        "DELETE FROM business WHERE id = ?",
        &[SqlValue::from(id)],
    )
    .await
    .expect("delete")
        == 1
}

/// Asserts the results of publishing an unknown type, another service's type, a too
/// new version and an ungrammatical name are those refusals; the messages name what
/// was given and say the fix.
fn assert_refusals(results: [Result<EventId, Error>; 4]) {
    let [unknown, other, newer, bad_name] = results;
    match unknown {
        Err(e @ Error::UnknownEventType { .. }) => {
            let Error::UnknownEventType {
                event_type,
                service,
                known,
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(
                (event_type.as_str(), service.as_str(), known.clone()),
                ("TaskDeleted", "task", vec!["TaskCreated".to_owned()])
            );
            assert_eq!(
                e.to_string(),
                "event type `TaskDeleted` is not in the route catalog, so no consumer could \
                 handle it; publish one of the types of service `task` (`TaskCreated`) or \
                 declare this one with #[outbox_event(service = ...)]"
            );
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    match other {
        Err(e @ Error::EventOfOtherService { .. }) => assert_eq!(
            e.to_string(),
            "event type `NotificationRequested` belongs to service `notification`, not \
             `task`; publish it through the outbox of `notification` \
             (`Outbox<outbox_tests::services::Notification, _>`)"
        ),
        other => panic!("expected EventOfOtherService, got {other:?}"),
    }
    match newer {
        Err(e @ Error::EventVersionTooNew { .. }) => assert_eq!(
            e.to_string(),
            "event `TaskCreated` has schema version 2, newer than the route catalog's 1, so \
             its handler could not read it; publish version 1 or lower, or deploy the event \
             type's version 2 first"
        ),
        other => panic!("expected EventVersionTooNew, got {other:?}"),
    }
    assert!(
        matches!(bad_name, Err(Error::InvalidName(_))),
        "{bad_name:?}"
    );
}

/// `publish_raw` refuses what no consumer could handle, before writing: through an
/// `OutboxTx` and through the caller's own transaction, each of which then commits its
/// business write and its valid event.
async fn publish_raw_refusals<T: TestDatabase>() {
    let (db, catalog) = setup::<T>().await;
    let pool = db.pool();
    let outbox = Outbox::<Task, T::DB>::new(pool.clone(), &catalog).unwrap();

    let mut tx = outbox.begin().await.unwrap();
    T::DB::execute_portable(
        &mut tx,
        "INSERT INTO business (id) VALUES (?)",
        &[SqlValue::from("b-1")],
    )
    .await
    .unwrap();
    assert_refusals([
        tx.publish_raw(&raw("TaskDeleted", 1, Some("k"))).await,
        tx.publish_raw(&raw("NotificationRequested", 1, Some("k")))
            .await,
        tx.publish_raw(&raw("TaskCreated", 2, Some("k"))).await,
        tx.publish_raw(&raw("Task Deleted", 1, Some("k"))).await,
    ]);
    let good = tx
        .publish_raw(&raw("TaskCreated", 1, Some("k")))
        .await
        .expect("a known type at the catalog's version");
    tx.commit().await.expect("the transaction is still usable");

    let mut tx = T::DB::begin(pool).await.unwrap();
    T::DB::execute_portable(
        &mut tx,
        "INSERT INTO business (id) VALUES (?)",
        &[SqlValue::from("b-2")],
    )
    .await
    .unwrap();
    assert_refusals([
        outbox
            .publish_raw(&mut tx, &raw("TaskDeleted", 1, None))
            .await,
        outbox
            .publish_raw(&mut tx, &raw("NotificationRequested", 1, None))
            .await,
        outbox
            .publish_raw(&mut tx, &raw("TaskCreated", 2, None))
            .await,
        outbox
            .publish_raw(&mut tx, &raw("Task Deleted", 1, None))
            .await,
    ]);
    let good_own = outbox
        .publish_raw(&mut tx, &raw("TaskCreated", 1, None))
        .await
        .unwrap();
    tx.commit()
        .await
        .expect("the caller's transaction is still usable");

    let rows = rows_of(pool, "task_outbox", "task").await;
    let mut ids: Vec<_> = rows.iter().map(|r| r.event_id).collect();
    ids.sort();
    let mut want = vec![good.0, good_own.0];
    want.sort();
    assert_eq!(ids, want, "only the valid events were written: {rows:?}");
    assert!(
        rows_of(pool, "notification_outbox", "notification")
            .await
            .is_empty(),
        "nothing reached the other service's outbox"
    );
    assert!(take_business_row(pool, "b-1").await, "b-1 committed");
    assert!(take_business_row(pool, "b-2").await, "b-2 committed");

    // An older version than the catalog's is fine (its handler reads old versions);
    // another service's own outbox takes its own types.
    let sched = Outbox::<ActiveScheduler, T::DB>::new(pool.clone(), &catalog).unwrap();
    let mut tx = sched.begin().await.unwrap();
    tx.publish_raw(&RawEvent {
        event_type: "scheduler.JobScheduled".into(),
        version: 1,
        key: None,
        payload: r#"{"job_id":"j","seq":1}"#.into(),
        max_retries: None,
    })
    .await
    .expect("version 1 of a version-2 type");
    match tx
        .publish_raw(&RawEvent {
            event_type: "scheduler.JobScheduled".into(),
            version: 3,
            key: None,
            payload: "{}".into(),
            max_retries: None,
        })
        .await
    {
        Err(Error::EventVersionTooNew {
            version: 3,
            known: 2,
            ..
        }) => {}
        other => panic!("expected EventVersionTooNew, got {other:?}"),
    }
    tx.commit().await.unwrap();
    assert_eq!(
        rows_of(pool, "active_scheduler_outbox", "active-scheduler")
            .await
            .len(),
        1
    );
    db.cleanup().await;
}

/// Keys are trimmed; empty and blank keys are no key (NULL), on every publish path;
/// the length limit applies to the trimmed key.
async fn keys_are_trimmed_and_blank_keys_are_none<T: TestDatabase>() {
    let (db, catalog) = setup::<T>().await;
    let pool = db.pool();
    let outbox = Outbox::<Task, T::DB>::new(pool.clone(), &catalog).unwrap();
    let mut tx = outbox.begin().await.unwrap();
    let mut expect: Vec<(EventId, Option<&str>, &str)> = Vec::new();

    // Typed publish: the event's `key = task_id`.
    for (key, stored) in [
        ("  t-1 \t", Some("t-1")),
        ("t-1", Some("t-1")),
        ("", None),
        ("   ", None),
        ("\n\t ", None),
        ("a b", Some("a b")),
    ] {
        let id = tx.publish(&task(key)).await.unwrap();
        expect.push((id, stored, "typed"));
    }
    // PublishOptions::key overrides the event's key; a blank override means no key.
    for (key, stored) in [(" k-2 ", Some("k-2")), ("  ", None), ("", None)] {
        let id = tx
            .publish_with(
                &task("t-9"),
                PublishOptions {
                    key: Some(key.into()),
                    ..PublishOptions::default()
                },
            )
            .await
            .unwrap();
        expect.push((id, stored, "options"));
    }
    // RawEvent::key.
    for (key, stored) in [
        (Some(" r-3\n"), Some("r-3")),
        (Some(""), None),
        (Some(" "), None),
        (None, None),
    ] {
        let id = tx.publish_raw(&raw("TaskCreated", 1, key)).await.unwrap();
        expect.push((id, stored, "raw"));
    }
    // The limit (255 bytes) counts the trimmed key.
    let long = "k".repeat(255);
    let id = tx
        .publish(&task(&format!("   {long}   ")))
        .await
        .expect("255 bytes once trimmed");
    expect.push((id, Some(long.as_str()), "typed, long"));
    match tx
        .publish_raw(&raw("TaskCreated", 1, Some(&format!(" {long}k "))))
        .await
    {
        Err(Error::KeyTooLong {
            len: 256,
            limit: 255,
            ..
        }) => {}
        other => panic!("expected KeyTooLong for 256 trimmed bytes, got {other:?}"),
    }
    tx.commit().await.unwrap();

    for (id, stored, path) in &expect {
        let r = row(pool, "task_outbox", *id).await;
        assert_eq!(r.key.as_deref(), *stored, "{path} publish, row {r:?}");
    }
    let keyless = rows_of(pool, "task_outbox", "task")
        .await
        .iter()
        .filter(|r| r.key.is_none())
        .count();
    assert_eq!(
        keyless, 8,
        "blank keys are stored as NULL, not as one shared key"
    );
    db.cleanup().await;
}

/// A poison payload goes dead with serde's reason, redacted: the category, position,
/// expected type and field names are there, the payload's values are not.
async fn poison_payload_reason_carries_no_values<T: TestDatabase>() {
    let db = T::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let config = test_config();
    let outbox =
        Outbox::<Task, T::DB>::with_config(pool.clone(), &catalog, config.clone()).expect("outbox");
    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(config)
    .services(["task"])
    .start()
    .await
    .expect("runtime");

    let poisons = [
        // Wrong type: serde would quote the string.
        (
            format!(r#"{{"task_id":"p-1","seq":"{SECRET}"}}"#),
            "data error at line 1 column 68: invalid type: string, expected u32",
        ),
        // Out of range: serde would quote the number.
        (
            r#"{"task_id":"p-2","seq":4111111111111111}"#.to_owned(),
            "data error at line 1 column 39: invalid value: integer, expected u32",
        ),
        // Not JSON after a value: serde's syntax messages quote nothing.
        (
            format!(r#"{{"task_id":"{SECRET}" oops}}"#),
            "syntax error at line 1 column 58: expected `,` or `}`",
        ),
        // A required field missing: its name comes from the type.
        (
            format!(r#"{{"note":"{SECRET}"}}"#),
            "data error at line 1 column 54: missing field `task_id`",
        ),
    ];
    let mut tx = outbox.begin().await.unwrap();
    let mut ids = Vec::new();
    for (i, (payload, _)) in poisons.iter().enumerate() {
        let id = tx
            .publish_raw(&RawEvent {
                event_type: "TaskCreated".into(),
                version: 1,
                key: Some(format!("poison-{i}")),
                payload: payload.clone(),
                max_retries: None,
            })
            .await
            .unwrap();
        ids.push(id);
    }
    let neighbour = tx.publish(&task("neighbour")).await.unwrap();
    tx.commit().await.unwrap();

    let settled = eventually("the poisons dead", Duration::from_secs(60), || async {
        let mut rows = Vec::new();
        for id in ids.iter().chain([&neighbour]) {
            let r = row(&pool, "task_outbox", *id).await;
            if !r.status.is_terminal() {
                return None;
            }
            rows.push(r);
        }
        Some(rows)
    })
    .await;
    runtime.shutdown().await.expect("shutdown");

    for (r, (_, reason)) in settled.iter().zip(&poisons) {
        assert_eq!(r.status, Status::Dead, "{r:?}");
        assert_eq!(r.attempts, 1, "dead at once, not retried: {r:?}");
        let stored = r.last_error.as_deref().unwrap_or_default();
        assert_eq!(
            stored,
            format!("undecodable payload for event type `TaskCreated` v1: {reason}"),
        );
        for part in SECRET_PARTS {
            assert!(!stored.contains(part), "`{part}` leaked into {stored:?}");
        }
    }
    assert_eq!(settled[poisons.len()].status, Status::Consumed);
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------
// Every behaviour on every backend.
// ---------------------------------------------------------------------------------

outbox_tests::every_backend!(
    publish_raw_refusals,
    keys_are_trimmed_and_blank_keys_are_none,
    poison_payload_reason_carries_no_values,
);
