//! h. Subscriptions: the framework's subscriber (intake into the inbox, worker into the
//! handler) against a hand-written inbox consumer, on a subscriber database of its own
//! (PostgreSQL), contenders alternating, medians over repeats.
//!
//! - **Drain**: a topic already holding `--sub-backlog` records (written straight onto
//!   it with the framework's envelope, the same for both); time from the subscriber's
//!   start to its last handled event.
//! - **Latency**: the framework's publisher (`OutboxTx` + relay) at steady rates; commit
//!   → handler entry, per event, on the bench's clock.
//!
//! The baseline is what a careful team writes by hand: a StreamConsumer with the
//! framework's Kafka settings, and for what is already received (up to 256 records), in
//! ONE transaction: `INSERT INTO processed (event_id) … ON CONFLICT DO NOTHING`, the
//! effect if the id was new, COMMIT, then the offsets. Records are processed in
//! partition order. The framework's handler does the same effect INSERT.

use super::*;

use outbox_runtime::envelope::Envelope;
use outbox_runtime::EventId;

/// Handlers seen by either contender (drain progress).
pub(crate) static SUB_HANDLED: AtomicU64 = AtomicU64::new(0);

/// The subscribing service of section h.
#[outbox_service(name = "bench-sub")]
pub struct BenchSub;

/// The framework's subscriber handler: the effect, in the inbox row's transaction.
#[outbox_handler(subscriber = BenchSub)]
async fn sub_on_tick(ctx: &mut HandlerContext<Postgres>, e: Tick) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO sub_effects (seq) VALUES ($1)")
        .bind(e.seq as i64)
        .execute(ctx.conn())
        .await?;
    saw(e.seq);
    SUB_HANDLED.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

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

/// The subscriber's database: created fresh, dropped at the end.
struct SubDb {
    name: String,
    pool: PgPool,
}

async fn sub_db(args: &Args) -> Res<SubDb> {
    let name = fresh("outbox_bench_sub_").replace('-', "_");
    Postgres::create_database(args, &name).await?;
    let pool = Postgres::connect(args, &name).await?;
    for ddl in [
        "CREATE TABLE sub_effects (seq BIGINT NOT NULL)",
        "CREATE TABLE processed (event_id UUID PRIMARY KEY)",
    ] {
        sqlx::query(ddl).execute(&pool).await?;
    }
    Ok(SubDb { name, pool })
}

/// Empties what either contender wrote.
async fn reset(db: &SubDb) -> Res<()> {
    sqlx::query("TRUNCATE sub_effects, processed")
        .execute(&db.pool)
        .await?;
    // The framework's inbox exists once its runtime has started (migrate).
    let _ = sqlx::query("TRUNCATE bench_sub_inbox, bench_sub_inbox_seen")
        .execute(&db.pool)
        .await;
    SUB_HANDLED.store(0, Ordering::Relaxed);
    Ok(())
}

/// A catalog with fresh topics and groups, the bench topic created.
async fn fresh_catalog(ctx: &Ctx<Postgres>) -> Res<(Catalog, String)> {
    let prefix = fresh("sub");
    let catalog = Catalog::builder()
        .topic_prefix(format!("{prefix}."))
        .group_prefix(format!("{prefix}."))
        .build()?;
    let topic = catalog.route_of::<Bench>()?.topic().to_string();
    ctx.broker.create_topic(&topic, ctx.args.partitions).await?;
    let own = catalog.route_of::<BenchSub>()?.topic().to_string();
    ctx.broker.create_topic(&own, 1).await?;
    Ok((catalog, topic))
}

