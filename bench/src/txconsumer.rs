//! Hand-written transactional consumers: what a careful team writes for exactly-once
//! effect without the framework. One StreamConsumer with the framework's Kafka settings
//! (`enable.auto.offset.store` false, auto commit on); records go to one worker per
//! partition (in order); a worker takes what is already queued for its partition (up to
//! [`BATCH`]) and settles it in ONE transaction ([`Settle`]: the database work per
//! batch), COMMITs, then stores the offset of the batch's last record.
//!
//! Two settlements use it: section c's [`ConsumedMark`] (lock the events' rows, mark
//! them consumed) and section h's inbox ([`subscriber`]).

use super::*;

use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, watch};

/// Most records a partition worker settles per transaction.
pub(crate) const BATCH: usize = 256;

/// What section c's table note says the transactional raw consumer does.
pub(crate) const DESCRIPTION: &str = "one worker per partition takes what is queued for \
     its partition (up to 256 records) and, in one transaction, locks those events' rows by \
     event id (`SELECT … WHERE event_id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED`; if a \
     row is still locked by the relay's mark, ROLLBACK and again 1 ms later: waiting for the \
     lock instead deadlocked with the mark, which locks in its plan's order, and each \
     deadlock cost `deadlock_timeout`, 1 s), marks them consumed (`UPDATE … SET status = 2 \
     WHERE id = ANY($1)`), COMMITs, then stores the batch's last offset \
     (`enable.auto.offset.store` false, auto commit)";

/// Batches whose rows were still locked by another transaction (a relay's mark), rolled
/// back and tried again (logged by section c).
pub(crate) static BUSY: AtomicU64 = AtomicU64::new(0);

/// A settlement's answer when a row it needs is locked by another transaction: the
/// worker rolls back and tries the batch again shortly.
#[derive(Debug)]
pub(crate) struct Busy;

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a row is locked by another transaction")
    }
}

impl std::error::Error for Busy {}

/// A batch's database work, done inside the worker's transaction (the worker commits).
pub(crate) trait Settle: Send + Sync + 'static {
    /// Settles `batch` (one partition's records, in order) on `tx`.
    fn settle(
        &self,
        tx: &mut PgConnection,
        batch: &[OwnedMessage],
    ) -> impl Future<Output = Res<()>> + Send;
}

/// Runs the consumer of `topic` in `group` until `stop` changes, settling with `settle`
/// on `pool`. `one_lane`: one worker for every partition (an experiment of section h).
pub(crate) async fn run<S: Settle>(
    kafka: KafkaConfig,
    group: String,
    topic: String,
    pool: PgPool,
    settle: S,
    one_lane: bool,
    mut stop: watch::Receiver<bool>,
) -> Res<()> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        kafka
            .consumer_config(&group, OutboxConfig::default().max_payload_bytes)
            .create()?,
    );
    consumer.subscribe(&[&topic])?;
    let settle = Arc::new(settle);
    let mut lanes: HashMap<i32, mpsc::Sender<OwnedMessage>> = HashMap::new();
    let mut workers = Vec::new();
    let result: Res<()> = async {
        loop {
            let m = tokio::select! {
                _ = stop.changed() => return Ok(()),
                m = consumer.recv() => m,
            };
            let m = match m {
                Ok(m) => m.detach(),
                Err(e) => {
                    log(format!("hand-written consumer of {topic}: {e}"));
                    continue;
                }
            };
            let lane = if one_lane { 0 } else { m.partition() };
            let lane = lanes.entry(lane).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(4 * BATCH);
                workers.push(tokio::spawn(partition_worker(
                    consumer.clone(),
                    pool.clone(),
                    settle.clone(),
                    rx,
                )));
                tx
            });
            if lane.send(m).await.is_err() {
                return Err("a partition worker stopped".into());
            }
        }
    }
    .await;
    drop(lanes);
    for w in workers {
        w.await??;
    }
    // Closing the consumer (leaving the group) blocks.
    tokio::task::spawn_blocking(move || drop(consumer)).await?;
    result
}

/// The event id of a record: its `ce_id` header (CloudEvents Kafka binary mode).
pub(crate) fn ce_id(m: &OwnedMessage) -> Option<uuid::Uuid> {
    m.headers()?
        .iter()
        .find(|h| h.key == "ce_id")
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
}

/// One partition's records, in order: what is already queued (up to [`BATCH`]) in one
/// transaction, then the offset.
async fn partition_worker<S: Settle>(
    consumer: Arc<StreamConsumer>,
    pool: PgPool,
    settle: Arc<S>,
    mut rx: mpsc::Receiver<OwnedMessage>,
) -> Res<()> {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        // A deadlock victim runs again; a batch whose rows are busy, 1 ms later.
        let (pool, settle, records) = (&pool, &settle, &batch);
        loop {
            let settled = retry_deadlocks(|| async move {
                let mut tx = pool.begin().await?;
                settle.settle(&mut tx, records).await?;
                tx.commit().await?;
                Ok(())
            })
            .await;
            match settled {
                Err(e) if e.is::<Busy>() => {
                    BUSY.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                r => break r?,
            }
        }
        // The offset of each partition's last record in the batch (one partition, but
        // for the one-lane experiment).
        let mut last: HashMap<i32, &OwnedMessage> = HashMap::new();
        for m in &batch {
            last.insert(m.partition(), m);
        }
        for m in last.values() {
            consumer.store_offset(m.topic(), m.partition(), m.offset())?;
        }
        batch.clear();
    }
    Ok(())
}

/// Section c's settlement: lock the batch's events' rows in `table` by event id, without
/// waiting ([`Busy`] if one is locked), note the handler time of each [`Tick`] ([`saw`]),
/// mark the rows consumed.
pub(crate) struct ConsumedMark {
    /// The raw pipeline's outbox table.
    pub(crate) table: &'static str,
}

impl Settle for ConsumedMark {
    async fn settle(&self, tx: &mut PgConnection, batch: &[OwnedMessage]) -> Res<()> {
        let mut ids = batch
            .iter()
            .map(|m| ce_id(m).ok_or("a record without a ce_id header"))
            .collect::<Result<Vec<_>, _>>()?;
        ids.sort_unstable();
        ids.dedup();
        let table = self.table;
        let rows: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM {table} WHERE event_id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        if rows.len() < ids.len() {
            return Err(Busy.into());
        }
        // The handler's moment: rows locked, effect not yet committed (where the
        // framework's handler runs).
        for m in batch {
            if let Some(t) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<Tick>(p).ok())
            {
                saw(t.seq);
            }
        }
        sqlx::query(&format!(
            "UPDATE {table} SET status = 2, consumed_at = now() WHERE id = ANY($1)"
        ))
        .bind(&rows)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Starts section c's transactional raw consumer of `topic` (group `{topic}.g`) on
/// `pool` until `stop` changes.
pub(crate) fn spawn(
    ctx: &Ctx<Postgres>,
    topic: &str,
    pool: PgPool,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Res<()>> {
    tokio::spawn(run(
        ctx.kafka(),
        format!("{topic}.g"),
        topic.to_owned(),
        pool,
        ConsumedMark { table: RAW_TABLE },
        false,
        stop,
    ))
}
