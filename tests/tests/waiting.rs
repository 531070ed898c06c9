//! Events a consumer cannot handle yet wait instead of dying, and the design's retry
//! schedule, on every backend (real databases, librdkafka's mock cluster):
//!
//! - an event of an unknown type, and one of a version newer than the handler's, are
//!   sent back to wait (pending, `waiting_since` set, no attempt counted, the reason in
//!   `last_error`, `waiting` in the status view, counted by `Admin::waiting`); the later
//!   event of the same key waits behind them; after the grace period they are dead
//!   with the reason, and the key moves on;
//! - a handler that always fails is retried after 1, 2, 4, 8, 16, 32, 32, … s on the
//!   database clock and is dead at its 20th failure (the defaults): the first three gaps
//!   are waited out for real, the later ones read off the row and then hurried.

use std::sync::atomic::Ordering;
use std::time::Duration;

use outbox_runtime::backend::NewRow;
use outbox_runtime::{
    Admin, Backend, Backoff, EventId, Outbox, OutboxConfig, SqlValue, Status, Waiting,
};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::TestDatabase;
use outbox_tests::e2e::{
    eventually, prepare, publish_notification, runtime_of, test_config, TestBackend,
};
use outbox_tests::logs::Logs;
use outbox_tests::services::{Notification, NotificationRequested, Script};
use sqlx::Pool;

const TABLE: &str = "notification_outbox";

async fn row<DB: Backend>(pool: &Pool<DB>, id: EventId) -> outbox_runtime::OutboxRow {
    DB::fetch(pool, &TABLE.parse().unwrap(), id.0)
        .await
        .expect("fetch")
        .expect("the row exists")
}

/// Writes a row the way a newer release's publisher would: a type or version this
/// build does not know.
async fn insert_foreign<DB: Backend>(
    pool: &Pool<DB>,
    event_type: &str,
    version: i32,
    key: &str,
) -> EventId {
    let id = EventId::new();
    let mut conn = pool.acquire().await.unwrap();
    DB::insert(
        &mut conn,
        &TABLE.parse().unwrap(),
        &NewRow {
            event_id: id.0,
            service: &"notification".parse().unwrap(),
            event_type,
            version,
            key: Some(key),
            payload: r#"{"user_id":"x","seq":0}"#,
            max_retries: 20,
            trace_context: None,
        },
    )
    .await
    .expect("insert");
    id
}

