//! The lean hand-written outbox: what a careful team writes without the framework, on a
//! minimal table of its own, and section i (its drain vs the framework relay's).
//!
//! - **Table** [`LEAN_TABLE`]: `id, topic, key, payload, status, attempts,
//!   next_retry_at, lease_token, lease_until, created_at` with ONE index besides the
//!   primary key: `(id) WHERE status = 0` on PostgreSQL, `(status, id)` on MariaDB (no
//!   partial indexes there).
//! - **Claim** 500 rows in id order, `FOR UPDATE SKIP LOCKED`, leased for 30 s under a
//!   random token: PostgreSQL one `UPDATE … WHERE id IN (SELECT … ORDER BY id FOR UPDATE
//!   SKIP LOCKED LIMIT 500) RETURNING …`; MariaDB (no `RETURNING` on UPDATE) a READ
//!   COMMITTED transaction: the `SELECT … FOR UPDATE SKIP LOCKED`, then the lease
//!   `UPDATE` by id.
//! - **Produce** every claimed row with an rdkafka `FutureProducer` built from the
//!   framework's own Kafka settings (`KafkaConfig::producer_config`: idempotent, acks
//!   all, the same `linger.ms`), wait for all delivery reports, then **mark** with one
//!   `UPDATE … SET status = 1 WHERE id IN/ANY (…) AND lease_token = $token`.
//! - **Wake-up** (PostgreSQL, [`spawn_woken`]): the writer runs `SELECT
//!   pg_notify('lean_outbox', '')` after its COMMIT ([`NOTIFY`]), as section c's raw
//!   pipeline does; the loop LISTENs, drains what is pending, and otherwise sleeps until
//!   a notification or 1 s. Not inside the writer's transaction (nor from a trigger):
//!   a transaction that notifies holds PostgreSQL's notify lock through its COMMIT's
//!   WAL flush, so such commits are serialised, one flush each, and the writers of a
//!   validation run reached 582 of 2,000 events/s. A NOTIFY of its own has no
//!   transaction id, writes no commit record, and costs one round trip.

use super::*;

use tokio::sync::watch;

/// The lean outbox's table (and, on PostgreSQL, its NOTIFY channel).
pub(crate) const LEAN_TABLE: &str = "lean_outbox";

/// The writer's wake-up, after its COMMIT (see the module docs for why not before).
pub(crate) const NOTIFY: &str = "SELECT pg_notify('lean_outbox', '')";

/// Rows per claim.
const CLAIM: i64 = 500;

/// A row the lean loop claimed.
pub(crate) struct LeanRow {
    id: i64,
    topic: String,
    key: Option<String>,
    payload: String,
}

/// The lean outbox's SQL on each database.
pub(crate) trait LeanDb: BenchDb {
    /// What [`log_position`](Self::log_position) measures, in table headers.
    const LOG: &'static str;

    /// Creates [`LEAN_TABLE`] if missing.
    fn lean_create(pool: &Pool<Self>) -> impl Future<Output = Res<()>>;
    /// Appends rows `start..end` for `topic`: key `k{i % keys}`, payload a [`Tick`].
    fn lean_load(
        pool: &Pool<Self>,
        topic: &str,
        keys: i64,
        start: i64,
        end: i64,
    ) -> impl Future<Output = Res<()>>;
    /// Claims up to [`CLAIM`] due rows with a free lease, leased to `token`; id order.
    fn lean_claim(pool: &Pool<Self>, token: i64) -> impl Future<Output = Res<Vec<LeanRow>>> + Send;
    /// Marks `ids` published, fenced by `token`.
    fn lean_mark(
        pool: &Pool<Self>,
        ids: &[i64],
        token: i64,
    ) -> impl Future<Output = Res<()>> + Send;
    /// Rows of `table` still pending (`status = 0`).
    fn pending(pool: &Pool<Self>, table: &str) -> impl Future<Output = Res<i64>>;
    /// The server's write-ahead (redo) log position in bytes, to measure what a drain
    /// wrote.
    fn log_position(pool: &Pool<Self>) -> impl Future<Output = Res<i64>>;
}

