//! h. Subscriptions: `task` publishes [`TaskCreated`] through the framework's outbox and
//! relay (on the bench's database) into its topic; `notification`, on a PostgreSQL
//! database of its own, handles each event with one effect INSERT. Two contenders read
//! the topic, alternating, medians over repeats:
//!
//! - **framework**: an [`OutboxRuntime`] for `notification` running its subscription
//!   (intake → `notification_inbox` → handler [`notification_on_task_created`]);
//! - **hand-written inbox consumer** ([`txconsumer`] settling with [`InboxEffect`]): what a careful team writes without
//!   the framework. A StreamConsumer with the same Kafka settings (`enable.auto.offset.store`
//!   false, auto commit on) in its own group; records go to one worker per partition (in
//!   order); a worker takes what is already queued for its partition (up to
//!   [`txconsumer::BATCH`]) and, in ONE transaction, per record: `INSERT INTO processed
//!   (event_id) VALUES ($ce_id) ON CONFLICT DO NOTHING`, the effect INSERT if the id was
//!   new; COMMIT; then stores the offset of the batch's last record.
//!   (`OUTBOX_BENCH_H_SERIAL=1`, an experiment: one worker for all partitions.)
//!
//! Measured:
//! - **drain**: a backlog of `--sub-backlog` events published once (outbox + relay) onto
//!   one topic; each run reads it from the start in a fresh group into emptied tables:
//!   events/s from the subscriber's start to the last effect row's `written_at`;
//! - **latency**: the publisher at steady rates (`--sub-rates`, `--latency-secs`), per
//!   event: the publisher's database clock just before its COMMIT (carried in the
//!   payload) → the database clock at the COMMIT of the transaction that wrote the
//!   effect (a deferred constraint trigger on `effects` writes it into
//!   `effect_commits`). Both clocks are the one PostgreSQL server's.

use super::*;

use rdkafka::message::OwnedMessage;
use tokio::sync::watch;

use crate::txconsumer::{self, ce_id, Settle};

/// Events per transaction when publishing the drain's backlog.
const FILL_TX: u64 = 1_000;

/// The two contenders, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sub {
    Baseline,
    Framework,
}

impl Sub {
    const ALL: [Sub; 2] = [Sub::Baseline, Sub::Framework];

    fn name(self) -> &'static str {
        match self {
            Sub::Baseline => "hand-written inbox consumer",
            Sub::Framework => "framework subscriber",
        }
    }
}

/// The subscriber's database (created fresh, dropped at the end) and the tables both
/// contenders write: the effect, the hand-written consumer's `processed` ids, and the
/// effects' commit times (latency runs).
struct SubDb {
    name: String,
    pool: PgPool,
}

async fn sub_db(args: &Args) -> Res<SubDb> {
    let name = fresh("outbox_bench_sub_").replace('-', "_");
    Postgres::create_database(args, &name).await?;
    let pool = Postgres::connect(args, &name).await?;
    let db = SubDb { name, pool };
    for ddl in [
        "CREATE TABLE effects (seq BIGINT NOT NULL, published_us BIGINT NOT NULL, \
            written_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        "CREATE TABLE processed (event_id UUID PRIMARY KEY)",
        "CREATE TABLE effect_commits (seq BIGINT NOT NULL, \
            committed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        // Fires at the COMMIT of the transaction that inserted the effect (before its
        // WAL flush), for either contender alike. Enabled for the latency runs only.
        "CREATE FUNCTION effect_committed() RETURNS trigger LANGUAGE plpgsql AS $$ \
            BEGIN INSERT INTO effect_commits (seq) VALUES (NEW.seq); RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER effect_committed AFTER INSERT ON effects \
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION effect_committed()",
        "ALTER TABLE effects DISABLE TRIGGER effect_committed",
    ] {
        if let Err(e) = sqlx::query(ddl).execute(&db.pool).await {
            db.drop(args).await;
            return Err(e.into());
        }
    }
    Ok(db)
}

impl SubDb {
    async fn drop(&self, args: &Args) {
        self.pool.close().await;
        if let Err(e) = Postgres::drop_database(args, &self.name).await {
            log(format!("h: dropping {}: {e}", self.name));
        }
    }

