//! Fault suite, crashed and frozen processes: the relay or the consumer runs as a
//! separate process (`chaos-worker`, built with the runtime's `failpoints`), frozen
//! exactly at a named crash point, SIGKILLed (or SIGSTOPped past its lease and
//! SIGCONTinued), then a fresh one takes over. Each prints the ledger oracle's figures.
//! See RELIABILITY.md.
//!
//! Each scenario is one generic body; `chaos_tests!` makes one test per backend it runs
//! on: PostgreSQL for all of them, MariaDB and SQLite for the relay kill after produce,
//! the consumer kill after commit, the random kills and the zombie relay.

use std::time::Duration;

use outbox_runtime::Status;
use outbox_tests::broker::TestBroker;
use outbox_tests::chaos::{
    chaos_config, ci_size, consumer_duplicates, init_tracing, poll, soak, ChaosBackend, ChaosEnv,
    Load, LoadReport,
};
use outbox_tests::chaos_tests;
use outbox_tests::db::TestDatabase;
use sqlx::{MySql, Postgres, Sqlite};

const WORKER: &str = env!("CARGO_BIN_EXE_chaos-worker");
const LEASE: Duration = Duration::from_millis(2_000);

/// A fresh environment on `broker` with 150 events committed over 15 keys (none rolled
/// back), before any relay runs.
async fn committed_150<B: ChaosBackend>(broker: &TestBroker) -> (ChaosEnv<B>, LoadReport) {
    let env = ChaosEnv::<B>::new(broker, 3).await;
    let mut load = Load::new(150, 15);
    load.rollback_pct = 0;
    let load = load.run(&env.outbox()).await;
    (env, load)
}

/// Waits until no row of `task` is pending and some are published.
async fn all_published<B: ChaosBackend>(env: &ChaosEnv<B>, what: &str, timeout: Duration) {
    let table = env.table.parse().unwrap();
    let service = "task".parse().unwrap();
    poll(what, timeout, || async {
        let c = B::counts(env.pool(), &table, &service).await.ok()?;
        (c.pending == 0 && c.published > 0).then_some(())
    })
    .await;
}

/// b. The relay process frozen at `point` on its 3rd round, under load, SIGKILLed; a
/// fresh relay process finishes (rows leased by the dead one wait for the lease).
async fn relay_crash<B: ChaosBackend>(point: &str) {
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let consumer = env.runtime(&broker, 0, true, chaos_config()).await;
    let outbox = env.outbox();
    let mut load = Load::new(600, 30);
    load.pace = Duration::from_millis(5); // spread the load over several relay rounds
    let running = load.spawn(&outbox);

    let mut relay = env
        .worker(&broker, "relay")
        .lease(LEASE)
        .freeze(point, 2, 0)
        .spawn(WORKER);
    relay.wait_frozen(Duration::from_secs(30)).await;
    let before = relay.fresh_stats(Duration::from_secs(5)).await;
    relay.kill();
    let leased = env.leased(true).await;

    let mut fresh = env.worker(&broker, "relay").lease(LEASE).spawn(WORKER);
    let load = running.await.unwrap();
    env.settled(Duration::from_secs(60)).await;
    let after = fresh
        .terminate(Duration::from_secs(15))
        .await
        .unwrap_or_default();
    let dups = consumer_duplicates(&[&consumer]);
    consumer.shutdown().await.expect("shutdown");

    let name = format!("b-relay-kill@{point}[{}]", B::BACKEND_NAME);
    let report = env.check(&name, dups).await;
    println!(
        "{name}: load {load:?}; killed relay had published {} in {} rounds, \
         left {leased} rows leased; fresh relay published {} (fenced {})",
        before.published, before.rounds, after.published, after.fenced
    );
    report.assert_pass();
    assert_eq!(report.unledgered_rows, 0);
    assert!(report.dead.is_empty(), "{:?}", report.dead);
    if point == "relay.after_claim" || point == "relay.after_produce" {
        assert!(leased > 0, "the killed relay should have left leased rows");
    }
    env.db.cleanup().await;
}

chaos_tests!(relay_crash("relay.after_claim") {
    chaos_b_relay_kill_after_claim: Postgres,
});

chaos_tests!(relay_crash("relay.after_produce") {
    chaos_b_relay_kill_after_produce: Postgres,
    chaos_b_relay_kill_after_produce_mysql: MySql,
    chaos_b_relay_kill_after_produce_sqlite: Sqlite,
});

chaos_tests!(relay_crash("relay.after_mark") {
    chaos_b_relay_kill_after_mark: Postgres,
});

