//! Fault suite, j: a model-based property test of the state machine and the claim
//! logic, on a real SQLite database (fast), with the real backend statements and the
//! real consumer (`Consumer::process` on records built by hand).
//!
//! proptest generates interleavings of: publish (commit or abort, with a handler
//! script: fail N times, or permanently), claim by one of two relays, produce (ok,
//! failed, or timed out after all reaching the log: an ambiguous produce), mark (or give
//! back) by a relay, relay crash (its claim dropped), lease expiry, consume the next
//! record of the log, redelivery (the consumer's position moves back). After every step:
//! terminal rows stay terminal, no event has two effects, no aborted event has a row,
//! per-key effects in order, and a mark or give-back changes exactly the rows still
//! leased to its token (fencing). After a fair drain: every committed event is consumed
//! or (when its script says so) dead, with a reason.
//!
//! 48 cases in CI; `OUTBOX_CHAOS_SOAK=1` runs 1,000. `PROPTEST_CASES` overrides both.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use outbox_runtime::backend::ClaimedRow;
use outbox_runtime::envelope::Envelope;
use outbox_runtime::internals::{Consumer, Outcome};
use outbox_runtime::Backoff;
use outbox_runtime::Catalog;
use outbox_runtime::{Backend, EventId, Outbox, OutboxConfig, PublishOptions, Status};
use outbox_tests::chaos::soak;
use outbox_tests::db::TestSqlite;
use outbox_tests::e2e::create_effects;
use outbox_tests::services::{Script, Task, TaskCreated};
use proptest::prelude::*;
use rdkafka::message::OwnedMessage;
use rdkafka::Timestamp;
use sqlx::{Sqlite, SqlitePool};

#[derive(Debug, Clone)]
enum Op {
    Publish {
        key: u8,
        commit: bool,
        fail_times: u8,
        permanent: bool,
    },
    Claim {
        relay: usize,
    },
    /// 0 ok, 1 failed, 2 timed out but reached the log.
    Produce {
        relay: usize,
        outcome: u8,
    },
    Mark {
        relay: usize,
    },
    Crash {
        relay: usize,
    },
    ExpireLeases,
    Consume,
    Redeliver {
        back: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, prop::bool::weighted(0.85), prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(3)], prop::bool::weighted(0.05))
            .prop_map(|(key, commit, fail_times, permanent)| Op::Publish { key, commit, fail_times, permanent }),
        2 => (0usize..2).prop_map(|relay| Op::Claim { relay }),
        2 => (0usize..2, prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(2)]).prop_map(|(relay, outcome)| Op::Produce { relay, outcome }),
        2 => (0usize..2).prop_map(|relay| Op::Mark { relay }),
        1 => (0usize..2).prop_map(|relay| Op::Crash { relay }),
        1 => Just(Op::ExpireLeases),
        4 => Just(Op::Consume),
        1 => (1u8..6).prop_map(|back| Op::Redeliver { back }),
    ]
}

const MAX_RETRIES: u32 = 2;

struct Claim {
    token: i64,
    rows: Vec<ClaimedRow>,
    produced: Option<bool>,
}

struct World {
    pool: SqlitePool,
    outbox: Outbox<Task, Sqlite>,
    consumer: Consumer<Sqlite>,
    table: outbox_runtime::TableName,
    relays: [Option<Claim>; 2],
    log: Vec<OwnedMessage>,
    cursor: usize,
    seq: BTreeMap<String, u32>,
    committed: BTreeMap<EventId, (String, u32, Script)>,
    aborted: BTreeSet<EventId>,
    terminal: BTreeMap<i64, i16>,
    next_token: i64,
}

fn config() -> OutboxConfig {
    OutboxConfig {
        backoff: Backoff {
            base: Duration::ZERO,
            cap: Duration::ZERO,
        },
        default_max_retries: MAX_RETRIES,
        ..OutboxConfig::default()
    }
}

impl World {
    async fn new(db: &TestSqlite) -> World {
        let catalog = Catalog::builder().build().expect("catalog");
        let pool = db.pool().clone();
        outbox_runtime::migrate(&pool, &catalog, ["task"])
            .await
            .unwrap();
        create_effects(&pool).await;
        let table = catalog.route("task").unwrap().table().clone();
        World {
            outbox: Outbox::with_config(pool.clone(), &catalog, config()).unwrap(),
            consumer: Consumer::new(pool.clone(), &catalog, "task", Arc::new(config())).unwrap(),
            pool,
            table,
            relays: [None, None],
            log: Vec::new(),
            cursor: 0,
            seq: BTreeMap::new(),
            committed: BTreeMap::new(),
            aborted: BTreeSet::new(),
            terminal: BTreeMap::new(),
            next_token: 1,
        }
    }

