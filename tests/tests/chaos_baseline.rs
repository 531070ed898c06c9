//! Fault suite, no faults: the baseline (many events, 2 relays, 2 consumers) and
//! out-of-order commits (a business transaction holds a lower id open while later ones
//! commit). Each prints the ledger oracle's figures. See RELIABILITY.md.
//!
//! The baseline runs on PostgreSQL, MariaDB and SQLite (one generic body, one test per
//! backend); the out-of-order commits scenario on PostgreSQL.

use std::time::Duration;

use outbox_runtime::{Backend, EventId, PublishOptions, Status};
use outbox_tests::broker::TestBroker;
use outbox_tests::chaos::{
    chaos_config, ci_size, consumer_duplicates, init_tracing, poll, soak, ChaosBackend, ChaosEnv,
    Load,
};
use outbox_tests::chaos_tests;
use outbox_tests::db::TestDatabase;
use outbox_tests::oracle::{publish_ledgered, Written};
use outbox_tests::services::{Script, TaskCreated};
use sqlx::{MySql, Postgres, Sqlite};

/// a. 2,000 events (10,000 soak) over 100 keys (200 soak), 5% rolled back, 2 relays and
/// 2 consumers (two runtimes in one group), no faults: nothing lost or doubled, per-key
/// order, and no duplicate delivery once the group has settled.
async fn baseline<B: ChaosBackend>() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let (total, keys) = ci_size::<B, _>((2_000u64, 100u32), (2_000, 100), (10_000, 200));
    let r1 = env.runtime(&broker, 1, true, chaos_config()).await;
    let r2 = env.runtime(&broker, 1, true, chaos_config()).await;
    let outbox = env.outbox();

    // Warm up until both consumers own partitions (each handled something): the
    // group's first rebalance is over before the measured load starts.
    let mut warm = Load::new(0, 64);
    warm.key_prefix = "warm".into();
    warm.rollback_pct = 0;
    let both = || {
        [&r1, &r2].iter().all(|r| {
            r.consumer_stats("task")
                .is_some_and(|s| s.handled.load(std::sync::atomic::Ordering::Relaxed) > 0)
        })
    };
    let mut warm_events = 0;
    let warm_deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !both() {
        warm.total = 16;
        warm_events += warm.run(&outbox).await.committed;
        // Bounded in time too: fail with the consumers' state, not a harness timeout.
        assert!(
            warm_events < 5_000 && std::time::Instant::now() < warm_deadline,
            "a consumer never handled an event in the warm-up ({warm_events} events): \
             {:?} / {:?}; health {:?} / {:?}",
            r1.consumer_stats("task"),
            r2.consumer_stats("task"),
            r1.health(),
            r2.health()
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // load pacing
    }
    env.settled(Duration::from_secs(30)).await;
    let warm_dups = consumer_duplicates(&[&r1, &r2]);

    let t = std::time::Instant::now();
    let load = Load::new(total, keys).run(&outbox).await;
    env.settled(Duration::from_secs(soak(60, 300))).await;
    let elapsed = t.elapsed();
    let dups = consumer_duplicates(&[&r1, &r2]) - warm_dups;
    r1.shutdown().await.expect("shutdown 1");
    r2.shutdown().await.expect("shutdown 2");

    let report = env
        .check(&format!("a-baseline[{}]", B::BACKEND_NAME), dups)
        .await;
    println!(
        "a-baseline[{}]: load {load:?}, warm-up {warm_events} events ({warm_dups} duplicate deliveries \
         during the first rebalance), {total} events settled in {elapsed:?}",
        B::BACKEND_NAME
    );
    report.assert_pass();
    assert_eq!(report.unledgered_rows, 0, "a rolled-back event exists");
    assert_eq!(report.open_rows, 0);
    assert!(report.dead.is_empty());
    assert_eq!(report.committed as u64, load.committed + warm_events);
    assert!(load.rolled_back > 0, "the load rolled nothing back");
    assert_eq!(dups, 0, "duplicate deliveries without faults");
    env.db.cleanup().await;
}

chaos_tests!(baseline() {
    chaos_a_baseline: Postgres,
    chaos_a_baseline_mysql: MySql,
    chaos_a_baseline_sqlite: Sqlite,
});

