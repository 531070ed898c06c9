//! Wake-ups and shutdown.
//!
//! - A relay with a one-minute poll interval still relays at once when woken: in-process
//!   after a local commit (every backend), and through LISTEN/NOTIFY when the commit
//!   happened elsewhere (PostgreSQL); and after the commit of the caller's own sqlx
//!   transaction, which the outbox's commit watch notices (every backend).
//! - Shutting the runtime down in the middle of a stream (on the application's own
//!   signal, `run_until`) loses nothing and applies nothing twice: a new runtime
//!   finishes the work.

use std::time::{Duration, Instant};

use outbox_runtime::backend::NewRow;
use outbox_runtime::{Backend, KafkaConfig, Outbox, OutboxConfig, OutboxRuntime, Status};
use outbox_tests::broker::TestBroker;
use outbox_tests::db::{TestMySql, TestPg, TestSqlite};
use outbox_tests::e2e::{
    all_rows, assert_key_order, effects_per_event, eventually, prepare, test_config, TestBackend,
};
use outbox_tests::services::{Script, Task, TaskCreated};

fn slow_poll() -> OutboxConfig {
    OutboxConfig {
        relay_poll_interval: Duration::from_secs(60),
        ..test_config()
    }
}

/// `task`'s relay alone (no consumer), polling once a minute.
async fn slow_relay<DB: TestBackend>(
    pool: &sqlx::Pool<DB>,
    catalog: &outbox_runtime::Catalog,
    broker: &TestBroker,
) -> outbox_runtime::RuntimeHandle {
    relay_only(pool, catalog, broker, slow_poll()).await
}

/// `task`'s relay alone (no consumer), with `config`.
async fn relay_only<DB: TestBackend>(
    pool: &sqlx::Pool<DB>,
    catalog: &outbox_runtime::Catalog,
    broker: &TestBroker,
    config: OutboxConfig,
) -> outbox_runtime::RuntimeHandle {
    OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(config)
    .services(["task"])
    .consumers(false)
    .start()
    .await
    .unwrap()
}

fn event(key: &str, seq: u32) -> TaskCreated {
    TaskCreated {
        task_id: key.into(),
        seq,
        script: Script::default(),
    }
}

/// Commits `per_key` events on each of `keys` keys named `<prefix><k>`, round robin,
/// in one transaction.
async fn publish_backlog<DB: TestBackend>(
    pool: &sqlx::Pool<DB>,
    catalog: &outbox_runtime::Catalog,
    prefix: &str,
    keys: u32,
    per_key: u32,
) {
    let outbox = Outbox::<Task, DB>::with_config(pool.clone(), catalog, slow_poll()).unwrap();
    let mut tx = outbox.begin().await.unwrap();
    for seq in 0..per_key {
        for k in 0..keys {
            tx.publish(&event(&format!("{prefix}{k}"), seq))
                .await
                .unwrap();
        }
    }
    tx.commit().await.unwrap();
}

/// Waits up to `within` for every row of the table to be published.
async fn all_published<DB: TestBackend>(
    pool: &sqlx::Pool<DB>,
    catalog: &outbox_runtime::Catalog,
    within: Duration,
) {
    eventually("the backlog published", within, || {
        let (pool, catalog) = (pool.clone(), catalog.clone());
        async move {
            let rows = all_rows(&pool, &catalog).await;
            rows.values()
                .all(|r| r.status == Status::Published)
                .then_some(())
        }
    })
    .await;
}

