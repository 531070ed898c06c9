//! Fault suite, subscriptions: `task` publishes ledgered events on PostgreSQL;
//! `notification` subscribes from its own MariaDB database (its inbox), in separate
//! `chaos-worker` processes that are SIGKILLed, frozen, and churned. The ledger oracle
//! reads the ledger from the publisher's database and the effects and inbox rows from
//! the subscriber's: lost 0, duplicate effects 0, order violations 0. See
//! RELIABILITY.md.

use std::time::Duration;

use outbox_runtime::{Backend, Status};
use outbox_tests::broker::TestBroker;
use outbox_tests::chaos::{
    chaos_config, init_tracing, soak, ChaosBackend, ChaosEnv, Load, Worker, WorkerSpec,
};
use outbox_tests::db::TestMySql;
use outbox_tests::e2e::create_effects;
use outbox_tests::oracle::{self, Report};
use outbox_tests::services::{record, Notification, TaskCreated};
use sqlx::{MySql, Postgres};

const WORKER: &str = env!("CARGO_BIN_EXE_chaos-worker");

/// The worker's subscription, declared here too so this binary's catalog lists it
/// (inbox and group names; `migrate` creates the inbox). It runs only in the workers.
#[outbox_runtime::outbox_handler(subscriber = Notification)]
async fn notification_on_task_created<DB: Backend>(
    ctx: &mut outbox_runtime::HandlerContext<DB>,
    event: TaskCreated,
) -> Result<(), outbox_runtime::HandlerError> {
    record(ctx, &event.task_id, event.seq, &event.script).await
}
const LEASE: Duration = Duration::from_millis(2_000);

/// A scenario's two databases: the publisher's (ledger, `task` outbox) and the
/// subscriber's (`notification`'s inbox, effects).
struct World {
    publisher: ChaosEnv<Postgres>,
    subscriber: TestMySql,
    inbox: String,
}

impl World {
    async fn new(broker: &TestBroker) -> World {
        let publisher = ChaosEnv::<Postgres>::new(broker, 3).await;
        let subscriber = TestMySql::create().await;
        outbox_runtime::migrate(subscriber.pool(), &publisher.catalog, ["notification"])
            .await
            .expect("migrating the subscriber");
        create_effects(subscriber.pool()).await;
        let inbox = publisher
            .catalog
            .subscription("notification", "task")
            .expect("the worker's subscription is declared in this binary too")
            .inbox
            .clone();
        World {
            publisher,
            subscriber,
            inbox,
        }
    }

    /// A subscriber worker process: `notification`'s subscription on the subscriber's
    /// database.
    fn subscriber_worker(&self, broker: &TestBroker) -> WorkerSpec {
        self.publisher
            .worker(broker, "subscriber")
            .env("CHAOS_DB_URL", MySql::url(&self.subscriber))
            .lease(LEASE)
    }

