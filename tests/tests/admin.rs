//! The operator API on every backend, through the real runtime (mock broker): dead
//! letters created by failing handlers are listed with the right filters and pages, a
//! dry run counts without changing anything, a filtered, rate-limited replay makes them
//! handled once, a discarded event stays set aside, a parked key holds its events (and
//! later ones) until it is unparked and then drains in order, and every change has its
//! audit row.

use std::time::Duration;

use outbox_runtime::{
    Admin, DeadFilter, DeadReason, EventId, KafkaConfig, Outbox, OutboxRuntime, Page,
    PublishOptions, ReplayOptions, RuntimeHandle, Status,
};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::{TestMySql, TestPg, TestSqlite};
use outbox_tests::e2e::{
    assert_key_order, effects_per_event, eventually, prepare, test_config, TestBackend,
};
use outbox_tests::services::{Notification, NotificationRequested, Script};
use sqlx::Pool;

const WAIT: Duration = Duration::from_secs(30);

async fn start<DB: TestBackend>(
    pool: &Pool<DB>,
    catalog: &outbox_runtime::Catalog,
    broker: &TestBroker,
) -> RuntimeHandle {
    OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(test_config())
    .services(["notification"])
    .start()
    .await
    .unwrap()
}

/// Publishes one notification for `user` (the key) in its own transaction.
async fn publish<DB: TestBackend>(
    outbox: &Outbox<Notification, DB>,
    user: &str,
    seq: u32,
    script: Script,
    max_retries: Option<u32>,
) -> EventId {
    let mut tx = outbox.begin().await.unwrap();
    let event = NotificationRequested {
        user_id: user.into(),
        seq,
        script,
    };
    let options = PublishOptions {
        max_retries,
        ..PublishOptions::default()
    };
    let id = tx.publish_with(&event, options).await.unwrap();
    tx.commit().await.unwrap();
    id
}

async fn status<DB: TestBackend>(pool: &Pool<DB>, id: EventId) -> Status {
    DB::fetch(pool, &"notification_outbox".parse().unwrap(), id.0)
        .await
        .unwrap()
        .expect("the event's row")
        .status
}