/// b. The consumer process killed at `point`, `kills` times (each fresh consumer frozen
/// after a random number of records); then a last one finishes. Every event's effect
/// exactly once; a kill after the handler's commit leaves a record that the next
/// consumer recognises as already done (a duplicate delivery).
async fn consumer_crash<B: ChaosBackend>(point: &str, kills: usize) {
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let relay = env.runtime(&broker, 1, false, chaos_config()).await;
    let outbox = env.outbox();
    let load = Load::new(soak(400, 2_000), 40).run(&outbox).await;

    let mut dups = 0;
    let mut handled = 0;
    for i in 0..kills {
        let skip = rand::random::<u64>() % 15;
        println!("consumer {} freezes at hit {} of {point}", i + 1, skip + 1);
        let mut w = env
            .worker(&broker, "consumer")
            .freeze(point, skip, 0)
            .spawn(WORKER);
        w.wait_frozen(Duration::from_secs(45)).await;
        let s = w.fresh_stats(Duration::from_secs(5)).await;
        w.kill();
        dups += s.duplicates;
        handled += s.handled;
        println!(
            "kill {}/{kills} at {point} after {} records: {s:?}",
            i + 1,
            skip + 1
        );
    }
    let mut last = env.worker(&broker, "consumer").spawn(WORKER);
    env.settled(Duration::from_secs(60)).await;
    if point != "consumer.before_commit" && dups < kills as u64 {
        // Killed at its last batch, the consumer had already committed every row, so
        // the table is settled at once; the records whose offsets it never stored reach
        // this consumer only once it has joined the group. Wait for them too (a CI run
        // terminated it first and counted no duplicate).
        let want = kills as u64 - dups;
        let _ = last
            .poll_stats(Duration::from_secs(60), |s| s.duplicates >= want)
            .await;
    }
    let s = last
        .terminate(Duration::from_secs(15))
        .await
        .unwrap_or_default();
    dups += s.duplicates;
    handled += s.handled;
    relay.shutdown().await.expect("shutdown");

    let name = format!("b-consumer-kill@{point}x{kills}[{}]", B::BACKEND_NAME);
    let report = env.check(&name, dups).await;
    println!("{name}: load {load:?}; handled {handled}, duplicate deliveries {dups}");
    report.assert_pass();
    assert_eq!(report.unledgered_rows, 0);
    assert!(report.dead.is_empty(), "{:?}", report.dead);
    if point != "consumer.before_commit" {
        // Each kill left at least one committed record whose offset was not stored.
        assert!(
            dups >= kills as u64,
            "{dups} duplicate deliveries after {kills} kills past the commit"
        );
    }
    env.db.cleanup().await;
}

chaos_tests!(consumer_crash("consumer.before_commit", 1) {
    chaos_b_consumer_kill_before_commit: Postgres,
});

chaos_tests!(consumer_crash("consumer.after_commit", 1) {
    chaos_b_consumer_kill_after_commit: Postgres,
    chaos_b_consumer_kill_after_commit_mysql: MySql,
    chaos_b_consumer_kill_after_commit_sqlite: Sqlite,
});

// SIGKILL between the handler's commit and the offset store, 10 times (50 soak).
chaos_tests!(consumer_crash("consumer.before_offset_store", soak(10, 50)) {
    chaos_b_consumer_kill_before_offset_store_repeated: Postgres,
});

/// c. Zombie relay: relay process A claims and produces, is SIGSTOPped past its lease;
/// relay B takes the rows over and publishes them; A is SIGCONTinued and its stale mark
/// is fenced (0 rows); the consumer gets every event twice, applies it once.
async fn zombie_relay<B: ChaosBackend>() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let (env, load) = committed_150::<B>(&broker).await;

    // A: freezes after producing its first batch (3 s), and is stopped meanwhile.
    let mut a = env
        .worker(&broker, "relay")
        .lease(Duration::from_millis(1_500))
        .freeze("relay.after_produce", 0, 3_000)
        .spawn(WORKER);
    a.wait_frozen(Duration::from_secs(30)).await;
    a.stop();
    let a_claimed = env.leased(false).await;
    assert!(a_claimed > 0);

    // B (in this process) takes over once A's lease expired: everything published.
    let b = env.runtime(&broker, 1, false, chaos_config()).await;
    all_published(&env, "B to publish everything", Duration::from_secs(60)).await;

    // A wakes up and marks with its stale token: fenced.
    a.cont();
    let s = a
        .wait_stats("A's stale mark", Duration::from_secs(30), |s| s.fenced > 0)
        .await;
    assert_eq!(s.published, 0, "the zombie marked rows: {s:?}");
    assert_eq!(s.fenced, a_claimed as u64, "{s:?}");

    let consumer = env.runtime(&broker, 0, true, chaos_config()).await;
    env.settled(Duration::from_secs(60)).await;
    let dups = consumer_duplicates(&[&consumer]);
    a.kill();
    b.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");

    let name = format!("c-zombie-relay[{}]", B::BACKEND_NAME);
    let report = env.check(&name, dups).await;
    println!(
        "{name}: load {load:?}; zombie claimed {a_claimed}, its mark fenced {} rows, marked {}",
        s.fenced, s.published
    );
    report.assert_pass();
    assert!(report.dead.is_empty());
    assert_eq!(report.unledgered_rows, 0);
    assert!(
        dups >= a_claimed as u64,
        "each zombie record was a duplicate"
    );
    let rows = B::fetch_all(
        env.pool(),
        &env.table.parse().unwrap(),
        &"task".parse().unwrap(),
    )
    .await
    .unwrap();
    assert!(rows.iter().all(|r| r.status == Status::Consumed));
    env.db.cleanup().await;
}