    /// Waits until the inbox holds a settled row for every committed event.
    async fn settled(&self, timeout: Duration) {
        let ledger = <Postgres as ChaosBackend>::ledger_len(self.publisher.pool())
            .await
            .expect("ledger");
        let table = self.inbox.parse().unwrap();
        let service = "task".parse().unwrap();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let rows = <MySql as Backend>::fetch_all(self.subscriber.pool(), &table, &service)
                .await
                .expect("reading the inbox");
            let open = rows.iter().filter(|r| !r.status.is_terminal()).count();
            if open == 0 && rows.len() as i64 >= ledger {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the inbox did not settle within {timeout:?}: {} rows of {ledger}, {open} open",
                rows.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until no row of the publisher is pending (it runs no consumer of its own:
    /// its rows end published).
    async fn published(&self, timeout: Duration) {
        let table = self.publisher.table.parse().unwrap();
        let service = "task".parse().unwrap();
        outbox_tests::chaos::poll("every event published", timeout, || async {
            let c = <Postgres as Backend>::counts(self.publisher.pool(), &table, &service)
                .await
                .ok()?;
            (c.pending == 0).then_some(())
        })
        .await;
    }

    async fn check(&self, scenario: &str, duplicates: u64) -> Report {
        oracle::check_subscriber(
            scenario,
            self.publisher.pool(),
            self.subscriber.pool(),
            &self.inbox,
            duplicates,
        )
        .await
    }

    async fn cleanup(self) {
        self.publisher.db.cleanup().await;
        self.subscriber.cleanup().await;
    }
}

/// Terminates `w`, waiting (up to a minute) for its repeats to reach `want` first, and
/// returns its repeats.
async fn finish(mut w: Worker, want: u64) -> u64 {
    if want > 0 {
        let _ = w
            .poll_stats(Duration::from_secs(60), |s| s.duplicates >= want)
            .await;
    }
    w.terminate(Duration::from_secs(15))
        .await
        .map_or(0, |s| s.duplicates)
}

/// s. The subscriber process killed at `point`, `kills` times (each fresh one frozen
/// after a random number of hits), then a last one finishes. At
/// `subscriber.after_intake_commit` the killed one had written a batch into its inbox
/// without storing its offsets: the next one reads those records again and skips them
/// as repeats. At `consumer.after_commit` it had run a handler and committed: the row
/// is consumed, nothing runs twice.
async fn subscriber_crash(point: &str, kills: usize) {
    init_tracing();
    let broker = TestBroker::mock().await;
    let world = World::new(&broker).await;
    let relay = world
        .publisher
        .runtime(&broker, 1, false, chaos_config())
        .await;
    let load = Load::new(soak(400, 2_000), 40)
        .run(&world.publisher.outbox())
        .await;

    let mut dups = 0;
    for i in 0..kills {
        // Right after its first commit: intake writes what it has received in batches
        // of up to 256 records, handlers in the same transaction, so a fresh worker may
        // commit only once before the backlog is gone (a later hit can never come).
        let skip = 0;
        let mut w = world
            .subscriber_worker(&broker)
            .freeze(point, skip, 0)
            .spawn(WORKER);
        w.wait_frozen(Duration::from_secs(45)).await;
        let s = w.fresh_stats(Duration::from_secs(5)).await;
        w.kill();
        dups += s.duplicates;
        println!(
            "kill {}/{kills} at {point} (hit {}): {s:?}",
            i + 1,
            skip + 1
        );
    }
    let last = world.subscriber_worker(&broker).spawn(WORKER);
    world.settled(Duration::from_secs(90)).await;
    let want = if point == "subscriber.after_intake_commit" {
        (kills as u64).saturating_sub(dups)
    } else {
        0
    };
    dups += finish(last, want).await;
    relay.shutdown().await.expect("shutdown");

    let name = format!("s-subscriber-kill@{point}x{kills}");
    let report = world.check(&name, dups).await;
    println!("{name}: load {load:?}; repeats skipped {dups}");
    report.assert_pass();
    assert_eq!(report.unledgered_rows, 0);
    assert!(report.dead.is_empty(), "{:?}", report.dead);
    if point == "subscriber.after_intake_commit" {
        assert!(
            dups >= kills as u64,
            "{dups} repeats after {kills} kills past the intake's commit"
        );
    }
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_s_subscriber_kill_after_intake_commit() {
    subscriber_crash("subscriber.after_intake_commit", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_s_subscriber_kill_after_handler_commit() {
    subscriber_crash("consumer.after_commit", 2).await;
}

/// s. The publisher's relay process killed between the broker's acknowledgement and
/// its mark: a fresh relay publishes the killed one's rows again once their lease
/// expires; the subscriber skips the copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_s_publisher_relay_kill_between_ack_and_mark() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let world = World::new(&broker).await;
    let sub = world.subscriber_worker(&broker).spawn(WORKER);
    let outbox = world.publisher.outbox();
    let mut load = Load::new(600, 30);
    load.pace = Duration::from_millis(5);
    let running = load.spawn(&outbox);
    let mut relay = world
        .publisher
        .worker(&broker, "relay")
        .lease(LEASE)
        .freeze("relay.after_produce", 2, 0)
        .spawn(WORKER);
    relay.wait_frozen(Duration::from_secs(30)).await;
    relay.kill();
    let leased = world.publisher.leased(true).await;
    let mut fresh = world
        .publisher
        .worker(&broker, "relay")
        .lease(LEASE)
        .spawn(WORKER);
    let load = running.await.unwrap();
    world.published(Duration::from_secs(60)).await;
    world.settled(Duration::from_secs(90)).await;
    let _ = fresh.terminate(Duration::from_secs(15)).await;
    // At least one copy comes back (the leased rows include any claimed but not yet
    // produced when it froze: those were never sent twice).
    let dups = finish(sub, 1).await;

    let name = "s-publisher-relay-kill@relay.after_produce";
    let report = world.check(name, dups).await;
    println!("{name}: load {load:?}; {leased} rows leased by the killed relay; repeats {dups}");
    report.assert_pass();
    assert!(leased > 0, "the killed relay should have left leased rows");
    assert!(
        dups > 0,
        "the rows published twice should reach the subscriber twice"
    );
    world.cleanup().await;
}

/// s. A rebalance storm: subscriber processes join, are SIGKILLed or stopped
/// gracefully, every second or so while the load runs; then one finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_s_subscriber_rebalance_storm() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let world = World::new(&broker).await;
    let relay = world
        .publisher
        .runtime(&broker, 1, false, chaos_config())
        .await;
    let outbox = world.publisher.outbox();
    let mut load = Load::new(soak(800, 4_000), 40);
    load.pace = Duration::from_millis(5);
    let running = load.spawn(&outbox);
    let mut workers: Vec<Worker> = (0..2)
        .map(|_| world.subscriber_worker(&broker).spawn(WORKER))
        .collect();
    let mut dups = 0;
    for round in 0..soak(6, 20) {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let mut w = workers.remove(0);
        if round % 2 == 0 {
            dups += w.stats().map_or(0, |s| s.duplicates);
            w.kill();
        } else {
            dups += w
                .terminate(Duration::from_secs(15))
                .await
                .map_or(0, |s| s.duplicates);
        }
        workers.push(world.subscriber_worker(&broker).spawn(WORKER));
    }
    let load = running.await.unwrap();
    world.settled(Duration::from_secs(120)).await;
    for w in workers {
        dups += finish(w, 0).await;
    }
    relay.shutdown().await.expect("shutdown");

    let name = "s-subscriber-rebalance-storm";
    let report = world.check(name, dups).await;
    println!("{name}: load {load:?}; repeats {dups}");
    report.assert_pass();
    assert_eq!(report.unledgered_rows, 0);
    world.cleanup().await;
}

/// s. A late republish after inbox retention: the subscriber deletes every settled
/// inbox row (keeping its keys' watermarks), then the publisher sends every event
/// again (its safety valve). Each copy is a repeat: no effect twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_s_late_republish_after_inbox_retention() {
    init_tracing();
    let broker = TestBroker::mock().await;
    let world = World::new(&broker).await;
    let relay = world
        .publisher
        .runtime(&broker, 1, false, chaos_config())
        .await;
    let load = Load::new(300, 20).run(&world.publisher.outbox()).await;
    let sub = world
        .subscriber_worker(&broker)
        .env("CHAOS_RETENTION_MS", 200)
        .spawn(WORKER);
    // Handled, then deleted by retention.
    let table = world.inbox.parse().unwrap();
    let service = "task".parse().unwrap();
    let ledger = <Postgres as ChaosBackend>::ledger_len(world.publisher.pool())
        .await
        .unwrap() as usize;
    outbox_tests::chaos::poll(
        "the inbox handled and emptied",
        Duration::from_secs(90),
        || async {
            let effects =
                <MySql as outbox_tests::e2e::TestBackend>::effects(world.subscriber.pool())
                    .await
                    .len();
            let rows = <MySql as Backend>::fetch_all(world.subscriber.pool(), &table, &service)
                .await
                .unwrap_or_default();
            (effects >= ledger
                && rows.iter().all(|r| r.status == Status::Consumed)
                && rows.is_empty())
            .then_some(())
        },
    )
    .await;
    let again = <Postgres as Backend>::redeliver_stale(
        world.publisher.pool(),
        &world.publisher.table.parse().unwrap(),
        &service,
        Duration::ZERO,
        None,
        10_000,
    )
    .await
    .unwrap();
    assert_eq!(again as usize, ledger);
    let dups = finish(sub, again).await;
    relay.shutdown().await.expect("shutdown");

    let name = "s-late-republish-after-retention";
    let report = world.check(name, dups).await;
    println!("{name}: load {load:?}; republished {again}; repeats {dups}");
    report.assert_pass();
    assert!(
        dups >= again,
        "every copy should be recognised: {dups} of {again}"
    );
    world.cleanup().await;
}