async fn operate<DB: TestBackend>(pool: Pool<DB>) {
    outbox_tests::chaos::init_tracing();
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
    let runtime = start(&pool, &catalog, &broker).await;
    let outbox =
        Outbox::<Notification, DB>::with_config(pool.clone(), &catalog, test_config()).unwrap();
    let admin = Admin::new(pool.clone(), catalog.clone()).acting_as("tester");
    let svc = "notification";

    // Three events whose handler needs a fix (permanent failure), two that always fail
    // (retries exhausted).
    let needs_fix = Script {
        needs_fix: true,
        ..Script::default()
    };
    let always = Script {
        always_fail: true,
        ..Script::default()
    };
    let mut fixable = Vec::new();
    for (i, user) in ["a1", "a2", "a3"].into_iter().enumerate() {
        fixable.push(publish(&outbox, user, i as u32, needs_fix.clone(), Some(0)).await);
    }
    let mut hopeless = Vec::new();
    for (i, user) in ["b1", "b2"].into_iter().enumerate() {
        hopeless.push(publish(&outbox, user, i as u32, always.clone(), Some(1)).await);
    }
    let all = DeadFilter::default();
    eventually("five dead letters", WAIT, || async {
        (admin.count_dead(svc, &all).await.unwrap() == 5).then_some(())
    })
    .await;

    // Filters.
    let count = |f: DeadFilter| {
        let admin = admin.clone();
        async move { admin.count_dead(svc, &f).await.unwrap() }
    };
    let by_reason = |r| DeadFilter {
        reason: Some(r),
        ..DeadFilter::default()
    };
    assert_eq!(count(by_reason(DeadReason::Permanent)).await, 3);
    assert_eq!(count(by_reason(DeadReason::Exhausted)).await, 2);
    assert_eq!(count(by_reason(DeadReason::Undecodable)).await, 0);
    let text = DeadFilter {
        error_contains: Some("NO FIX FOR".into()),
        ..DeadFilter::default()
    };
    assert_eq!(count(text.clone()).await, 3);
    let key = DeadFilter {
        key: Some("a2".into()),
        ..DeadFilter::default()
    };
    let a2 = admin
        .dead_letters(svc, &key, Page::first(10))
        .await
        .unwrap();
    assert_eq!(a2.rows.len(), 1);
    assert_eq!(a2.rows[0].event_id, fixable[1].0);
    assert_eq!(a2.rows[0].dead_reason.as_deref(), Some("permanent"));
    assert!(a2.rows[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("no fix for a2"));
    let of_type = |t: &str| DeadFilter {
        event_type: Some(t.into()),
        ..DeadFilter::default()
    };
    let type_name = a2.rows[0].event_type.clone();
    assert_eq!(count(of_type(&type_name)).await, 5);
    assert_eq!(count(of_type("no.such.Type")).await, 0);
    let old = DeadFilter {
        older_than: Some(Duration::from_secs(3600)),
        ..DeadFilter::default()
    };
    assert_eq!(count(old).await, 0);
    let recent = DeadFilter {
        newer_than: Some(Duration::from_secs(3600)),
        reason: Some(DeadReason::Exhausted),
        ..DeadFilter::default()
    };
    assert_eq!(count(recent).await, 2);

    // Pages of 2 by a stable cursor: 2, 2, 1, in id order, every row once.
    let mut page = Page::first(2);
    let mut seen = Vec::new();
    loop {
        let p = admin.dead_letters(svc, &all, page).await.unwrap();
        seen.extend(p.rows.iter().map(|r| r.id));
        match p.next {
            Some(next) => page.after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(admin.dead_letters(svc, &all, Page::first(0)).await.is_err());

    // A dry run counts and samples, and changes nothing.
    let permanent = by_reason(DeadReason::Permanent);
    let dry = admin
        .replay_matching(svc, &permanent, &ReplayOptions::dry_run(), |_| {})
        .await
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!((dry.matched, dry.replayed), (3, 0));
    assert_eq!(
        dry.sample,
        fixable.iter().map(|id| id.0).collect::<Vec<_>>()
    );
    assert_eq!(admin.count_dead(svc, &all).await.unwrap(), 5);
    assert!(admin.audit_log(Some(svc), 10).await.unwrap().is_empty());

    // The operator fixes the cause, then replays the permanent ones, one per
    // transaction, at most 20 a second.
    {
        let mut conn = pool.acquire().await.unwrap();
        DB::execute_portable(
            &mut conn,
            "INSERT INTO fixes (event_key, hits) VALUES ('a1', 0), ('a2', 0), ('a3', 0)",
            &[],
        )
        .await
        .unwrap();
    }
    let mut progress = Vec::new();
    let options = ReplayOptions {
        batch: 1,
        ..ReplayOptions::default().rate(20)
    };
    let done = admin
        .replay_matching(svc, &permanent, &options, |p| progress.push(p.done))
        .await
        .unwrap();
    assert_eq!((done.matched, done.replayed), (3, 3));
    assert_eq!(progress, [1, 2, 3]);
    for id in &fixable {
        eventually("a replayed event to be consumed", WAIT, || async {
            (status(&pool, *id).await == Status::Consumed).then_some(())
        })
        .await;
    }
    let per_event = effects_per_event(&DB::effects(&pool).await);
    for id in &fixable {
        assert_eq!(per_event.get(&id.to_string()), Some(&1), "{per_event:?}");
    }
    assert_eq!(count(permanent.clone()).await, 0);

    // Discard: kept, set aside, not replayable.
    assert!(admin.discard(svc, hopeless[0]).await.unwrap());
    assert!(!admin.discard(svc, hopeless[0]).await.unwrap());
    assert_eq!(status(&pool, hopeless[0]).await, Status::Discarded);
    assert!(!admin.replay(svc, hopeless[0]).await.unwrap());
    assert!(!admin.replay(svc, EventId::new()).await.unwrap());
    let counts = admin.counts(svc).await.unwrap();
    assert_eq!((counts.dead, counts.discarded), (1, 1));
    let detail = admin.event(svc, hopeless[0]).await.unwrap().unwrap();
    assert_eq!(detail.row.status, Status::Discarded);
    assert_eq!(detail.topic, catalog.route(svc).unwrap().topic().as_str());
    assert!(admin.event("task", hopeless[0]).await.unwrap().is_none());

    // Park: with the relay stopped, key p's events are pending; parked, they stay
    // pending while another key flows, and a later event of p waits behind them.
    runtime.shutdown().await.unwrap();
    let mut parked = Vec::new();
    for seq in 0..3 {
        parked.push(publish(&outbox, "p", seq, Script::default(), None).await);
    }
    assert_eq!(admin.park(svc, "p").await.unwrap(), 3);
    assert_eq!(admin.park(svc, "nothing-pending").await.unwrap(), 0);
    let runtime = start(&pool, &catalog, &broker).await;
    parked.push(publish(&outbox, "p", 3, Script::default(), None).await);
    let free = publish(&outbox, "q", 0, Script::default(), None).await;
    eventually("the other key's event to be consumed", WAIT, || async {
        (status(&pool, free).await == Status::Consumed).then_some(())
    })
    .await;
    for id in &parked {
        assert_eq!(status(&pool, *id).await, Status::Pending);
    }
    let keys = admin.parked(svc).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!((keys[0].key.as_str(), keys[0].pending), ("p", 4));
    let overview = admin.service_overview(svc).await.unwrap();
    assert_eq!(overview.parked_keys, 1);
    assert_eq!(overview.counts.pending, 4);

    // Unparked, the key drains in order, each event once.
    assert_eq!(admin.unpark(svc, "p").await.unwrap(), 3);
    for id in &parked {
        eventually("an unparked event to be consumed", WAIT, || async {
            (status(&pool, *id).await == Status::Consumed).then_some(())
        })
        .await;
    }
    runtime.shutdown().await.unwrap();
    let effects = DB::effects(&pool).await;
    assert_key_order(&effects);
    let per_event = effects_per_event(&effects);
    for id in &parked {
        assert_eq!(per_event.get(&id.to_string()), Some(&1), "{per_event:?}");
    }
    assert!(admin.parked(svc).await.unwrap().is_empty());

    // Every change has its audit row, newest first.
    let audit = admin.audit_log(None, 50).await.unwrap();
    let actions: Vec<(&str, u64)> = audit
        .iter()
        .map(|a| (a.action.as_str(), a.affected))
        .collect();
    assert_eq!(
        actions,
        [
            ("unpark", 3),
            ("park", 0),
            ("park", 3),
            ("replay", 0),
            ("replay", 0),
            ("discard", 0),
            ("discard", 1),
            ("replay_matching", 3),
        ]
    );
    assert!(audit
        .iter()
        .all(|a| a.actor == "tester" && a.service == svc));
    assert!(
        audit[7].target.contains(r#""reason":"permanent""#),
        "{}",
        audit[7].target
    );
    assert_eq!(audit[2].target, "p");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_operator_api() {
    let db = TestPg::create().await;
    operate(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_operator_api() {
    let db = TestMySql::create().await;
    operate(db.pool().clone()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_operator_api() {
    let db = TestSqlite::create().await;
    operate(db.pool().clone()).await;
    db.cleanup().await;
}