chaos_tests!(zombie_relay() {
    chaos_c_zombie_relay: Postgres,
    chaos_c_zombie_relay_mysql: MySql,
    chaos_c_zombie_relay_sqlite: Sqlite,
});

/// c. A relay paused inside its claim transaction, after its claim locked rows and
/// before it commits: the database ends that transaction within its idle bound (5 s on
/// both servers), so another relay claims and publishes those rows too, instead of
/// skipping them for as long as the first one is paused. Not SQLite: a paused process
/// holding its write transaction stops every writer of the file.
async fn relay_paused_in_claim<B: ChaosBackend>() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let (env, load) = committed_150::<B>(&broker).await;

    // A: frozen in its first claim, holding the claimed rows' locks, then stopped.
    let mut a = env
        .worker(&broker, "relay")
        .lease(LEASE)
        .freeze("store.claim_locked", 0, 0)
        .spawn(WORKER);
    a.wait_frozen(Duration::from_secs(30)).await;
    let frozen = std::time::Instant::now();
    a.stop();

    // B publishes everything: the paused claim was rolled back, its rows never leased.
    let b = env.runtime(&broker, 1, false, chaos_config()).await;
    all_published(
        &env,
        "B to publish everything while A is paused in its claim",
        Duration::from_secs(30),
    )
    .await;
    let took = frozen.elapsed();
    a.kill();

    let consumer = env.runtime(&broker, 0, true, chaos_config()).await;
    env.settled(Duration::from_secs(60)).await;
    let dups = consumer_duplicates(&[&consumer]);
    b.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");
    let name = format!("c-relay-paused-in-claim[{}]", B::BACKEND_NAME);
    let report = env.check(&name, dups).await;
    println!("{name}: load {load:?}; B published everything {took:.1?} after A froze in its claim");
    report.assert_pass();
    assert!(report.dead.is_empty());
    assert_eq!(report.unledgered_rows, 0);
    env.db.cleanup().await;
}

chaos_tests!(relay_paused_in_claim() {
    chaos_c_relay_paused_in_claim: Postgres,
    chaos_c_relay_paused_in_claim_mysql: MySql,
});

/// b. Relay and consumer processes SIGKILLed at random moments under load (not at a
/// named point), alternately, 6 times (20 soak); a fresh process replaces each one.
async fn random_kills<B: ChaosBackend>() {
    use rand::Rng;
    init_tracing();
    let broker = TestBroker::mock().await;
    let env = ChaosEnv::<B>::new(&broker, 3).await;
    let outbox = env.outbox();
    let mut load = Load::new(ci_size::<B, _>(3_000, 3_000, 10_000), 50);
    load.pace = Duration::from_millis(3);
    let running = load.spawn(&outbox);

    let mut relay = env.worker(&broker, "relay").lease(LEASE).spawn(WORKER);
    let mut consumer = env.worker(&broker, "consumer").spawn(WORKER);
    let mut dups = 0;
    let kills = ci_size::<B, _>(6, 6, 20);
    for i in 0..kills {
        // Only kill a process that is working (a consumer joins its group in seconds),
        // then at a random moment: fault pacing, not synchronisation. Once the load is
        // over there may be nothing left to work on (a batching consumer catches up
        // fast; what a restarted one re-reads are duplicates): then any moment will do.
        let load_done = || running.is_finished();
        if i % 2 == 0 {
            relay
                .wait_stats("published", Duration::from_secs(30), |s| {
                    s.published > 0 || load_done()
                })
                .await;
        } else {
            consumer
                .wait_stats("handled", Duration::from_secs(30), |s| {
                    s.handled > 0 || s.duplicates > 0 || load_done()
                })
                .await;
        }
        let pause = rand::thread_rng().gen_range(50..600);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if i % 2 == 0 {
            relay.kill();
            relay = env.worker(&broker, "relay").lease(LEASE).spawn(WORKER);
        } else {
            dups += consumer.stats().map_or(0, |s| s.duplicates);
            consumer.kill();
            consumer = env.worker(&broker, "consumer").spawn(WORKER);
        }
    }
    let load = running.await.unwrap();
    env.settled(Duration::from_secs(90)).await;
    let relay_after = relay
        .terminate(Duration::from_secs(15))
        .await
        .unwrap_or_default();
    let consumer_after = consumer
        .terminate(Duration::from_secs(15))
        .await
        .unwrap_or_default();
    dups += consumer_after.duplicates;

    let name = format!("b-random-kills[{}]", B::BACKEND_NAME);
    let report = env.check(&name, dups).await;
    println!(
        "{name}: load {load:?}; {kills} kills; last relay published {} (fenced {}), \
         last consumer handled {}",
        relay_after.published, relay_after.fenced, consumer_after.handled
    );
    report.assert_pass();
    assert_eq!(report.unledgered_rows, 0);
    assert!(report.dead.is_empty(), "{:?}", report.dead);
    env.db.cleanup().await;
}

chaos_tests!(random_kills() {
    chaos_b_random_kills_under_load: Postgres,
    chaos_b_random_kills_under_load_mysql: MySql,
    chaos_b_random_kills_under_load_sqlite: Sqlite,
});