    /// (id, status, lease_token) of every row.
    async fn snapshot(&self) -> BTreeMap<i64, (i16, i64)> {
        let rows: Vec<(i64, i16, i64)> = sqlx::query_as(&format!(
            "SELECT id, status, lease_token FROM {}",
            self.table
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.into_iter().map(|(id, s, t)| (id, (s, t))).collect()
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Publish {
                key,
                commit,
                fail_times,
                permanent,
            } => {
                let key = format!("key{key}");
                let script = Script {
                    fail_times: u32::from(fail_times),
                    permanent,
                    ..Script::default()
                };
                let seq = self.seq.get(&key).copied().unwrap_or(0) + 1;
                let mut tx = self.outbox.begin().await.unwrap();
                let id = tx
                    .publish_with(
                        &TaskCreated {
                            task_id: key.clone(),
                            seq,
                            script: script.clone(),
                        },
                        PublishOptions::default(),
                    )
                    .await
                    .unwrap();
                if commit {
                    tx.commit().await.unwrap();
                    self.seq.insert(key.clone(), seq);
                    self.committed.insert(id, (key, seq, script));
                } else {
                    tx.rollback().await.unwrap();
                    self.aborted.insert(id);
                }
            }
            Op::Claim { relay } => {
                if self.relays[relay].is_some() {
                    return;
                }
                let token = self.next_token;
                self.next_token += 1;
                let rows = Sqlite::claim(
                    &self.pool,
                    &self.table,
                    &"task".parse().unwrap(),
                    4,
                    Duration::from_secs(3600),
                    token,
                )
                .await
                .unwrap();
                if !rows.is_empty() {
                    self.relays[relay] = Some(Claim {
                        token,
                        rows,
                        produced: None,
                    });
                }
            }
            Op::Produce { relay, outcome } => {
                let Some(claim) = &mut self.relays[relay] else {
                    return;
                };
                if claim.produced.is_some() {
                    return;
                }
                if outcome != 1 {
                    for row in &claim.rows {
                        self.log.push(record(row, self.log.len() as i64));
                    }
                }
                claim.produced = Some(outcome == 0);
            }
            Op::Mark { relay } => {
                let Some(claim) = self.relays[relay].take() else {
                    return;
                };
                let Some(acked) = claim.produced else {
                    self.relays[relay] = Some(claim);
                    return;
                };
                let ids: Vec<i64> = claim.rows.iter().map(|r| r.id).collect();
                let before = self.snapshot().await;
                let changed = if acked {
                    Sqlite::mark_published(&self.pool, &self.table, &ids, claim.token)
                        .await
                        .unwrap()
                } else {
                    Sqlite::release(
                        &self.pool,
                        &self.table,
                        &ids,
                        claim.token,
                        Duration::ZERO,
                        "produce failed",
                    )
                    .await
                    .unwrap()
                };
                let after = self.snapshot().await;
                let mut expected = 0;
                for id in &ids {
                    let (s0, t0) = before[id];
                    let (s1, t1) = after[id];
                    if s0 == 0 && t0 == claim.token {
                        expected += 1;
                        assert_eq!(
                            (s1, t1),
                            (if acked { 1 } else { 0 }, 0),
                            "row {id}: a leased mark must apply"
                        );
                    } else {
                        assert_eq!((s1, t1), (s0, t0), "row {id}: a stale mark changed it");
                    }
                }
                assert_eq!(
                    changed, expected,
                    "fencing: rows changed by token {}",
                    claim.token
                );
            }
            Op::Crash { relay } => {
                self.relays[relay] = None;
            }
            Op::ExpireLeases => {
                sqlx::query(&format!(
                    "UPDATE {} SET locked_until = locked_until - 7200000000 WHERE locked_until IS NOT NULL",
                    self.table
                ))
                .execute(&self.pool)
                .await
                .unwrap();
            }
            Op::Consume => {
                if self.cursor < self.log.len() {
                    let outcome = self.consumer.process(&self.log[self.cursor]).await;
                    let outcome = outcome.expect("no database failure on SQLite");
                    assert!(
                        !matches!(outcome, Outcome::Skipped { .. }),
                        "every record has a row: {outcome:?}"
                    );
                    self.cursor += 1;
                }
            }
            Op::Redeliver { back } => {
                self.cursor = self.cursor.saturating_sub(usize::from(back));
            }
        }
    }

    async fn check(&mut self) {
        let snap = self.snapshot().await;
        for (id, status) in &self.terminal {
            assert_eq!(snap[id].0, *status, "terminal row {id} changed");
        }
        for (id, (s, _)) in &snap {
            if *s >= 2 {
                self.terminal.insert(*id, *s);
            }
        }
        let dup: Vec<(String, i64)> = sqlx::query_as(
            "SELECT event_id, count(*) FROM effects GROUP BY event_id HAVING count(*) > 1",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert!(dup.is_empty(), "double effects: {dup:?}");
        for id in &self.aborted {
            assert!(Sqlite::fetch(&self.pool, &self.table, id.0)
                .await
                .unwrap()
                .is_none());
        }
        let effects: Vec<(String, i64)> =
            sqlx::query_as("SELECT event_key, seq FROM effects ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let mut last: BTreeMap<&str, i64> = BTreeMap::new();
        for (key, seq) in &effects {
            if let Some(prev) = last.insert(key, *seq) {
                assert!(prev < *seq, "key {key}: seq {seq} applied after {prev}");
            }
        }
    }

    /// A fair ending: leases expire, a relay relays everything, the consumer reads on.
    async fn drain(&mut self) {
        self.relays = [None, None];
        for _ in 0..500 {
            let open = self
                .snapshot()
                .await
                .values()
                .filter(|(s, _)| *s < 2)
                .count();
            if open == 0 {
                return;
            }
            self.apply(&Op::ExpireLeases).await;
            self.apply(&Op::Claim { relay: 0 }).await;
            self.apply(&Op::Produce {
                relay: 0,
                outcome: 0,
            })
            .await;
            self.apply(&Op::Mark { relay: 0 }).await;
            while self.cursor < self.log.len() {
                self.apply(&Op::Consume).await;
            }
            self.check().await;
        }
        panic!("the drain did not settle every row");
    }

    async fn final_check(&self) {
        let effects: Vec<(String,)> = sqlx::query_as("SELECT event_id FROM effects")
            .fetch_all(&self.pool)
            .await
            .unwrap();
        let applied: BTreeSet<String> = effects.into_iter().map(|e| e.0).collect();
        for (id, (key, seq, script)) in &self.committed {
            let row = Sqlite::fetch(&self.pool, &self.table, id.0)
                .await
                .unwrap()
                .expect("a committed event has a row");
            let should_die = script.permanent || script.fail_times >= MAX_RETRIES;
            if should_die {
                assert_eq!(row.status, Status::Dead, "{key}#{seq}: {row:?}");
                assert!(row.last_error.as_deref().is_some_and(|e| !e.is_empty()));
                assert!(!applied.contains(&id.to_string()));
            } else {
                assert_eq!(row.status, Status::Consumed, "{key}#{seq}: {row:?}");
                assert!(applied.contains(&id.to_string()), "{key}#{seq} lost");
            }
        }
        assert_eq!(
            applied.len(),
            self.committed
                .values()
                .filter(|(_, _, s)| !(s.permanent || s.fail_times >= MAX_RETRIES))
                .count()
        );
    }
}

fn record(row: &ClaimedRow, offset: i64) -> OwnedMessage {
    let env = Envelope {
        event_id: EventId(row.event_id),
        service: "task".into(),
        event_type: row.event_type.clone(),
        version: row.version as u32,
        key: row.key.clone(),
        time: row.created_at,
        payload: Vec::new(),
        traceparent: None,
        tracestate: None,
    };
    OwnedMessage::new(
        Some(row.payload.clone().into_bytes()),
        row.key.clone().map(String::into_bytes),
        "outbox.task".into(),
        Timestamp::NotAvailable,
        0,
        offset,
        Some(env.headers()),
    )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| soak(48, 1_000))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn chaos_j_model_state_machine(ops in prop::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let db = TestSqlite::create().await;
            let mut world = World::new(&db).await;
            for op in &ops {
                world.apply(op).await;
                world.check().await;
            }
            world.drain().await;
            world.final_check().await;
            db.cleanup().await;
        });
    }
}