impl LeanDb for Postgres {
    const LOG: &'static str = "WAL";

    async fn lean_create(pool: &PgPool) -> Res<()> {
        for ddl in [
            "CREATE TABLE IF NOT EXISTS lean_outbox (
                id bigserial PRIMARY KEY,
                topic text NOT NULL,
                key text,
                payload jsonb NOT NULL,
                status smallint NOT NULL DEFAULT 0,
                attempts int NOT NULL DEFAULT 0,
                next_retry_at timestamptz NOT NULL DEFAULT now(),
                lease_token bigint,
                lease_until timestamptz,
                created_at timestamptz NOT NULL DEFAULT now())",
            "CREATE INDEX IF NOT EXISTS lean_outbox_pending ON lean_outbox (id) WHERE status = 0",
        ] {
            sqlx::query(ddl).execute(pool).await?;
        }
        Ok(())
    }

    async fn lean_load(pool: &PgPool, topic: &str, keys: i64, start: i64, end: i64) -> Res<()> {
        sqlx::query(
            "INSERT INTO lean_outbox (topic, key, payload) \
             SELECT $1, 'k' || (i % $2), json_build_object('key', 'k' || (i % $2), 'seq', i / $2) \
               FROM generate_series($3::bigint, $4::bigint - 1) AS i",
        )
        .bind(topic)
        .bind(keys)
        .bind(start)
        .bind(end)
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn lean_claim(pool: &PgPool, token: i64) -> Res<Vec<LeanRow>> {
        let rows = sqlx::query(
            "UPDATE lean_outbox SET lease_token = $1, lease_until = now() + interval '30 seconds' \
              WHERE id IN (SELECT id FROM lean_outbox \
                            WHERE status = 0 AND next_retry_at <= now() \
                              AND (lease_until IS NULL OR lease_until < now()) \
                            ORDER BY id FOR UPDATE SKIP LOCKED LIMIT $2) \
              RETURNING id, topic, key, payload::text AS payload",
        )
        .bind(token)
        .bind(CLAIM)
        .fetch_all(pool)
        .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(LeanRow {
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    key: r.try_get("key")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect::<Res<Vec<_>>>()?;
        // RETURNING comes in no particular order; produce in id (commit) order.
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    async fn lean_mark(pool: &PgPool, ids: &[i64], token: i64) -> Res<()> {
        sqlx::query("UPDATE lean_outbox SET status = 1 WHERE id = ANY($1) AND lease_token = $2")
            .bind(ids)
            .bind(token)
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn pending(pool: &PgPool, table: &str) -> Res<i64> {
        Ok(
            sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE status = 0"))
                .fetch_one(pool)
                .await?,
        )
    }

    async fn log_position(pool: &PgPool) -> Res<i64> {
        Ok(
            sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
                .fetch_one(pool)
                .await?,
        )
    }
}

impl LeanDb for MySql {
    const LOG: &'static str = "redo log";

    async fn lean_create(pool: &MySqlPool) -> Res<()> {
        // `CURRENT_TIMESTAMP(6)` follows the session time zone; every statement here
        // compares with `NOW(6)` in sessions of the same server default, so they agree.
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS lean_outbox (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                topic VARCHAR(255) NOT NULL,
                `key` VARCHAR(255) NULL,
                payload JSON NOT NULL,
                status SMALLINT NOT NULL DEFAULT 0,
                attempts INT NOT NULL DEFAULT 0,
                next_retry_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                lease_token BIGINT NULL,
                lease_until DATETIME(6) NULL,
                created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                KEY lean_outbox_pending (status, id)
            ) ENGINE = InnoDB",
        )
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn lean_load(pool: &MySqlPool, topic: &str, keys: i64, start: i64, end: i64) -> Res<()> {
        // No generate_series: rows are built here, 1,000 per statement.
        const ROWS: i64 = 1000;
        let mut i = start;
        while i < end {
            let stop = (i + ROWS).min(end);
            QueryBuilder::<MySql>::new("INSERT INTO lean_outbox (topic, `key`, payload) ")
                .push_values(i..stop, |mut b, i| {
                    let key = format!("k{}", i % keys);
                    let payload = serde_json::json!({ "key": key, "seq": i / keys }).to_string();
                    b.push_bind(topic).push_bind(key).push_bind(payload);
                })
                .build()
                .execute(pool)
                .await?;
            i = stop;
        }
        Ok(())
    }

    async fn lean_claim(pool: &MySqlPool, token: i64) -> Res<Vec<LeanRow>> {
        let mut lease = QueryBuilder::<MySql>::new("UPDATE lean_outbox SET lease_token = ");
        lease
            .push_bind(token)
            .push(", lease_until = NOW(6) + INTERVAL 30 SECOND WHERE id IN ");
        mysql_claim(
            pool,
            sqlx::query(
                "SELECT id, topic, `key`, payload FROM lean_outbox \
                  WHERE status = 0 AND next_retry_at <= NOW(6) \
                    AND (lease_until IS NULL OR lease_until < NOW(6)) \
                  ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED",
            )
            .bind(CLAIM),
            |r| {
                Ok(LeanRow {
                    id: r.try_get("id")?,
                    topic: mysql_text(r, "topic")?.unwrap_or_default(),
                    key: mysql_text(r, "key")?,
                    payload: mysql_text(r, "payload")?.unwrap_or_default(),
                })
            },
            |r| r.id,
            lease,
        )
        .await
    }

    async fn lean_mark(pool: &MySqlPool, ids: &[i64], token: i64) -> Res<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut q = QueryBuilder::<MySql>::new("UPDATE lean_outbox SET status = 1 WHERE id IN ");
        push_ids(&mut q, ids.iter().copied());
        q.push(" AND lease_token = ").push_bind(token);
        q.build().execute(pool).await?;
        Ok(())
    }

    async fn pending(pool: &MySqlPool, table: &str) -> Res<i64> {
        Ok(
            sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE status = 0"))
                .fetch_one(pool)
                .await?,
        )
    }

    async fn log_position(pool: &MySqlPool) -> Res<i64> {
        let (_, v): (String, String) =
            sqlx::query_as("SHOW GLOBAL STATUS LIKE 'Innodb_lsn_current'")
                .fetch_one(pool)
                .await?;
        Ok(v.parse()?)
    }
}

/// The lean loop: claim → produce all → wait for every delivery report → mark, one
/// round at a time (no pipelining: what a hand-written loop does).
pub(crate) struct LeanRelay<DB: LeanDb> {
    pool: Pool<DB>,
    producer: FutureProducer,
    /// Claims that found rows.
    pub(crate) rounds: u64,
    /// Rows those claims took.
    pub(crate) claimed: u64,
    /// Claims that found nothing.
    pub(crate) empty: u64,
    /// How long each claim and each mark took, in ms (for `--stage-times`).
    pub(crate) claim_ms: Vec<f64>,
    pub(crate) mark_ms: Vec<f64>,
}

impl<DB: LeanDb> LeanRelay<DB> {
    /// A loop on `pool` with a producer of the framework's Kafka settings.
    pub(crate) fn new(kafka: &KafkaConfig, pool: Pool<DB>) -> Res<LeanRelay<DB>> {
        Ok(LeanRelay {
            pool,
            producer: kafka.producer_config().create()?,
            rounds: 0,
            claimed: 0,
            empty: 0,
            claim_ms: Vec::new(),
            mark_ms: Vec::new(),
        })
    }

    /// One round; the rows it claimed (0: nothing due).
    pub(crate) async fn round(&mut self) -> Res<usize> {
        let token: i64 = rand::random::<i64>() | 1;
        let started = Instant::now();
        let rows = DB::lean_claim(&self.pool, token).await?;
        self.claim_ms.push(started.elapsed().as_secs_f64() * 1e3);
        if rows.is_empty() {
            self.empty += 1;
            return Ok(0);
        }
        let mut futs = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut rec = FutureRecord::to(&row.topic).payload(row.payload.as_bytes());
            if let Some(k) = &row.key {
                rec = rec.key(k.as_bytes());
            }
            futs.push(send_retrying(&self.producer, rec).await?);
        }
        let ok = acknowledged(rows.iter().map(|r| r.id), futs).await;
        let started = Instant::now();
        DB::lean_mark(&self.pool, &ok, token).await?;
        self.mark_ms.push(started.elapsed().as_secs_f64() * 1e3);
        if ok.len() != rows.len() {
            return Err(format!(
                "lean loop: {} of {} rows not acknowledged",
                rows.len() - ok.len(),
                rows.len()
            )
            .into());
        }
        self.rounds += 1;
        self.claimed += rows.len() as u64;
        Ok(rows.len())
    }
}

/// Runs `relay` on PostgreSQL until `stop` changes: rounds while rows come back, then
/// waits for a NOTIFY on `lean_outbox` (a writer's, [`NOTIFY`]) or 1 s. Returns the
/// relay (its counters).
pub(crate) async fn spawn_woken(
    mut relay: LeanRelay<Postgres>,
    mut stop: watch::Receiver<bool>,
) -> Res<tokio::task::JoinHandle<Res<LeanRelay<Postgres>>>> {
    let mut listener = PgListener::connect_with(&relay.pool).await?;
    listener.listen(LEAN_TABLE).await?;
    Ok(tokio::spawn(async move {
        loop {
            while !*stop.borrow() && relay.round().await? > 0 {}
            tokio::select! {
                n = listener.recv() => {
                    n?;
                    // One claim answers every commit so far: drop the notifications
                    // already queued instead of claiming once per commit.
                    while listener.next_buffered().is_some() {}
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return Ok(relay),
            }
        }
    }))
}

// ------------------------------------------------------------------------------------
// i. drain: lean loop vs framework relay
// ------------------------------------------------------------------------------------

/// One drain's figures.
struct Drain {
    per_sec: f64,
    rounds: u64,
    /// Write-ahead (redo) log bytes per event.
    log_per_event: f64,
}

/// Loads `n` rows into [`LEAN_TABLE`] (fresh topic) and drains them with the lean loop.
async fn lean_drain<DB: LeanDb>(ctx: &Ctx<DB>, n: i64) -> Res<Drain> {
    let topic = fresh("bench-lean-");
    ctx.broker.create_topic(&topic, ctx.args.partitions).await?;
    DB::exec(&ctx.pool, &DB::truncate_sql(LEAN_TABLE)).await?;
    const CHUNK: i64 = 100_000;
    for start in (0..n).step_by(CHUNK as usize) {
        DB::lean_load(&ctx.pool, &topic, 10_000, start, (start + CHUNK).min(n)).await?;
    }
    DB::exec(&ctx.pool, &DB::analyze_sql(LEAN_TABLE)).await?;
    let log0 = DB::log_position(&ctx.pool).await?;
    let start = Instant::now();
    let mut relay = LeanRelay::new(&ctx.kafka(), ctx.pool.clone())?;
    while relay.round().await? > 0 {}
    let el = start.elapsed().as_secs_f64();
    let log1 = DB::log_position(&ctx.pool).await?;
    if relay.claimed != n as u64 {
        return Err(format!("lean loop drained {} of {n}", relay.claimed).into());
    }
    Ok(Drain {
        per_sec: n as f64 / el,
        rounds: relay.rounds,
        log_per_event: (log1 - log0) as f64 / n as f64,
    })
}

/// Loads `n` rows into the framework's table and drains them with one relay.
async fn framework_drain_logged<DB: LeanDb>(ctx: &Ctx<DB>, n: i64) -> Res<Drain> {
    let table = ctx.route.table().as_str();
    ctx.load(table, 0, n, 10_000).await?;
    let route = ctx.route_with_fresh_topic(table).await?;
    let log0 = DB::log_position(&ctx.pool).await?;
    let d = framework_drain(ctx, &route, n, 1).await?;
    let log1 = DB::log_position(&ctx.pool).await?;
    Ok(Drain {
        per_sec: d.per_sec,
        rounds: d.rounds,
        log_per_event: (log1 - log0) as f64 / n as f64,
    })
}

/// Section i: a `--backlog` drain, lean loop vs framework relay, alternating.
pub(crate) async fn section_i<DB: LeanDb>(ctx: &Ctx<DB>, report: &mut Report) -> Res<()> {
    let n = ctx.args.backlog;
    let name = section_name::<DB>("i");
    log(format!(
        "{name}: drain of {n} rows (10,000 keys), lean hand-written loop and framework relay interleaved"
    ));
    DB::lean_create(&ctx.pool).await?;
    let mut runs: [Vec<Drain>; 2] = Default::default();
    for rep in 0..ctx.args.repeats {
        for which in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
            let d = if which == 0 {
                lean_drain(ctx, n).await?
            } else {
                framework_drain_logged(ctx, n).await?
            };
            log(format!(
                "{name}: {:<10} {:>8.0} events/s  claims {:>5}  mean claim {:>5.0}  {} {:>6.0} B/event",
                ["lean", "framework"][which],
                d.per_sec,
                d.rounds,
                n as f64 / d.rounds.max(1) as f64,
                DB::LOG,
                d.log_per_event
            ));
            runs[which].push(d);
        }
    }
    let med = |v: &[Drain], f: fn(&Drain) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    let lean_rate = med(&runs[0], |d| d.per_sec);
    let rows = [
        "lean hand-written loop",
        "framework relay (1 instance, `OutboxConfig::default()`)",
    ]
    .iter()
    .zip(&runs)
    .map(|(what, v)| {
        let rate = med(v, |d| d.per_sec);
        let rounds = med(v, |d| d.rounds as f64);
        vec![
            (*what).to_owned(),
            format!("{rate:.0}"),
            format!("{:.2}", rate / lean_rate),
            format!("{rounds:.0}"),
            format!("{:.0}", n as f64 / rounds.max(1.0)),
            format!("{:.0}", med(v, |d| d.log_per_event)),
        ]
    })
    .collect();
    let log_head = format!("{} bytes/event (median)", DB::LOG);
    report.section(
        &format!(
            "{name}. Relay drain of a {n}-row backlog: framework vs a lean hand-written outbox — events/s"
        ),
        &[
            "contender",
            "events/s (median)",
            "× lean",
            "claims (median)",
            "mean claim (rows)",
            &log_head,
        ],
        rows,
        &format!(
            "Goal (#17): ≥ 1.0× the lean loop. The lean loop runs on a table of its own with the \
             columns a hand-written outbox needs and one index besides the primary key ({}); it \
             claims 500 rows in id order `FOR UPDATE SKIP LOCKED` ({}), produces them all with a \
             producer of the framework's own Kafka settings (idempotent, acks all), waits for \
             every delivery report, then marks them with one `UPDATE … SET status = 1 … AND \
             lease_token = $token`, one round at a time. The framework relay drains its own \
             table (its DDL and indexes) with `OutboxConfig::default()`. Both backlogs: 10,000 \
             keys, bulk-loaded, then `{}`; contenders alternate, fresh topic each run. \
             {} bytes/event: the server's log position before and after the drain \
             ({}), divided by the backlog; anything else the server wrote meanwhile counts too \
             (background vacuum or purge, checkpoints), so compare medians, not single runs.",
            if DB::IN_TITLES {
                "`(status, id)`: MariaDB has no partial indexes"
            } else {
                "`(id) WHERE status = 0`"
            },
            if DB::IN_TITLES {
                "READ COMMITTED: the `SELECT … FOR UPDATE SKIP LOCKED`, then the lease `UPDATE` \
                 by id, COMMIT"
            } else {
                "one `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT 500) RETURNING`"
            },
            DB::analyze_sql("<table>"),
            DB::LOG,
            if DB::IN_TITLES {
                "`Innodb_lsn_current`"
            } else {
                "`pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')`"
            },
        ),
    );
    Ok(())
}