/// i. Out-of-order commits: a business transaction that inserted its outbox row (a low
/// id) stays open while 300 later ones commit and are delivered; once it commits its
/// event is delivered too, in its key's order; an aborted one never appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_i_out_of_order_commits() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<Postgres>::new(&broker, 3).await;
    let runtime = env.runtime(&broker, 2, true, chaos_config()).await;
    let outbox = env.outbox();
    let pool = env.pool().clone();

    // Key "held": two events before, the held one, two after.
    for _ in 0..2 {
        let w = publish_ledgered(
            &outbox,
            "held",
            Script::default(),
            PublishOptions::default(),
            true,
        )
        .await;
        assert!(matches!(w, Written::Committed(..)));
    }
    // Open the held transaction and the one that will abort; both insert their rows now.
    let held_tx = hold(&outbox, "held").await;
    let aborted_tx = hold(&outbox, "aborted").await;
    let held_id = held_tx.1;
    let aborted_id = aborted_tx.1;

    // 300 later transactions on other keys commit and are delivered meanwhile.
    let mut load = Load::new(300, 20);
    load.rollback_pct = 0;
    load.run(&outbox).await;
    let table = env.table.clone();
    poll(
        "the later events to be consumed while the held one is open",
        Duration::from_secs(60),
        || async {
            let c = Postgres::counts(&pool, &table.parse().unwrap(), &"task".parse().unwrap())
                .await
                .ok()?;
            (c.consumed >= 302).then_some(())
        },
    )
    .await;
    let later_max: (i64,) =
        sqlx::query_as(&format!("SELECT max(id) FROM {table} WHERE status = 2"))
            .fetch_one(&pool)
            .await
            .unwrap();
    let held_row_id = held_tx.2;
    assert!(
        held_row_id < later_max.0,
        "the held row ({held_row_id}) should have a lower id than later consumed ones ({})",
        later_max.0
    );

    // Commit the held one, abort the other, then two more on "held".
    held_tx.0.commit().await.expect("commit held");
    aborted_tx.0.rollback().await.expect("rollback");
    outbox.notify_committed();
    for _ in 0..2 {
        publish_ledgered(
            &outbox,
            "held",
            Script::default(),
            PublishOptions::default(),
            true,
        )
        .await;
    }
    env.settled(Duration::from_secs(60)).await;
    let dups = consumer_duplicates(&[&runtime]);
    runtime.shutdown().await.expect("shutdown");

    let report = env.check("i-out-of-order", dups).await;
    report.assert_pass();
    assert_eq!(report.unledgered_rows, 0);
    let row = Postgres::fetch(&pool, &table.parse().unwrap(), held_id.0)
        .await
        .unwrap()
        .expect("held row");
    assert_eq!(row.status, Status::Consumed, "{row:?}");
    assert!(
        Postgres::fetch(&pool, &table.parse().unwrap(), aborted_id.0)
            .await
            .unwrap()
            .is_none()
    );
    let (effects_of_aborted,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM effects WHERE event_id = $1")
            .bind(aborted_id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(effects_of_aborted, 0);
    let held_seqs: Vec<(i64,)> =
        sqlx::query_as("SELECT seq FROM effects WHERE event_key = 'held' ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        held_seqs.into_iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    println!(
        "i-out-of-order: held row id {held_row_id} < later consumed id {}",
        later_max.0
    );
    env.db.cleanup().await;
}

type Held<'o> = (
    outbox_runtime::OutboxTx<'o, outbox_tests::services::Task, Postgres>,
    EventId,
    i64,
);

/// Begins a ledgered publish on `key` and returns it uncommitted.
async fn hold<'o>(
    outbox: &'o outbox_runtime::Outbox<outbox_tests::services::Task, Postgres>,
    key: &str,
) -> Held<'o> {
    let mut tx = outbox.begin().await.expect("begin");
    let (seq,): (i64,) = sqlx::query_as(
        "INSERT INTO ledger_keys (service, event_key, seq) VALUES ('task', $1, 1) \
         ON CONFLICT (service, event_key) DO UPDATE SET seq = ledger_keys.seq + 1 RETURNING seq",
    )
    .bind(key)
    .fetch_one(&mut **tx.transaction())
    .await
    .expect("seq");
    let id = tx
        .publish(&TaskCreated {
            task_id: key.into(),
            seq: seq as u32,
            script: Script::default(),
        })
        .await
        .expect("publish");
    sqlx::query(
        "INSERT INTO ledger (event_id, service, event_key, seq) VALUES ($1, 'task', $2, $3)",
    )
    .bind(id.to_string())
    .bind(key)
    .bind(seq)
    .execute(&mut **tx.transaction())
    .await
    .expect("ledger");
    let (row_id,): (i64,) = sqlx::query_as(&format!(
        "SELECT id FROM {} WHERE event_id = $1",
        outbox.route().table()
    ))
    .bind(id.0)
    .fetch_one(&mut **tx.transaction())
    .await
    .expect("own row");
    (tx, id, row_id)
}