/// Writes `n` Tick records straight onto `topic`, as the relay would have.
async fn fill(ctx: &Ctx<Postgres>, topic: &str, n: u64) -> Res<Vec<u64>> {
    let producer: FutureProducer = ctx.kafka().producer_config().create()?;
    let mut seqs = Vec::with_capacity(n as usize);
    let mut pending = Vec::new();
    for _ in 0..n {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        seqs.push(seq);
        let tick = Tick {
            key: format!("k{}", seq % 1000),
            seq,
        };
        let payload = serde_json::to_vec(&tick)?;
        let envelope = Envelope {
            event_id: EventId::new(),
            service: "bench".into(),
            event_type: Tick::EVENT_TYPE.into(),
            version: Tick::VERSION,
            key: Some(tick.key.clone()),
            time: chrono::Utc::now(),
            payload: Vec::new(),
            traceparent: None,
            tracestate: None,
        };
        let record = FutureRecord::to(topic)
            .key(&tick.key)
            .payload(&payload)
            .headers(envelope.headers());
        match producer.send_result(record) {
            Ok(f) => pending.push(f),
            Err((e, _)) => return Err(format!("producing the backlog: {e}").into()),
        }
        if pending.len() >= 10_000 {
            for f in pending.drain(..) {
                f.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for f in pending {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(seqs)
}

/// A running contender: stopped by [`Running::stop`].
enum Running {
    Framework(outbox_runtime::RuntimeHandle),
    Baseline(
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<Res<()>>,
    ),
}

impl Running {
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

/// Starts `who` on `catalog`'s bench topic.
async fn start(ctx: &Ctx<Postgres>, db: &SubDb, catalog: &Catalog, who: Sub) -> Res<Running> {
    match who {
        Sub::Framework => {
            let handle = OutboxRuntime::new(catalog.clone(), db.pool.clone(), ctx.kafka())
                .services(["bench-sub"])
                .relays(false)
                .start()
                .await?;
            Ok(Running::Framework(handle))
        }
        Sub::Baseline => {
            let route = catalog.route_of::<Bench>()?;
            let group = format!("{}.baseline", route.group());
            let consumer: StreamConsumer = ctx
                .kafka()
                .consumer_config(&group, OutboxConfig::default().max_payload_bytes)
                .create()?;
            consumer.subscribe(&[route.topic().as_str()])?;
            let (stop, mut stopped) = tokio::sync::watch::channel(false);
            let pool = db.pool.clone();
            let task = tokio::spawn(async move { baseline(consumer, pool, &mut stopped).await });
            Ok(Running::Baseline(stop, task))
        }
    }
}

/// The hand-written inbox consumer.
async fn baseline(
    consumer: StreamConsumer,
    pool: PgPool,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Res<()> {
    use futures::FutureExt;
    let mut batch = Vec::with_capacity(256);
    loop {
        let first = tokio::select! {
            _ = stop.changed() => return Ok(()),
            m = consumer.recv() => m,
        };
        let mut next = Some(first);
        while let Some(m) = next.take() {
            if let Ok(m) = m {
                batch.push(m.detach());
            }
            if batch.len() < 256 {
                next = consumer.recv().now_or_never();
            }
        }
        let mut tx = pool.begin().await?;
        let mut seen = Vec::new();
        for m in &batch {
            let Some(id) = Envelope::event_id_of(m) else {
                continue;
            };
            let new =
                sqlx::query("INSERT INTO processed (event_id) VALUES ($1) ON CONFLICT DO NOTHING")
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            if new == 1 {
                let tick: Tick = serde_json::from_slice(m.payload().unwrap_or_default())?;
                sqlx::query("INSERT INTO sub_effects (seq) VALUES ($1)")
                    .bind(tick.seq as i64)
                    .execute(&mut *tx)
                    .await?;
                seen.push(tick.seq);
            }
        }
        // Measured at the same point as the framework's handler: effect written, before
        // COMMIT.
        for s in &seen {
            saw(*s);
        }
        tx.commit().await?;
        SUB_HANDLED.fetch_add(seen.len() as u64, Ordering::Relaxed);
        for m in &batch {
            consumer.store_offset(m.topic(), m.partition(), m.offset())?;
        }
        batch.clear();
    }
}

/// Waits until `n` events were handled (or 120 s); the elapsed time since `since`.
async fn drained(n: u64, since: Instant) -> Res<Duration> {
    let deadline = since + Duration::from_secs(120);
    while SUB_HANDLED.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return Err(format!(
                "h: drain: {} of {n} handled in 120 s",
                SUB_HANDLED.load(Ordering::Relaxed)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(since.elapsed())
}

/// One drain: events/s.
async fn drain(ctx: &Ctx<Postgres>, db: &SubDb, who: Sub) -> Res<f64> {
    reset(db).await?;
    let (catalog, topic) = fresh_catalog(ctx).await?;
    let n = ctx.args.sub_backlog;
    fill(ctx, &topic, n).await?;
    let t = Instant::now();
    let running = start(ctx, db, &catalog, who).await?;
    let took = drained(n, t).await?;
    running.stop().await?;
    Ok(n as f64 / took.as_secs_f64())
}

/// One latency run at `rate`: (p50, p99, max, not handled).
async fn latency(
    ctx: &Ctx<Postgres>,
    db: &SubDb,
    who: Sub,
    rate: u64,
) -> Res<(f64, f64, f64, usize)> {
    reset(db).await?;
    let (catalog, _) = fresh_catalog(ctx).await?;
    let table = catalog.route_of::<Bench>()?.table().to_string();
    sqlx::query(&format!("TRUNCATE {table}"))
        .execute(&ctx.pool)
        .await?;
    let publisher_pool = small_pool(ctx, 8).await?;
    let publisher = OutboxRuntime::new(catalog.clone(), publisher_pool.clone(), ctx.kafka())
        .services(["bench"])
        .consumers(false)
        .start()
        .await?;
    let running = start(ctx, db, &catalog, who).await?;
    let outbox = Outbox::<Bench, Postgres>::new(ctx.pool.clone(), &catalog)?;
    let publish = {
        let outbox = outbox.clone();
        move |seq: u64| {
            let outbox = outbox.clone();
            async move {
                let mut tx = outbox.begin().await?;
                tx.publish(&Tick {
                    key: format!("k{}", seq % 1000),
                    seq,
                })
                .await?;
                tx.commit().await?;
                committed(seq);
                Ok(())
            }
        }
    };
    let warm = SEQ.fetch_add(1, Ordering::Relaxed);
    publish(warm).await?;
    wait_handled(warm, who.name()).await?;
    let seqs = steady(rate, ctx.args.latency_secs, publish).await?;
    let l = latencies(&seqs).await;
    running.stop().await?;
    publisher.shutdown().await?;
    publisher_pool.close().await;
    Ok(l)
}

pub(crate) async fn section_h(ctx: &Ctx<Postgres>, report: &mut Report) -> Res<()> {
    log("h: subscriber (intake + inbox + worker) vs a hand-written inbox consumer, interleaved");
    let db = sub_db(&ctx.args).await?;
    let result = run(ctx, &db, report).await;
    db.pool.close().await;
    if let Err(e) = Postgres::drop_database(&ctx.args, &db.name).await {
        log(format!("h: dropping {}: {e}", db.name));
    }
    result
}

async fn run(ctx: &Ctx<Postgres>, db: &SubDb, report: &mut Report) -> Res<()> {
    let mut rows = Vec::new();
    // Drain.
    let mut rates: [Vec<f64>; 2] = Default::default();
    for rep in 0..ctx.args.repeats {
        for i in 0..2 {
            let who = Sub::ALL[(i + rep) % 2];
            let r = drain(ctx, db, who).await?;
            log(format!("h: drain {:<28} {r:>8.0} ev/s", who.name()));
            rates[who as usize].push(r);
        }
    }
    let base = median(&mut rates[Sub::Baseline as usize].clone());
    for who in Sub::ALL {
        let m = median(&mut rates[who as usize].clone());
        rows.push(vec![
            format!("drain of {}", ctx.args.sub_backlog),
            who.name().into(),
            format!("{m:.0} ev/s"),
            "".into(),
            "".into(),
            format!("{:.2}", m / base),
            "".into(),
            "".into(),
        ]);
    }
    // Latency.
    for &rate in &ctx.args.sub_rates {
        let mut res: [Vec<(f64, f64, f64, usize)>; 2] = Default::default();
        for rep in 0..ctx.args.repeats {
            for i in 0..2 {
                let who = Sub::ALL[(i + rep) % 2];
                let l = latency(ctx, db, who, rate).await?;
                log(format!(
                    "h: {rate:>5}/s {:<28} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  missing {}",
                    who.name(),
                    l.0,
                    l.1,
                    l.2,
                    l.3
                ));
                res[who as usize].push(l);
            }
        }
        let med = |v: &Vec<(f64, f64, f64, usize)>, f: fn(&(f64, f64, f64, usize)) -> f64| {
            median(&mut v.iter().map(f).collect::<Vec<_>>())
        };
        let b = &res[Sub::Baseline as usize];
        let (b50, b99) = (med(b, |x| x.0), med(b, |x| x.1));
        for who in Sub::ALL {
            let v = &res[who as usize];
            let (p50, p99, max) = (med(v, |x| x.0), med(v, |x| x.1), med(v, |x| x.2));
            let missing: usize = v.iter().map(|x| x.3).sum();
            rows.push(vec![
                format!("{rate}/s"),
                who.name().into(),
                format!("{p50:.1}"),
                format!("{p99:.1}"),
                format!("{max:.1}"),
                "".into(),
                format!("{:.2} / {:.2}", p50 / b50, p99 / b99),
                missing.to_string(),
            ]);
        }
    }
    report.section(
        "h. Subscriber: drain throughput and commit → subscriber handler latency",
        &[
            "run",
            "subscriber",
            "events/s or p50 ms",
            "p99 ms",
            "max ms",
            "throughput × hand-written",
            "p50 / p99 × hand-written",
            "not handled in 30 s",
        ],
        rows,
        &format!(
            "The subscriber's database is a second PostgreSQL database on the same server. \
             Drain: {} records written straight onto a fresh {}-partition topic (the \
             framework's envelope, 1,000 keys), then the subscriber started; events/s from \
             its start to its last handled event. Latency: the framework's publisher \
             (`OutboxTx` + relay, its own pool) at a steady rate for {} s, commit → handler \
             entry (effect written, before its COMMIT, for both). Hand-written: a \
             StreamConsumer with the framework's Kafka settings; per batch of what is \
             already received (≤ 256), one transaction: INSERT the event id into \
             `processed` ON CONFLICT DO NOTHING, the effect if new, COMMIT, then store the \
             offsets. Framework: intake (a batch per transaction into the inbox, offsets \
             after) then the worker (claim heads of key, settle a batch of up to \
             `consumer_batch_size` per transaction). Medians over {} repeats, contenders \
             alternating.",
            ctx.args.sub_backlog, ctx.args.partitions, ctx.args.latency_secs, ctx.args.repeats
        ),
    );
    Ok(())
}