async fn waits_then_dead_after_grace<DB: TestBackend>(pool: Pool<DB>) {
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let grace = Duration::from_secs(4);
    let config = OutboxConfig {
        waiting: Waiting {
            recheck: Duration::from_millis(300),
            grace,
        },
        ..test_config()
    };
    let outbox =
        Outbox::<Notification, DB>::with_config(pool.clone(), &catalog, config.clone()).unwrap();
    let admin = Admin::new(pool.clone(), catalog.clone());

    let unknown = insert_foreign(&pool, "notification.Snoozed", 1, "ada").await;
    let newer = insert_foreign(&pool, "NotificationRequested", 2, "bob").await;
    let mut tx = outbox.begin().await.unwrap();
    let behind = tx
        .publish(&NotificationRequested {
            user_id: "ada".into(),
            seq: 1,
            script: Script::default(),
        })
        .await
        .unwrap();
    let other = tx
        .publish(&NotificationRequested {
            user_id: "cyd".into(),
            seq: 0,
            script: Script::default(),
        })
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let runtime = runtime_of(&pool, &catalog, &broker, config, "notification").await;

    // Both wait: pending, no attempt counted, the reason kept, visible to operators.
    let waiting = eventually("both events to wait", Duration::from_secs(30), || async {
        let w = admin.waiting("notification").await.unwrap();
        (w.len() == 2).then_some(w)
    })
    .await;
    let reasons: Vec<(&str, &str, u64)> = waiting
        .iter()
        .map(|w| (w.event_type.as_str(), w.reason.as_str(), w.count))
        .collect();
    assert_eq!(reasons[0].0, "NotificationRequested", "{reasons:?}");
    assert!(
        reasons[0]
            .1
            .contains("schema version 2, newer than the handler's 1"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, "notification.Snoozed", "{reasons:?}");
    assert!(
        reasons[1]
            .1
            .contains("unknown event type `notification.Snoozed`"),
        "{reasons:?}"
    );
    for id in [unknown, newer] {
        let r = row(&pool, id).await;
        assert_eq!((r.status, r.attempts), (Status::Pending, 0), "{r:?}");
        assert!(r.waiting_since.is_some(), "{r:?}");
        assert!(r.dead_at.is_none());
    }
    let mut conn = pool.acquire().await.unwrap();
    DB::execute_portable(
        &mut conn,
        "CREATE TABLE view_probe (status VARCHAR(16))",
        &[],
    )
    .await
    .unwrap();
    let in_view = DB::execute_portable(
        &mut conn,
        &format!(
            "INSERT INTO view_probe (status) SELECT status FROM {TABLE}_view \
             WHERE event_type = 'notification.Snoozed' AND status = 'waiting'"
        ),
        &[],
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(
        in_view, 1,
        "the status view shows the waiting event as `waiting`"
    );
    // The key's later event waits behind it; another key flows.
    eventually(
        "the other key consumed",
        Duration::from_secs(30),
        || async { (row(&pool, other).await.status == Status::Consumed).then_some(()) },
    )
    .await;
    assert_ne!(row(&pool, behind).await.status, Status::Consumed);
    let stats = runtime.consumer_stats("notification").unwrap().clone();
    assert!(stats.waiting.load(Ordering::Relaxed) >= 2);
    assert_eq!(stats.dead.load(Ordering::Relaxed), 0);

    // After the grace period: dead with the reason; the key moves on.
    let dead = eventually(
        "the waiting events dead after the grace period",
        grace + Duration::from_secs(30),
        || async {
            let (u, n) = (row(&pool, unknown).await, row(&pool, newer).await);
            (u.status == Status::Dead && n.status == Status::Dead).then_some((u, n))
        },
    )
    .await;
    for r in [&dead.0, &dead.1] {
        let reason = r.last_error.clone().unwrap_or_default();
        assert!(reason.contains("within the grace period"), "{reason}");
        let waited = (r.dead_at.unwrap() - r.waiting_since.unwrap())
            .to_std()
            .unwrap();
        assert!(
            waited >= grace,
            "dead after waiting {waited:?}, grace {grace:?}"
        );
    }
    assert!(dead
        .0
        .last_error
        .as_deref()
        .unwrap()
        .contains("unknown event type"));
    let consumed = eventually(
        "the later event of the key consumed",
        Duration::from_secs(30),
        || async {
            let r = row(&pool, behind).await;
            (r.status == Status::Consumed).then_some(r)
        },
    )
    .await;
    assert!(consumed.consumed_at.unwrap() >= dead.0.dead_at.unwrap());
    assert!(admin.waiting("notification").await.unwrap().is_empty());
    runtime.shutdown().await.unwrap();
    let effects = DB::effects(&pool).await;
    assert_eq!(effects.len(), 2, "{effects:?}");
}

/// A wait is logged once, after its transaction commits: not also by a batch that
/// sent the event back to wait and then rolled back (another record's handler failed),
/// before the records are settled one by one. The log line carries the record's span.
async fn a_wait_is_logged_once<DB: TestBackend>(pool: Pool<DB>) {
    let logs = Logs::capture();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    // One lane: the records queued together are settled as one batch.
    let config = OutboxConfig {
        consumer_lanes: 1,
        waiting: Waiting {
            recheck: Duration::from_secs(30),
            grace: Duration::from_secs(60),
        },
        ..test_config()
    };
    let unknown = insert_foreign(&pool, "notification.Snoozed", 1, "ada").await;
    let outbox =
        Outbox::<Notification, DB>::with_config(pool.clone(), &catalog, config.clone()).unwrap();
    let script = Script {
        fail_times: 1,
        ..Script::default()
    };
    let failing = publish_notification(&outbox, "bob", script).await;
    let runtime = runtime_of(&pool, &catalog, &broker, config, "notification").await;
    eventually(
        "the failing event retried",
        Duration::from_secs(30),
        || async { (row(&pool, failing).await.attempts == 1).then_some(()) },
    )
    .await;
    eventually(
        "the unknown event waiting",
        Duration::from_secs(30),
        || async { row(&pool, unknown).await.waiting_since.map(|_| ()) },
    )
    .await;
    runtime.shutdown().await.unwrap();
    let warned = logs.lines_with("it waits for one that can");
    assert_eq!(warned.len(), 1, "{}", logs.text());
    assert!(
        warned[0].contains("outbox.consume{") && warned[0].contains(&unknown.to_string()),
        "{}",
        warned[0]
    );
}

/// Grace zero: no waiting, dead at once (the behaviour before waiting existed).
async fn zero_grace_is_dead_at_once<DB: TestBackend>(pool: Pool<DB>) {
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let config = OutboxConfig {
        waiting: Waiting {
            recheck: Duration::from_millis(300),
            grace: Duration::ZERO,
        },
        ..test_config()
    };
    let unknown = insert_foreign(&pool, "notification.Snoozed", 1, "ada").await;
    let runtime = runtime_of(&pool, &catalog, &broker, config, "notification").await;
    let r = eventually(
        "the unknown event dead",
        Duration::from_secs(30),
        || async {
            let r = row(&pool, unknown).await;
            (r.status == Status::Dead).then_some(r)
        },
    )
    .await;
    assert!(r.waiting_since.is_none(), "{r:?}");
    assert!(r.last_error.unwrap().contains("unknown event type"));
    runtime.shutdown().await.unwrap();
}

/// The defaults: 1 s doubling, capped at 32 s; dead at the 20th failure.
async fn default_retry_schedule<DB: TestBackend>(pool: Pool<DB>) {
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let config = OutboxConfig {
        backoff: Backoff::default(),
        default_max_retries: OutboxConfig::default().default_max_retries,
        ..test_config()
    };
    let outbox =
        Outbox::<Notification, DB>::with_config(pool.clone(), &catalog, config.clone()).unwrap();
    let script = Script {
        always_fail: true,
        ..Script::default()
    };
    let doomed = publish_notification(&outbox, "doomed", script).await;
    assert_eq!(row(&pool, doomed).await.max_retries, 20);
    let runtime = runtime_of(&pool, &catalog, &broker, config, "notification").await;

    let mut failed_at = Vec::new(); // database clock, one per failure
    let mut gaps = Vec::new(); // scheduled: next_attempt_at - failure time
    for failures in 1..=19 {
        let r = eventually(
            &format!("failure {failures}"),
            Duration::from_secs(60),
            || async {
                let r = row(&pool, doomed).await;
                (r.attempts == failures).then_some(r)
            },
        )
        .await;
        assert_eq!(r.status, Status::Pending, "{r:?}");
        failed_at.push(r.updated_at);
        gaps.push((r.next_attempt_at - r.updated_at).num_milliseconds());
        if failures > 3 {
            // Hurry: make it due now (fenced by its attempts count).
            let mut conn = pool.acquire().await.unwrap();
            let now = match DB::BACKEND_NAME {
                "postgres" => "now()",
                "mysql" => "UTC_TIMESTAMP(6)",
                _ => "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)",
            };
            let hurried = DB::execute_portable(
                &mut conn,
                &format!(
                    "UPDATE {TABLE} SET next_attempt_at = {now} WHERE id = ? AND attempts = ?"
                ),
                &[SqlValue::from(r.id), SqlValue::from(failures)],
            )
            .await
            .unwrap();
            assert_eq!(hurried, 1);
        }
    }
    let dead = eventually("the 20th failure", Duration::from_secs(60), || async {
        let r = row(&pool, doomed).await;
        (r.status == Status::Dead).then_some(r)
    })
    .await;
    runtime.shutdown().await.unwrap();

    let expected: Vec<i64> = [1, 2, 4, 8, 16]
        .into_iter()
        .chain(std::iter::repeat_n(32, 14))
        .map(|s| s * 1000)
        .collect();
    for (i, (got, want)) in gaps.iter().zip(&expected).enumerate() {
        assert!(
            (got - want).abs() <= 5,
            "gap after failure {}: scheduled {got} ms, expected {want} ms (all: {gaps:?})",
            i + 1
        );
    }
    // Waited out for real (database clock): failure n+1 came at least the gap after n.
    for n in 0..3 {
        let real = (failed_at[n + 1] - failed_at[n]).num_milliseconds();
        assert!(
            real >= expected[n] - 5 && real < expected[n] + 3000,
            "failure {} came {real} ms after failure {}, expected {} ms",
            n + 2,
            n + 1,
            expected[n]
        );
    }
    assert_eq!(dead.attempts, 20, "{dead:?}");
    let reason = dead.last_error.unwrap_or_default();
    assert!(
        reason.contains("retries exhausted: failed 20 times"),
        "{reason}"
    );
    println!(
        "[{}] scheduled gaps (ms): {gaps:?}; real gaps of the first three: {:?}",
        DB::BACKEND_NAME,
        (0..3)
            .map(|n| (failed_at[n + 1] - failed_at[n]).num_milliseconds())
            .collect::<Vec<_>>()
    );
}

/// Runs `body` on a fresh database of `T`.
macro_rules! on_fresh_db {
    ($($name:ident => $body:ident),* $(,)?) => {
        $(async fn $name<T: TestDatabase>()
        where
            T::DB: TestBackend,
        {
            let db = T::create().await;
            $body(db.pool().clone()).await;
            db.cleanup().await;
        })*
    };
}

on_fresh_db!(
    a_wait_is_logged_once_after_commit => a_wait_is_logged_once,
    waits_then_dead_after_the_grace_period => waits_then_dead_after_grace,
    zero_grace_means_dead_at_once => zero_grace_is_dead_at_once,
    retries_follow_the_default_schedule => default_retry_schedule,
);

outbox_tests::every_backend!(
    a_wait_is_logged_once_after_commit,
    waits_then_dead_after_the_grace_period,
    zero_grace_means_dead_at_once,
    retries_follow_the_default_schedule
);