/// Starts relay + consumer of `task` with a one-minute poll interval, waits until an
/// idle round has passed, then runs `publish` and measures how long until consumed.
async fn woken_within<DB, F, Fut>(pool: sqlx::Pool<DB>, publish: F) -> Duration
where
    DB: TestBackend,
    F: FnOnce(Outbox<Task, DB>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(slow_poll())
    .services(["task"])
    .start()
    .await
    .unwrap();
    let outbox = Outbox::<Task, DB>::with_config(pool.clone(), &catalog, slow_poll()).unwrap();
    // Let the relay finish its first (empty) round and go idle on its one-minute poll.
    eventually("the relay to go idle", Duration::from_secs(10), || async {
        let stats = &runtime.relay_stats("task")[0];
        (stats.idles.load(std::sync::atomic::Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    let started = Instant::now();
    publish(outbox).await;
    eventually(
        "the event to be consumed",
        Duration::from_secs(30),
        || async {
            let rows = all_rows(&pool, &catalog).await;
            (rows.len() == 1 && rows.values().all(|r| r.status == Status::Consumed)).then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    runtime.shutdown().await.unwrap();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_in_process_wakeup_after_commit() {
    let db = TestSqlite::create().await;
    let took = woken_within(db.pool().clone(), |outbox| async move {
        let mut tx = outbox.begin().await.unwrap();
        tx.publish(&event("wake", 0)).await.unwrap();
        tx.commit().await.unwrap(); // wakes the relay in this process
    })
    .await;
    assert!(
        took < Duration::from_secs(20),
        "woken after {took:?}; the poll interval is 60 s"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_listen_notify_wakes_a_relay_for_a_commit_made_elsewhere() {
    let db = TestPg::create().await;
    let pool = db.pool().clone();
    let took = woken_within(db.pool().clone(), |outbox| async move {
        // Write the row as another process's publisher would: nothing in this process
        // knows about the commit (not even an outbox's commit watch) ...
        let payload = serde_json::to_string(&event("elsewhere", 0)).unwrap();
        let row = NewRow {
            event_id: outbox_runtime::EventId::new().0,
            service: outbox.route().service(),
            event_type: <TaskCreated as outbox_runtime::Event>::EVENT_TYPE,
            version: <TaskCreated as outbox_runtime::Event>::VERSION as i32,
            key: Some("elsewhere"),
            payload: &payload,
            max_retries: 5,
            trace_context: None,
        };
        let mut tx = pool.begin().await.unwrap();
        sqlx::Postgres::insert(&mut tx, outbox.route().table(), &row)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        // ... and another process's publisher sends the post-commit hint.
        sqlx::query("SELECT pg_notify('outbox_wakeup', 'task_outbox:task')")
            .execute(&pool)
            .await
            .unwrap();
    })
    .await;
    assert!(
        took < Duration::from_secs(20),
        "woken after {took:?}; the poll interval is 60 s"
    );
    db.cleanup().await;
}

/// Publishes in the caller's own sqlx transaction, which stays open for `open`, and
/// never calls `notify_committed`: the outbox's commit watch must notice the commit and
/// wake the relay (its poll interval is a minute), also after its first checks found
/// nothing.
async fn own_transaction_is_noticed<DB: TestBackend>(pool: sqlx::Pool<DB>, open: Duration) {
    let committed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let at = committed.clone();
    let p = pool.clone();
    woken_within(pool, |outbox| async move {
        let mut tx = p.begin().await.unwrap();
        outbox.publish(&mut *tx, &event("own", 0)).await.unwrap();
        // A transaction that does more work after publishing (not synchronisation).
        tokio::time::sleep(open).await;
        tx.commit().await.unwrap();
        *at.lock().unwrap() = Some(Instant::now());
    })
    .await;
    let took = committed.lock().unwrap().expect("committed").elapsed();
    assert!(
        took < Duration::from_secs(20),
        "consumed {took:?} after the commit; the poll interval is 60 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_own_transaction_wakes_the_relay_without_notify_committed() {
    let db = TestPg::create().await;
    own_transaction_is_noticed(db.pool().clone(), Duration::from_millis(700)).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_own_transaction_wakes_the_relay_without_notify_committed() {
    let db = TestMySql::create().await;
    own_transaction_is_noticed(db.pool().clone(), Duration::from_millis(300)).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_own_transaction_wakes_the_relay_without_notify_committed() {
    let db = TestSqlite::create().await;
    own_transaction_is_noticed(db.pool().clone(), Duration::ZERO).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_mid_stream_loses_nothing_and_a_new_runtime_finishes() {
    let db = TestPg::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let outbox =
        Outbox::<Task, sqlx::Postgres>::with_config(pool.clone(), &catalog, test_config()).unwrap();
    let mut ids = Vec::new();
    for seq in 0..300u32 {
        let mut tx = outbox.begin().await.unwrap();
        ids.push(
            tx.publish(&event(&format!("k{}", seq % 10), seq))
                .await
                .unwrap(),
        );
        tx.commit().await.unwrap();
    }
    let start = || {
        OutboxRuntime::new(
            catalog.clone(),
            pool.clone(),
            KafkaConfig::new(broker.bootstrap_servers()),
        )
        .config(test_config())
        .services(["task"])
        .start()
    };
    // The first runtime stops on the application's own signal (`run_until`).
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(start().await.unwrap().run_until(async {
        let _ = stopped.await;
    }));
    eventually("some events consumed", Duration::from_secs(60), || async {
        let c = <sqlx::Postgres as Backend>::counts(
            &pool,
            &"task_outbox".parse().unwrap(),
            &"task".parse().unwrap(),
        )
        .await
        .unwrap();
        (c.consumed > 0).then_some(())
    })
    .await;
    stop.send(()).unwrap();
    first
        .await
        .unwrap()
        .expect("graceful shutdown on the application's signal");
    let after_first = <sqlx::Postgres as Backend>::counts(
        &pool,
        &"task_outbox".parse().unwrap(),
        &"task".parse().unwrap(),
    )
    .await
    .unwrap();
    println!("after the first runtime: {after_first:?}");

    let second = start().await.unwrap();
    eventually("every event consumed", Duration::from_secs(90), || async {
        let c = <sqlx::Postgres as Backend>::counts(
            &pool,
            &"task_outbox".parse().unwrap(),
            &"task".parse().unwrap(),
        )
        .await
        .unwrap();
        (c.consumed == ids.len() as u64).then_some(())
    })
    .await;
    second.shutdown().await.unwrap();

    let effects = <sqlx::Postgres as TestBackend>::effects(&pool).await;
    let per_event = effects_per_event(&effects);
    for id in &ids {
        assert_eq!(per_event.get(&id.to_string()), Some(&1), "event {id}");
    }
    assert_key_order(&effects);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_published_event_whose_record_the_consumer_never_saw_is_published_again() {
    let db = TestPg::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let config = OutboxConfig {
        redeliver_after: Some(Duration::from_secs(2)),
        retention: Some(outbox_runtime::Retention {
            interval: Duration::from_millis(200),
            ..outbox_runtime::Retention::default()
        }),
        ..test_config()
    };
    // Relays only: the event is published and nobody consumes it.
    let relays = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(config.clone())
    .services(["task"])
    .consumers(false)
    .start()
    .await
    .unwrap();
    let outbox =
        Outbox::<Task, sqlx::Postgres>::with_config(pool.clone(), &catalog, config.clone())
            .unwrap();
    let mut tx = outbox.begin().await.unwrap();
    let id = tx.publish(&event("stranded", 0)).await.unwrap();
    tx.commit().await.unwrap();
    eventually(
        "the event to be published",
        Duration::from_secs(30),
        || async {
            let row =
                <sqlx::Postgres as Backend>::fetch(&pool, &"task_outbox".parse().unwrap(), id.0)
                    .await
                    .unwrap()?;
            (row.status == Status::Published).then_some(())
        },
    )
    .await;
    // A consumer whose group starts at the end of the topic: it never sees that record
    // (as after an offset reset, or a record lost to retention).
    let consumers = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers())
            .consumer_property("auto.offset.reset", "latest"),
    )
    .config(config)
    .services(["task"])
    .relays(false)
    .start()
    .await
    .unwrap();
    eventually(
        "the stranded event to be consumed",
        Duration::from_secs(60),
        || async {
            let row =
                <sqlx::Postgres as Backend>::fetch(&pool, &"task_outbox".parse().unwrap(), id.0)
                    .await
                    .unwrap()?;
            (row.status == Status::Consumed).then_some(())
        },
    )
    .await;
    let published = relays.relay_stats("task")[0]
        .published
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(published >= 2, "published {published} times");
    consumers.shutdown().await.unwrap();
    relays.shutdown().await.unwrap();
    let effects = <sqlx::Postgres as TestBackend>::effects(&pool).await;
    assert_eq!(effects.len(), 1, "{effects:?}");
    db.cleanup().await;
}

/// One commit wakes a relay once: the in-process wake-up and the relay's own NOTIFY
/// coming back through LISTEN must not each cost it a claim. Commits one event at a
/// time (each waits until published) and counts the times the relay went idle.
async fn idle_claims_per_commit<DB: TestBackend>(pool: sqlx::Pool<DB>) -> f64 {
    const EVENTS: u32 = 40;
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    let runtime = slow_relay(&pool, &catalog, &broker).await;
    let outbox = Outbox::<Task, DB>::with_config(pool.clone(), &catalog, slow_poll()).unwrap();
    let stats = runtime.relay_stats("task")[0].clone();
    let idles = || stats.idles.load(std::sync::atomic::Ordering::Relaxed);
    eventually("the relay to go idle", Duration::from_secs(10), || async {
        (idles() >= 1).then_some(())
    })
    .await;
    let before = idles();
    for seq in 0..EVENTS {
        let mut tx = outbox.begin().await.unwrap();
        let id = tx.publish(&event("one", seq)).await.unwrap();
        tx.commit().await.unwrap();
        eventually(
            "the event to be published",
            Duration::from_secs(10),
            || async {
                let row = DB::fetch(&pool, &"task_outbox".parse().unwrap(), id.0)
                    .await
                    .unwrap()?;
                (row.status == Status::Published).then_some(())
            },
        )
        .await;
        // Let a late wake-up (the NOTIFY coming back) land before the next commit.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let per_commit = (idles() - before) as f64 / f64::from(EVENTS);
    runtime.shutdown().await.unwrap();
    per_commit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_one_commit_costs_one_idle_claim() {
    let db = TestPg::create().await;
    let per_commit = idle_claims_per_commit(db.pool().clone()).await;
    println!("idle claims per commit: {per_commit:.2}");
    assert!(per_commit <= 1.25, "{per_commit:.2} idle claims per commit");
    db.cleanup().await;
}

/// A lone relay drains a backlog on fewer keys than a batch without waiting for the
/// poll: each round takes one event per key (the head), and the claim beside the round
/// runs while those heads are still leased, so it finds nothing; the relay must claim
/// again once the round is marked rather than go idle. The backlog is committed before
/// the runtime starts, so no commit wakes it, and the poll interval is a minute.
async fn a_lone_relay_drains_few_keys_without_the_poll<DB: TestBackend>(
    pool: sqlx::Pool<DB>,
    broker: TestBroker,
) {
    const KEYS: u32 = 3;
    const PER_KEY: u32 = 15;
    let catalog = prepare(&pool, &broker).await;
    publish_backlog(&pool, &catalog, "few", KEYS, PER_KEY).await;

    let started = Instant::now();
    let runtime = slow_relay(&pool, &catalog, &broker).await;
    // One round per key depth: PER_KEY rounds. Waiting for the poll, that is 14 minutes.
    all_published(&pool, &catalog, Duration::from_secs(30)).await;
    println!(
        "{} events on {KEYS} keys published in {:?}",
        KEYS * PER_KEY,
        started.elapsed()
    );
    let stats = runtime.relay_stats("task")[0].clone();
    assert!(
        stats.rounds.load(std::sync::atomic::Ordering::Relaxed) >= u64::from(PER_KEY),
        "one round per event of a key"
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_lone_relay_drains_few_keys_without_the_poll() {
    let db = TestPg::create().await;
    a_lone_relay_drains_few_keys_without_the_poll(db.pool().clone(), TestBroker::mock().await)
        .await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_a_lone_relay_drains_few_keys_without_the_poll() {
    let db = TestMySql::create().await;
    a_lone_relay_drains_few_keys_without_the_poll(db.pool().clone(), TestBroker::mock().await)
        .await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_lone_relay_drains_few_keys_without_the_poll() {
    let db = TestSqlite::create().await;
    a_lone_relay_drains_few_keys_without_the_poll(db.pool().clone(), TestBroker::mock().await)
        .await;
    db.cleanup().await;
}

/// A relay on few deep keys claims within the window, round after round, instead of
/// walking the whole backlog each round: full claims (and the window's fallback past
/// it) that come back short wait longer each time, up to 16 poll intervals. Before,
/// the fallback ran once per poll interval whatever it found, and, as a full claim,
/// counted the keys' next events (heads again once a round's mark committed) as heads
/// the window had hidden, and so ran beside every round (on 100 keys × 1,000: 700 ms
/// per claim, 422 events/s). That second half is `store_contract`'s
/// `claim_past_window_takes_only_hidden_heads`.
async fn a_relay_on_deep_keys_claims_within_the_window<DB: TestBackend>(
    pool: sqlx::Pool<DB>,
    broker: TestBroker,
) {
    const KEYS: u32 = 4;
    const PER_KEY: u32 = 100;
    const POLL: Duration = Duration::from_millis(20);
    let catalog = prepare(&pool, &broker).await;
    let config = OutboxConfig {
        relay_poll_interval: POLL,
        relay_batch_size: 10,
        ..test_config()
    };
    publish_backlog(&pool, &catalog, "deep", KEYS, PER_KEY).await;

    let started = Instant::now();
    let runtime = relay_only(&pool, &catalog, &broker, config).await;
    all_published(&pool, &catalog, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    let stats = runtime.relay_stats("task")[0].clone();
    let rounds = stats.rounds.load(std::sync::atomic::Ordering::Relaxed);
    let full = stats.full_claims.load(std::sync::atomic::Ordering::Relaxed);
    println!("{rounds} rounds, {full} full claims in {elapsed:?}");
    assert!(rounds >= u64::from(PER_KEY), "one round per event of a key");
    // Backing off: 5 claims to reach the longest wait (20, 40, 80, 160, 320 ms), then
    // one per 320 ms; allowed twice that. Once per poll interval would be 50 a second.
    let allowed = 2 * (5 + elapsed.as_millis() as u64 / (16 * POLL.as_millis() as u64));
    assert!(
        full <= allowed,
        "{full} full claims in {elapsed:?} ({rounds} rounds), over {allowed}"
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_relay_on_deep_keys_claims_within_the_window() {
    let db = TestPg::create().await;
    a_relay_on_deep_keys_claims_within_the_window(db.pool().clone(), TestBroker::mock().await)
        .await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_a_relay_on_deep_keys_claims_within_the_window() {
    let db = TestMySql::create().await;
    a_relay_on_deep_keys_claims_within_the_window(db.pool().clone(), TestBroker::mock().await)
        .await;
    db.cleanup().await;
}

/// The same on a real broker (tansu), where a round's delivery reports take real
/// round trips, so its mark often commits while the next claim runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_relay_on_deep_keys_claims_within_the_window_tansu() {
    let Some(broker) =
        TestBroker::tansu_or_skip("postgres_a_relay_on_deep_keys_claims_within_the_window_tansu")
    else {
        return;
    };
    let db = TestPg::create().await;
    a_relay_on_deep_keys_claims_within_the_window(db.pool().clone(), broker).await;
    db.cleanup().await;
}

/// The same on a real broker (tansu), where delivery reports take real round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_lone_relay_drains_few_keys_without_the_poll_tansu() {
    let Some(broker) =
        TestBroker::tansu_or_skip("postgres_a_lone_relay_drains_few_keys_without_the_poll_tansu")
    else {
        return;
    };
    let db = TestPg::create().await;
    a_lone_relay_drains_few_keys_without_the_poll(db.pool().clone(), broker).await;
    db.cleanup().await;
}