    /// Empties what either contender wrote (effects, `processed`, the inbox).
    async fn reset(&self, inbox: &str) -> Res<()> {
        sqlx::query(&format!(
            "TRUNCATE effects, processed, effect_commits, {inbox}, {inbox}_seen"
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A connection of its own, closed after use: a closing backend flushes its
    /// statistics, so [`commits`](Self::commits) counts its transactions exactly.
    async fn conn(&self) -> Res<PgConnection> {
        Ok(self
            .pool
            .connect_options()
            .as_ref()
            .clone()
            .connect()
            .await?)
    }

    /// The database's committed transactions so far (`pg_stat_database.xact_commit`,
    /// counting this read's own) and its clock now.
    async fn commits(&self) -> Res<(i64, chrono::DateTime<chrono::Utc>)> {
        let mut c = self.conn().await?;
        let r = sqlx::query_as(
            "SELECT xact_commit, clock_timestamp() FROM pg_stat_database \
              WHERE datname = current_database()",
        )
        .fetch_one(&mut c)
        .await?;
        c.close().await?;
        Ok(r)
    }

    /// Waits until `n` distinct seqs in `lo..=hi` have effect rows, or `secs`; returns
    /// (distinct seqs, effect rows, polls: each one transaction).
    async fn wait_effects(&self, lo: u64, hi: u64, n: u64, secs: u64) -> Res<(u64, u64, i64)> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut c = self.conn().await?;
        let mut polls = 0;
        loop {
            let (distinct, rows): (i64, i64) = sqlx::query_as(
                "SELECT count(DISTINCT seq), count(*) FROM effects WHERE seq BETWEEN $1 AND $2",
            )
            .bind(lo as i64)
            .bind(hi as i64)
            .fetch_one(&mut c)
            .await?;
            polls += 1;
            if distinct as u64 >= n || Instant::now() > deadline {
                c.close().await?;
                return Ok((distinct as u64, rows as u64, polls));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The transactions a contender committed since `before` (a [`commits`] reading),
    /// `polls` of the bench's own taken out. Call once its connections are closed.
    async fn contender_commits(&self, before: i64, polls: i64) -> Res<i64> {
        // Backends flush their statistics as they exit, just after the pool closed.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (after, _) = self.commits().await?;
        // The `before` reading's own transaction is counted in `after`; this one's not.
        Ok(after - before - 1 - polls)
    }
}

/// A catalog whose topics carry `topics` as prefix and whose groups `groups`.
fn catalog_with(topics: &str, groups: &str) -> Res<Catalog> {
    Ok(Catalog::builder()
        .topic_prefix(format!("{topics}."))
        .group_prefix(format!("{groups}."))
        .build()?)
}

/// Creates `catalog`'s topics of `task` (`--partitions`) and `notification` (1).
async fn create_topics(ctx: &Ctx<Postgres>, catalog: &Catalog) -> Res<()> {
    ctx.broker
        .create_topic(
            catalog.route_of::<Task>()?.topic().as_str(),
            ctx.args.partitions,
        )
        .await?;
    ctx.broker
        .create_topic(catalog.route_of::<Notification>()?.topic().as_str(), 1)
        .await
}

fn task_created(seq: u64, published_us: i64) -> TaskCreated {
    TaskCreated {
        task_id: format!("task-{}", seq % 1000),
        seq,
        published_us,
    }
}

/// A running contender.
enum Running {
    Framework(outbox_runtime::RuntimeHandle),
    Baseline(watch::Sender<bool>, tokio::task::JoinHandle<Res<()>>),
}

impl Running {
    /// Logs the framework's subscription counters (`what`: the run).
    fn log_stats(&self, what: &str) {
        if let Running::Framework(h) = self {
            if let Some((intake, settled)) = h.subscriber_stats(Notification::NAME, Task::NAME) {
                let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
                log(format!(
                    "h: {what} framework intake: received {} inboxed {} duplicates {} ignored {} \
                     db retries {}; settlement: handled {} batched {} deferred {} duplicates {} \
                     retried {} batch lock waits {}",
                    c(&intake.received),
                    c(&intake.inboxed),
                    c(&intake.duplicates),
                    c(&intake.ignored),
                    c(&intake.db_retries),
                    c(&settled.handled),
                    c(&settled.batched),
                    c(&settled.deferred),
                    c(&settled.duplicates),
                    c(&settled.retried),
                    c(&settled.batch_lock_waits),
                ));
            }
        }
    }

    async fn stop(self) -> Res<()> {
        match self {
            Running::Framework(h) => Ok(h.shutdown().await?),
            Running::Baseline(stop, task) => {
                let _ = stop.send(true);
                task.await?
            }
        }
    }
}

/// Starts `who` on `catalog`'s `task` topic, on `pool` (the subscriber's database).
async fn start(ctx: &Ctx<Postgres>, pool: &PgPool, catalog: &Catalog, who: Sub) -> Res<Running> {
    match who {
        Sub::Framework => {
            // The whole `notification` service as deployed (its relay and consumer
            // idle); its tables were migrated before the clock started.
            let handle = OutboxRuntime::new(catalog.clone(), pool.clone(), ctx.kafka())
                .services([Notification::NAME])
                .migrate(false)
                .start()
                .await?;
            Ok(Running::Framework(handle))
        }
        Sub::Baseline => {
            let topic = catalog.route_of::<Task>()?.topic().to_string();
            let group = format!(
                "{}.handwritten",
                catalog
                    .subscription(Notification::NAME, Task::NAME)
                    .ok_or("no subscription of notification to task")?
                    .group
            );
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(txconsumer::run(
                ctx.kafka(),
                group,
                topic,
                pool.clone(),
                InboxEffect,
                serial(),
                stopped,
            ));
            Ok(Running::Baseline(stop, task))
        }
    }
}

/// `OUTBOX_BENCH_H_SERIAL=1`: the hand-written consumer runs one worker for all
/// partitions (an experiment: the framework's intake is one loop per subscription).
fn serial() -> bool {
    std::env::var("OUTBOX_BENCH_H_SERIAL").is_ok_and(|v| v == "1")
}

/// The hand-written inbox consumer's settlement, per record: `INSERT INTO processed
/// (event_id) … ON CONFLICT DO NOTHING`, and the effect if the id was new.
struct InboxEffect;

impl Settle for InboxEffect {
    async fn settle(&self, tx: &mut PgConnection, batch: &[OwnedMessage]) -> Res<()> {
        for m in batch {
            let id = ce_id(m).ok_or("a record without a ce_id header")?;
            let new =
                sqlx::query("INSERT INTO processed (event_id) VALUES ($1) ON CONFLICT DO NOTHING")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    == 1;
            if new {
                let e: TaskCreated = serde_json::from_slice(m.payload().unwrap_or_default())?;
                sqlx::query(EFFECT_INSERT)
                    .bind(e.seq as i64)
                    .bind(e.published_us)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Publishes `n` events through `task`'s outbox (1,000 per transaction) and drains them
/// onto its topic with the framework's relay.
async fn fill(ctx: &Ctx<Postgres>, catalog: &Catalog, n: u64) -> Res<()> {
    let route = catalog.route_of::<Task>()?.clone();
    Postgres::exec(&ctx.pool, &format!("TRUNCATE {}", route.table())).await?;
    let outbox = Outbox::<Task, Postgres>::new(ctx.pool.clone(), catalog)?;
    let mut done = 0;
    while done < n {
        let events: Vec<TaskCreated> = (done..(done + FILL_TX).min(n))
            .map(|_| task_created(SEQ.fetch_add(1, Ordering::Relaxed), 0))
            .collect();
        let mut tx = ctx.pool.begin().await?;
        outbox.publish_all(&mut *tx, &events).await?;
        tx.commit().await?;
        done += events.len() as u64;
    }
    let rate = framework_drain(ctx, &route, n as i64, 1).await?.per_sec;
    log(format!(
        "h: backlog of {n} events published onto {} ({rate:.0} events/s)",
        route.topic()
    ));
    Ok(())
}

/// One drain of the backlog on `fill`'s topics in a fresh group: (events/s from the
/// start, events/s from the first effect, seconds from the start to the first effect).
async fn drain(
    ctx: &Ctx<Postgres>,
    db: &SubDb,
    topics: &str,
    who: Sub,
) -> Res<(f64, f64, f64, f64)> {
    let catalog = catalog_with(topics, &fresh("subdrain"))?;
    let inbox = subscription_inbox(&catalog)?;
    db.reset(&inbox).await?;
    let n = ctx.args.sub_backlog;
    let pool = small_pool_on(&db.pool, 8).await?;
    let (before, t0) = db.commits().await?;
    let running = start(ctx, &pool, &catalog, who).await?;
    let (got, rows, polls) = db.wait_effects(0, i64::MAX as u64, n, 300).await?;
    running.log_stats("drain");
    running.stop().await?;
    pool.close().await;
    let commits = db.contender_commits(before, polls).await?;
    if got < n || rows != got {
        return Err(format!(
            "h: drain by the {}: {got} of {n} events have effects ({rows} effect rows) after 300 s",
            who.name()
        )
        .into());
    }
    let (first, last): (f64, f64) = sqlx::query_as(
        "SELECT extract(epoch FROM min(written_at) - $1)::float8, \
                extract(epoch FROM max(written_at) - $1)::float8 FROM effects",
    )
    .bind(t0)
    .fetch_one(&db.pool)
    .await?;
    Ok((
        n as f64 / last,
        (n - 1) as f64 / (last - first),
        first,
        commits as f64 / n as f64,
    ))
}

/// The inbox table of `notification`'s subscription to `task`.
fn subscription_inbox(catalog: &Catalog) -> Res<String> {
    Ok(catalog
        .subscription(Notification::NAME, Task::NAME)
        .ok_or("no subscription of notification to task")?
        .route()
        .table()
        .to_string())
}

/// A pool of `n` connections to `pool`'s database.
async fn small_pool_on(pool: &PgPool, n: u32) -> Res<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(n)
        .connect_with(pool.connect_options().as_ref().clone())
        .await?)
}

/// One latency run's figures (ms) and counts.
#[derive(Clone, Copy, Debug)]
struct Lat {
    p50: f64,
    p99: f64,
    max: f64,
    /// The same at the effect INSERT (`written_at`), before the COMMIT: for the log.
    p50_written: f64,
    delivered: u64,
    published: u64,
    duplicates: u64,
    /// Transactions the contender committed per event (warm-up event included).
    commits_per_event: f64,
}

/// One latency run at `rate`: fresh topics and groups, `task`'s runtime (relay only) on
/// the bench's database, `who` on the subscriber's.
async fn latency(ctx: &Ctx<Postgres>, db: &SubDb, who: Sub, rate: u64) -> Res<Lat> {
    let prefix = fresh("sublat");
    let catalog = catalog_with(&prefix, &prefix)?;
    create_topics(ctx, &catalog).await?;
    let inbox = subscription_inbox(&catalog)?;
    db.reset(&inbox).await?;
    let table = catalog.route_of::<Task>()?.table().to_string();
    Postgres::exec(&ctx.pool, &format!("TRUNCATE {table}")).await?;
    let publisher_pool = small_pool(ctx, 8).await?;
    let publisher = OutboxRuntime::new(catalog.clone(), publisher_pool.clone(), ctx.kafka())
        .services([Task::NAME])
        .consumers(false)
        .migrate(false)
        .start()
        .await?;
    let pool = small_pool_on(&db.pool, 8).await?;
    let (before, _) = db.commits().await?;
    let running = start(ctx, &pool, &catalog, who).await?;
    let outbox = Outbox::<Task, Postgres>::new(ctx.pool.clone(), &catalog)?;
    let publish = move |seq: u64| {
        let outbox = outbox.clone();
        async move {
            let mut tx = outbox.begin().await?;
            let now: i64 = sqlx::query_scalar(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
            )
            .fetch_one(&mut *tx)
            .await?;
            tx.publish(&task_created(seq, now)).await?;
            tx.commit().await?;
            Ok(())
        }
    };
    // Warm-up: the subscriber has joined its group and handled one event.
    let warm = SEQ.fetch_add(1, Ordering::Relaxed);
    publish.clone()(warm).await?;
    let (warmed, _, warm_polls) = db.wait_effects(warm, warm, 1, 60).await?;
    if warmed < 1 {
        return Err(format!("h: {}: warm-up event not handled in 60 s", who.name()).into());
    }
    let seqs = steady(rate, ctx.args.latency_secs, publish).await?;
    let (lo, hi) = (seqs[0], *seqs.last().expect("events published"));
    let (delivered, rows, polls) = db.wait_effects(lo, hi, seqs.len() as u64, 30).await?;
    running.log_stats(&format!("{rate}/s"));
    running.stop().await?;
    publisher.shutdown().await?;
    pool.close().await;
    publisher_pool.close().await;
    let commits = db.contender_commits(before, warm_polls + polls).await?;
    let committed = sorted_ms(
        &db.pool,
        lo,
        hi,
        "SELECT ((extract(epoch FROM c.committed_at) * 1000000)::bigint \
                - e.published_us) / 1000.0::float8 \
           FROM effects e JOIN effect_commits c ON c.seq = e.seq \
          WHERE e.seq BETWEEN $1 AND $2",
    )
    .await?;
    let written = sorted_ms(
        &db.pool,
        lo,
        hi,
        "SELECT ((extract(epoch FROM written_at) * 1000000)::bigint \
                - published_us) / 1000.0::float8 \
           FROM effects WHERE seq BETWEEN $1 AND $2",
    )
    .await?;
    Ok(Lat {
        p50: percentile(&committed, 50.0),
        p99: percentile(&committed, 99.0),
        max: committed.last().copied().unwrap_or(f64::NAN),
        p50_written: percentile(&written, 50.0),
        delivered,
        published: seqs.len() as u64,
        duplicates: rows - delivered,
        commits_per_event: commits as f64 / (seqs.len() + 1) as f64,
    })
}

/// The values of `sql` (one float8 column; `$1`, `$2` = `lo`, `hi`), sorted.
async fn sorted_ms(pool: &PgPool, lo: u64, hi: u64, sql: &str) -> Res<Vec<f64>> {
    let mut v: Vec<f64> = sqlx::query_scalar(sql)
        .bind(lo as i64)
        .bind(hi as i64)
        .fetch_all(pool)
        .await?;
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(v)
}

pub(crate) async fn section_h(ctx: &Ctx<Postgres>, report: &mut Report) -> Res<()> {
    log("h: subscriber vs a hand-written inbox consumer, alternating (drain, then latency)");
    if serial() {
        log("h: OUTBOX_BENCH_H_SERIAL=1: the hand-written consumer runs ONE worker for all partitions");
    }
    let db = sub_db(&ctx.args).await?;
    let result = async {
        // Both databases' tables, before any clock starts.
        let catalog = Catalog::builder().build()?;
        outbox_runtime::migrate(&ctx.pool, &catalog, [Task::NAME]).await?;
        outbox_runtime::migrate(&db.pool, &catalog, [Notification::NAME]).await?;
        run(ctx, &db, report).await
    }
    .await;
    db.drop(&ctx.args).await;
    result
}

fn med_of<T>(v: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(&mut v.iter().map(f).collect::<Vec<_>>())
}

async fn run(ctx: &Ctx<Postgres>, db: &SubDb, report: &mut Report) -> Res<()> {
    let n = ctx.args.sub_backlog;
    let repeats = ctx.args.repeats;
    let mut rows = Vec::new();

    // Drain: one backlog, read by every run in a fresh group.
    let topics = fresh("subfill");
    let fill_catalog = catalog_with(&topics, &topics)?;
    create_topics(ctx, &fill_catalog).await?;
    fill(ctx, &fill_catalog, n).await?;
    let mut drains: [Vec<(f64, f64, f64, f64)>; 2] = Default::default();
    for rep in 0..repeats {
        for i in 0..2 {
            let who = Sub::ALL[(i + rep) % 2];
            let (rate, after_first, first, per) = drain(ctx, db, &topics, who).await?;
            log(format!(
                "h: drain of {n}  {:<28} {rate:>7.0} events/s (first effect after {first:.2} s, \
                 {after_first:.0} events/s from there; {:.1} transactions per 1,000 events)",
                who.name(),
                per * 1000.0
            ));
            drains[who as usize].push((rate, after_first, first, per));
        }
    }
    let base = med_of(&drains[Sub::Baseline as usize], |x| x.0);
    let base_after = med_of(&drains[Sub::Baseline as usize], |x| x.1);
    for who in Sub::ALL {
        let rate = med_of(&drains[who as usize], |x| x.0);
        let after = med_of(&drains[who as usize], |x| x.1);
        rows.push(vec![
            format!("drain of {n}"),
            who.name().into(),
            format!("{rate:.0}"),
            format!("{after:.0}"),
            "".into(),
            "".into(),
            "".into(),
            format!(
                "{:.2} / {:.2} (events/s from start / from first effect)",
                rate / base,
                after / base_after
            ),
            format!("{:.0}", 1000.0 * med_of(&drains[who as usize], |x| x.3)),
            format!("{} of {}", n * repeats as u64, n * repeats as u64),
        ]);
    }
    let first = |who: Sub| med_of(&drains[who as usize], |x| x.2);
    let (first_fw, first_base) = (first(Sub::Framework), first(Sub::Baseline));

    // Latency: fresh topics per run; the commit trigger on.
    Postgres::exec(
        &db.pool,
        "ALTER TABLE effects ENABLE TRIGGER effect_committed",
    )
    .await?;
    for &rate in &ctx.args.sub_rates {
        let mut res: [Vec<Lat>; 2] = Default::default();
        for rep in 0..repeats {
            for i in 0..2 {
                let who = Sub::ALL[(i + rep) % 2];
                let l = latency(ctx, db, who, rate).await?;
                log(format!(
                    "h: {rate:>5}/s {:<28} p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  \
                     (p50 at the effect INSERT {:.1} ms)  delivered {} of {}, duplicate effects {}, \
                     {:.2} transactions per event",
                    who.name(),
                    l.p50,
                    l.p99,
                    l.max,
                    l.p50_written,
                    l.delivered,
                    l.published,
                    l.duplicates,
                    l.commits_per_event
                ));
                res[who as usize].push(l);
            }
        }
        let b = &res[Sub::Baseline as usize];
        let (b50, b99) = (med_of(b, |l| l.p50), med_of(b, |l| l.p99));
        for who in Sub::ALL {
            let v = &res[who as usize];
            let (p50, p99, max) = (
                med_of(v, |l| l.p50),
                med_of(v, |l| l.p99),
                med_of(v, |l| l.max),
            );
            let delivered: u64 = v.iter().map(|l| l.delivered).sum();
            let published: u64 = v.iter().map(|l| l.published).sum();
            let dups: u64 = v.iter().map(|l| l.duplicates).sum();
            rows.push(vec![
                format!("{rate}/s for {} s", ctx.args.latency_secs),
                who.name().into(),
                "".into(),
                "".into(),
                format!("{p50:.1}"),
                format!("{p99:.1}"),
                format!("{max:.1}"),
                format!("{:.2} / {:.2} (p50 / p99)", p50 / b50, p99 / b99),
                format!("{:.0}", 1000.0 * med_of(v, |l| l.commits_per_event)),
                if dups > 0 {
                    format!("{delivered} of {published} ({dups} duplicate effects)")
                } else {
                    format!("{delivered} of {published}")
                },
            ]);
        }
    }
    let config = OutboxConfig::default();
    report.section(
        "h. Subscriber: commit → subscriber handler latency and subscriber throughput",
        &[
            "run",
            "subscriber",
            "events/s, start → last effect",
            "events/s, first → last effect",
            "p50 ms",
            "p99 ms",
            "max ms",
            "× hand-written",
            "transactions per 1,000 events",
            "delivered (all repeats)",
        ],
        rows,
        &format!(
            "Goal: the framework ≥ 0.9× the hand-written consumer's events/s, p99 ≤ 1.2× its \
             p99. `task` publishes `TaskCreated` (1,000 keys) through its outbox and relay on the \
             bench's database into a {partitions}-partition topic; `notification` runs on a second \
             PostgreSQL database on the same server, and each event's handling is one effect \
             INSERT in the transaction that settles it. Framework: an `OutboxRuntime` for \
             `notification` (`OutboxConfig::default()`: intake batches of up to 256 records, \
             `consumer_batch_size` {batch}, {lanes} lanes; pool of 8). Hand-written: a \
             StreamConsumer with the framework's Kafka settings (`enable.auto.offset.store` false, \
             auto commit), one worker per partition taking what is already queued for it (≤ \
             {bb}) into ONE transaction: per record `INSERT INTO processed (event_id) VALUES \
             ($ce_id) ON CONFLICT DO NOTHING`, the effect if new, then COMMIT, then the offset \
             stored (pool of 8). Drain: a backlog of {n} events published once, each run reading \
             it from the start in a fresh group into emptied tables; events/s from the \
             subscriber's start to its last effect row (`written_at`), and from its first effect \
             row to its last (without the start-up: the group join, first fetch; medians: first \
             effect after {first_fw:.2} s framework, {first_base:.2} s hand-written). Latency: \
             fresh topics per run, warmed up by one event; from the publisher's database clock \
             just before its COMMIT (in the payload) to the database clock at the COMMIT of the \
             effect's transaction (a deferred constraint trigger, before the WAL flush), per \
             event; medians over {repeats} repeats of each run's p50/p99/max, contenders \
             alternating; delivered = events with an effect row within 30 s of the last publish. \
             Transactions: the subscriber database's committed transactions \
             (`pg_stat_database.xact_commit`) during a run, the bench's own polls taken out, per \
             1,000 events (median; the framework's include its idle relay's and consumer's polls). \
             Settings: `--sub-backlog {n}`, `--sub-rates {rates}`, `--latency-secs {secs}`, \
             `--repeats {repeats}`, `--partitions {partitions}`.",
            partitions = ctx.args.partitions,
            batch = config.consumer_batch_size,
            lanes = config.consumer_lanes,
            bb = txconsumer::BATCH,
            rates = ctx
                .args
                .sub_rates
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(","),
            secs = ctx.args.latency_secs,
        ),
    );
    Ok(())
}
