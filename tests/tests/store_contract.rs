//! The outbox store contract ([`Backend`]): one generic body per behaviour, run on every
//! backend (PostgreSQL, MySQL/MariaDB, SQLite), each on a fresh database.
//!
//! Waiting is always polling against a deadline, never a sleep used as
//! synchronisation.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use outbox_runtime::backend::ClaimScope::{PastWindow, Window};
use outbox_runtime::backend::{
    AttemptsFence, Backend, ClaimedRow, DeadReason, NewRow, OutboxRow, Status,
};
use outbox_runtime::{ServiceName, TableName};
use outbox_tests::db::TestDatabase;
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::Pool;
use uuid::Uuid;

static TABLE: LazyLock<TableName> = LazyLock::new(|| TableName::new("outbox_events").unwrap());
static SVC: LazyLock<ServiceName> = LazyLock::new(|| ServiceName::new("orders").unwrap());
static OTHER_SVC: LazyLock<ServiceName> = LazyLock::new(|| ServiceName::new("billing").unwrap());
/// A lease that outlives every test.
const LONG: Duration = Duration::from_secs(600);
/// Deadline of every poll.
const DEADLINE: Duration = Duration::from_secs(20);

/// A fresh random non-zero lease token.
fn token() -> i64 {
    loop {
        let t: i64 = rand::random();
        if t != 0 {
            return t;
        }
    }
}

/// A fresh database with the outbox table.
async fn setup<T: TestDatabase>() -> T {
    let db = T::create().await;
    T::DB::migrate(db.pool(), &TABLE).await.expect("migrate");
    db
}

/// Inserts one row in its own transaction, the way `publish` does; returns its event id.
async fn publish_to<DB: Backend>(
    pool: &Pool<DB>,
    table: &TableName,
    service: &ServiceName,
    key: Option<&str>,
) -> Uuid {
    let event_id = Uuid::now_v7();
    let payload = format!(r#"{{"event":"{event_id}"}}"#);
    let row = NewRow {
        event_id,
        service,
        event_type: "OrderPlaced",
        version: 2,
        key,
        payload: &payload,
        max_retries: 3,
        trace_context: None,
    };
    let mut tx = DB::begin(pool).await.expect("begin");
    DB::insert(&mut *tx, table, &row).await.expect("insert");
    tx.commit().await.expect("commit");
    event_id
}

async fn publish<DB: Backend>(pool: &Pool<DB>, service: &ServiceName, key: Option<&str>) -> Uuid {
    publish_to(pool, &TABLE, service, key).await
}

async fn fetch<DB: Backend>(pool: &Pool<DB>, event_id: Uuid) -> OutboxRow {
    DB::fetch(pool, &TABLE, event_id)
        .await
        .expect("fetch")
        .unwrap_or_else(|| panic!("row {event_id} exists"))
}

async fn claim<DB: Backend>(
    pool: &Pool<DB>,
    service: &ServiceName,
    limit: u32,
    lease: Duration,
    token: i64,
) -> Vec<ClaimedRow> {
    DB::claim(pool, &TABLE, service, limit, lease, token)
        .await
        .expect("claim")
}

fn event_ids(rows: &[ClaimedRow]) -> Vec<Uuid> {
    rows.iter().map(|r| r.event_id).collect()
}

fn row_ids(rows: &[ClaimedRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

/// Polls `f` until it yields a value, failing after [`DEADLINE`].
async fn poll_until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Claims until `event_id` comes back (with a fresh token each time).
async fn claim_until<DB: Backend>(pool: &Pool<DB>, event_id: Uuid) -> (ClaimedRow, i64) {
    poll_until("the row to become claimable", || async move {
        let t = token();
        let rows = claim(pool, &SVC, 10, LONG, t).await;
        rows.into_iter()
            .find(|r| r.event_id == event_id)
            .map(|r| (r, t))
    })
    .await
}

/// Key `p`, `depth` rows deep, its head parked for a long time (given back with a
/// long delay, as after a failed delivery).
async fn park_deep_key<DB: Backend>(pool: &Pool<DB>, depth: u32) {
    let p1 = publish(pool, &SVC, Some("p")).await;
    for _ in 1..depth {
        publish(pool, &SVC, Some("p")).await;
    }
    let (head, t) = claim_until(pool, p1).await;
    DB::release(pool, &TABLE, &[head.id], t, LONG, "broker down")
        .await
        .expect("release");
}

/// `b - a` in microseconds.
fn micros_between(a: DateTime<Utc>, b: DateTime<Utc>) -> i64 {
    (b - a).num_microseconds().expect("small interval")
}

/// Asserts `next_attempt_at - updated_at` is `delay` (±1 ms): both come from one
/// statement on the database clock.
fn assert_due_after(row: &OutboxRow, delay: Duration) {
    let got = micros_between(row.updated_at, row.next_attempt_at);
    let want = delay.as_micros() as i64;
    assert!(
        (got - want).abs() <= 1_000,
        "next_attempt_at - updated_at = {got} µs, want {want} µs ({row:?})"
    );
}

// ---------------------------------------------------------------------------------
// The contract, one generic body per behaviour.
// ---------------------------------------------------------------------------------

/// `migrate` creates the table and indexes; running it again (also concurrently) is a
/// no-op that keeps the data.
async fn migrate_is_idempotent<T: TestDatabase>() {
    let db = T::create().await;
    let pool = db.pool();
    let sql = T::DB::migration_sql(&TABLE);
    assert!(sql.contains(TABLE.as_str()), "{sql}");
    assert!(!sql.contains("{table}"), "{sql}");

    T::DB::migrate(pool, &TABLE).await.expect("first migrate");
    let e = publish(pool, &SVC, None).await;
    T::DB::migrate(pool, &TABLE).await.expect("second migrate");
    assert_eq!(
        fetch(pool, e).await.status,
        Status::Pending,
        "data survives a second migrate"
    );
    assert_eq!(
        T::DB::fetch_all(pool, &TABLE, &SVC)
            .await
            .expect("fetch_all")
            .len(),
        1
    );

    // Several processes migrating one fresh table at once.
    let other = &TableName::new("outbox_concurrent").unwrap();
    let runs = (0..4).map(|_| T::DB::migrate(pool, other));
    for r in futures::future::join_all(runs).await {
        r.expect("concurrent migrate");
    }
    let e = publish_to(pool, other, &SVC, Some("k")).await;
    assert!(T::DB::fetch(pool, other, e).await.expect("fetch").is_some());
    db.cleanup().await;
}

/// Insert, claim with a token, the lease keeps others off until it expires, and marks
/// are fenced by the token.
async fn claim_lease_and_fencing<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();

    let e1 = publish(pool, &SVC, None).await;
    let e2 = publish(pool, &SVC, Some("k")).await;
    let before = fetch(pool, e1).await;

    let t1 = token();
    let claimed = claim(pool, &SVC, 10, LONG, t1).await;
    assert_eq!(
        event_ids(&claimed),
        vec![e1, e2],
        "claims come back in id order"
    );
    let c1 = &claimed[0];
    assert_eq!(c1.id, before.id);
    assert_eq!(c1.event_type, "OrderPlaced");
    assert_eq!(c1.version, 2);
    assert_eq!(c1.key, None);
    assert_eq!(c1.payload, format!(r#"{{"event":"{e1}"}}"#));
    assert_eq!(c1.attempts, 0);
    assert_eq!(c1.created_at, before.created_at);
    assert_eq!(claimed[1].key.as_deref(), Some("k"));

    // Leased rows are not claimable again.
    assert!(claim(pool, &SVC, 10, LONG, token()).await.is_empty());
    assert!(
        claim(pool, &SVC, 0, LONG, token()).await.is_empty(),
        "limit 0 claims nothing"
    );

    // Marks are fenced by the token.
    let ids = row_ids(&claimed);
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &ids, token())
            .await
            .expect("mark"),
        0
    );
    assert_eq!(fetch(pool, e1).await.status, Status::Pending);
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &ids[..1], t1)
            .await
            .expect("mark"),
        1
    );
    let r1 = fetch(pool, e1).await;
    assert_eq!(r1.status, Status::Published);
    assert!(r1.published_at.is_some());
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &ids[..1], t1)
            .await
            .expect("mark"),
        0,
        "once only"
    );
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[], t1)
            .await
            .expect("mark"),
        0
    );

    // A relay's permanent failure: dead, fenced by the lease.
    assert!(!T::DB::mark_dead_leased(pool, &TABLE, ids[1], token(), "x")
        .await
        .expect("dead"));
    assert!(
        T::DB::mark_dead_leased(pool, &TABLE, ids[1], t1, "message too large")
            .await
            .expect("dead")
    );
    let r2 = fetch(pool, e2).await;
    assert_eq!(r2.status, Status::Dead);
    assert_eq!(r2.last_error.as_deref(), Some("message too large"));
    assert!(r2.dead_at.is_some());
    assert_eq!(r2.attempts, 1);
    assert!(!T::DB::mark_dead_leased(pool, &TABLE, ids[1], t1, "again")
        .await
        .expect("dead"));

    // An expired lease can be taken over; the old holder is then fenced.
    let e3 = publish(pool, &SVC, None).await;
    let t_old = token();
    let lease = Duration::from_millis(400);
    let started = Instant::now();
    assert_eq!(
        event_ids(&claim(pool, &SVC, 10, lease, t_old).await),
        vec![e3]
    );
    assert!(
        claim(pool, &SVC, 10, LONG, token()).await.is_empty(),
        "live lease"
    );
    let (taken, t_new) = claim_until(pool, e3).await;
    assert!(
        started.elapsed() >= lease - Duration::from_millis(50),
        "lease honoured: taken over after {:?}",
        started.elapsed()
    );
    assert_eq!(taken.attempts, 0);
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[taken.id], t_old)
            .await
            .expect("mark"),
        0,
        "zombie fenced"
    );
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[taken.id], t_new)
            .await
            .expect("mark"),
        1
    );

    // event_id is unique.
    let dup = NewRow {
        event_id: e3,
        service: &SVC,
        event_type: "OrderPlaced",
        version: 1,
        key: None,
        payload: "{}",
        max_retries: 3,
        trace_context: None,
    };
    let mut tx = T::DB::begin(pool).await.expect("begin");
    let err = T::DB::insert(&mut *tx, &TABLE, &dup)
        .await
        .expect_err("duplicate event id");
    assert!(
        err.as_database_error()
            .is_some_and(|e| e.is_unique_violation()),
        "unique violation, got {err:?}"
    );
    drop(tx);
    db.cleanup().await;
}

/// Only the oldest pending row of a key is claimable; other keys and keyless rows are
/// unaffected; a parked head parks only its key; a dead head unblocks it.
async fn head_of_key<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();

    let a1 = publish(pool, &SVC, Some("a")).await;
    let b1 = publish(pool, &SVC, Some("b")).await;
    let a2 = publish(pool, &SVC, Some("a")).await;
    let n1 = publish(pool, &SVC, None).await;
    let n2 = publish(pool, &SVC, None).await;
    let b2 = publish(pool, &SVC, Some("b")).await;

    let t = token();
    let first = claim(pool, &SVC, 10, LONG, t).await;
    assert_eq!(event_ids(&first), vec![a1, b1, n1, n2]);
    assert!(
        claim(pool, &SVC, 10, LONG, token()).await.is_empty(),
        "a2 and b2 wait for their heads"
    );

    // a1 published: a2 becomes the head of `a`.
    let a1_id = first[0].id;
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[a1_id], t)
            .await
            .expect("mark"),
        1
    );
    let t2 = token();
    let second = claim(pool, &SVC, 10, LONG, t2).await;
    assert_eq!(event_ids(&second), vec![a2]);

    // b1 released with a long backoff: it parks `b` only.
    let b1_id = first[1].id;
    assert_eq!(
        T::DB::release(pool, &TABLE, &[b1_id], t, LONG, "broker down")
            .await
            .expect("release"),
        1
    );
    let c1 = publish(pool, &SVC, Some("c")).await;
    assert_eq!(
        event_ids(&claim(pool, &SVC, 10, LONG, token()).await),
        vec![c1],
        "other keys flow"
    );

    // b1 dead (consumer side): b2 is the head now.
    assert!(T::DB::mark_dead(
        pool,
        &TABLE,
        b1_id,
        AttemptsFence(0),
        "poison",
        DeadReason::Permanent
    )
    .await
    .expect("dead"));
    assert_eq!(
        event_ids(&claim(pool, &SVC, 10, LONG, token()).await),
        vec![b2]
    );

    // A limit smaller than the due set takes the oldest.
    let d1 = publish(pool, &SVC, None).await;
    let _d2 = publish(pool, &SVC, None).await;
    assert_eq!(
        event_ids(&claim(pool, &SVC, 1, LONG, token()).await),
        vec![d1]
    );
    db.cleanup().await;
}

/// Heads behind a deep backlog: a parked head whose key holds many more pending rows
/// than one claim takes does not hide the other keys' heads or keyless rows behind it,
/// and heads leased by another relay are not claimed again however deep their keys.
async fn heads_behind_a_deep_backlog<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();
    const LIMIT: u32 = 4;

    // Key `p` first, 10 × LIMIT rows deep; its head then parks for a long time.
    let p1 = publish(pool, &SVC, Some("p")).await;
    for _ in 1..10 * LIMIT {
        publish(pool, &SVC, Some("p")).await;
    }
    let (head, t) = claim_until(pool, p1).await;
    assert_eq!(
        T::DB::release(pool, &TABLE, &[head.id], t, LONG, "broker down")
            .await
            .expect("release"),
        1
    );
    let q1 = publish(pool, &SVC, Some("q")).await;
    let q2 = publish(pool, &SVC, Some("q")).await;
    let n1 = publish(pool, &SVC, None).await;
    let r1 = publish(pool, &SVC, Some("r")).await;

    let t1 = token();
    let taken = claim(pool, &SVC, LIMIT, LONG, t1).await;
    assert_eq!(
        event_ids(&taken),
        vec![q1, n1, r1],
        "the parked key's successors hide nothing"
    );
    // Every head is leased or parked now: nothing more, not `p`'s successors, not q2.
    assert!(claim(pool, &SVC, LIMIT, LONG, token()).await.is_empty());

    // q1 published: q2 is found behind `p`'s backlog.
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[taken[0].id], t1)
            .await
            .expect("mark"),
        1
    );
    assert_eq!(
        event_ids(&claim(pool, &SVC, LIMIT, LONG, token()).await),
        vec![q2]
    );
    db.cleanup().await;
}

/// A windowed claim (`ClaimScope::Window`) looks only at the first `window` due rows
/// where the backend bounds it (PostgreSQL, MySQL): heads behind a parked key's longer
/// backlog are left to the claim past the window, which the relay falls back to.
/// Elsewhere it is the full claim.
async fn claim_window_is_bounded<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();
    const LIMIT: u32 = 4;
    park_deep_key(pool, 10 * LIMIT).await;
    let q1 = publish(pool, &SVC, Some("q")).await;

    let windowed = T::DB::claim_in(pool, &TABLE, &SVC, LIMIT, Window(2 * LIMIT), LONG, token())
        .await
        .expect("windowed claim");
    if T::DB::BOUNDED_CLAIM {
        assert!(
            windowed.is_empty(),
            "the window holds only the parked key's successors"
        );
        assert_eq!(
            event_ids(&claim(pool, &SVC, LIMIT, LONG, token()).await),
            vec![q1]
        );
    } else {
        assert_eq!(event_ids(&windowed), vec![q1]);
    }
    db.cleanup().await;
}

/// A claim past the window (`ClaimScope::PastWindow`) takes only heads past the first
/// `window` due rows where the backend bounds claims (PostgreSQL, MySQL): a head inside
/// the window is left to the windowed claim, so rows found here were hidden from it.
/// Elsewhere it is the full claim.
async fn claim_past_window_takes_only_hidden_heads<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();
    const LIMIT: u32 = 4;
    park_deep_key(pool, 10 * LIMIT).await;
    let q1 = publish(pool, &SVC, Some("q")).await;
    let past = |window: u32| async move {
        T::DB::claim_in(pool, &TABLE, &SVC, LIMIT, PastWindow(window), LONG, token())
            .await
            .expect("claim past the window")
    };
    if T::DB::BOUNDED_CLAIM {
        // A window past the whole backlog holds q1: not this claim's.
        assert!(
            past(100 * LIMIT).await.is_empty(),
            "q1 is inside the window"
        );
        // The parked key's successors fill a window of 2 × LIMIT: q1 is hidden past it.
        assert_eq!(event_ids(&past(2 * LIMIT).await), vec![q1]);
    } else {
        assert_eq!(event_ids(&past(2 * LIMIT).await), vec![q1]);
        assert!(past(100 * LIMIT).await.is_empty(), "q1 is leased");
    }
    db.cleanup().await;
}

/// `release` gives a claimed row back for later without counting an attempt.
async fn release_backs_off_without_attempt<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();

    let e = publish(pool, &SVC, Some("k")).await;
    let t = token();
    let id = claim(pool, &SVC, 10, LONG, t).await[0].id;

    assert_eq!(
        T::DB::release(pool, &TABLE, &[id], token(), Duration::ZERO, "x")
            .await
            .expect("release"),
        0
    );
    let delay = Duration::from_millis(1500);
    assert_eq!(
        T::DB::release(pool, &TABLE, &[id], t, delay, "broker down")
            .await
            .expect("release"),
        1
    );
    let r = fetch(pool, e).await;
    assert_eq!(r.status, Status::Pending);
    assert_eq!(r.attempts, 0, "a broker outage is not the event's fault");
    assert_eq!(r.last_error.as_deref(), Some("broker down"));
    assert_due_after(&r, delay);
    assert_eq!(
        T::DB::release(pool, &TABLE, &[id], t, delay, "again")
            .await
            .expect("release"),
        0,
        "release ends the lease"
    );
    assert!(
        claim(pool, &SVC, 10, LONG, token()).await.is_empty(),
        "not due yet"
    );

    let (again, t2) = claim_until(pool, e).await;
    assert_eq!(again.attempts, 0);

    // Errors are kept to 2,000 characters (not bytes), cut on a character boundary.
    let long_error = "é".repeat(3000);
    assert_eq!(
        T::DB::release(pool, &TABLE, &[id], t2, Duration::ZERO, &long_error)
            .await
            .expect("release"),
        1
    );
    let r = fetch(pool, e).await;
    let stored = r.last_error.expect("error kept");
    assert_eq!(
        stored.chars().count(),
        outbox_runtime::backend::MAX_ERROR_LEN
    );
    assert!(long_error.starts_with(&stored));
    // Released with no delay: due at once.
    let (_, t3) = claim_until(pool, e).await;
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[id], t3)
            .await
            .expect("mark"),
        1
    );
    db.cleanup().await;
}

/// Consumer-side failures: `retry_later` and `mark_dead` are fenced by the attempts
/// count read under the lock, and never leave a terminal state.
async fn consumer_failures_fenced_by_attempts<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();

    let e = publish(pool, &SVC, Some("k")).await;
    let t = token();
    let id = claim(pool, &SVC, 10, LONG, t).await[0].id;
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[id], t)
            .await
            .expect("mark"),
        1
    );

    let mut tx = T::DB::begin(pool).await.expect("begin");
    let st = T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, e)
        .await
        .expect("lock")
        .expect("row found");
    assert_eq!(
        (st.id, st.status, st.attempts, st.max_retries),
        (id, Status::Published, 0, 3)
    );
    assert_eq!(st.key.as_deref(), Some("k"));
    assert!(T::DB::lock_for_consume(&mut *tx, &TABLE, &OTHER_SVC, e)
        .await
        .expect("lock")
        .is_none());
    assert!(
        T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, Uuid::now_v7())
            .await
            .expect("lock")
            .is_none()
    );
    tx.commit().await.expect("commit");

    let delay = Duration::from_secs(1);
    assert!(
        T::DB::retry_later(pool, &TABLE, id, AttemptsFence(0), delay, "handler failed")
            .await
            .expect("retry")
    );
    let r = fetch(pool, e).await;
    assert_eq!((r.status, r.attempts), (Status::Pending, 1));
    assert_eq!(r.last_error.as_deref(), Some("handler failed"));
    assert_due_after(&r, delay);

    // A second consumer that read attempts = 0 is fenced.
    assert!(
        !T::DB::retry_later(pool, &TABLE, id, AttemptsFence(0), delay, "x")
            .await
            .expect("retry")
    );
    assert!(!T::DB::mark_dead(
        pool,
        &TABLE,
        id,
        AttemptsFence(0),
        "x",
        DeadReason::Permanent
    )
    .await
    .expect("dead"));
    assert_eq!(fetch(pool, e).await.attempts, 1);

    // Due again after the delay: the relay re-publishes it with its attempts count.
    let (again, t2) = claim_until(pool, e).await;
    assert_eq!(again.attempts, 1);
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[id], t2)
            .await
            .expect("mark"),
        1
    );

    assert!(T::DB::mark_dead(
        pool,
        &TABLE,
        id,
        AttemptsFence(1),
        "undecodable",
        DeadReason::Permanent
    )
    .await
    .expect("dead"));
    let r = fetch(pool, e).await;
    assert_eq!((r.status, r.attempts), (Status::Dead, 2));
    assert_eq!(r.last_error.as_deref(), Some("undecodable"));
    assert!(r.dead_at.is_some());

    // Dead is terminal.
    assert!(!T::DB::mark_dead(
        pool,
        &TABLE,
        id,
        AttemptsFence(2),
        "x",
        DeadReason::Permanent
    )
    .await
    .expect("dead"));
    assert!(
        !T::DB::retry_later(pool, &TABLE, id, AttemptsFence(2), Duration::ZERO, "x")
            .await
            .expect("retry")
    );
    let mut tx = T::DB::begin(pool).await.expect("begin");
    T::DB::mark_consumed(&mut *tx, &TABLE, &[id])
        .await
        .expect("consumed");
    T::DB::defer(&mut *tx, &TABLE, &SVC, "none", id, Duration::ZERO)
        .await
        .expect("defer");
    tx.commit().await.expect("commit");
    let r2 = fetch(pool, e).await;
    assert_eq!(
        (r2.status, r2.attempts, r2.dead_at),
        (Status::Dead, 2, r.dead_at)
    );
    assert!(claim(pool, &SVC, 10, LONG, token()).await.is_empty());
    db.cleanup().await;
}

/// `consumed` is terminal and every transition repeated is a no-op; `defer` puts a
/// published row back to pending; a row can be consumed before its mark lands.
async fn terminal_states_and_defer<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();

    let e = publish(pool, &SVC, None).await;
    let t = token();
    let id = claim(pool, &SVC, 10, LONG, t).await[0].id;
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[id], t)
            .await
            .expect("mark"),
        1
    );

    let mut tx = T::DB::begin(pool).await.expect("begin");
    let st = T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, e)
        .await
        .expect("lock")
        .expect("found");
    assert_eq!(st.status, Status::Published);
    T::DB::mark_consumed(&mut *tx, &TABLE, &[id])
        .await
        .expect("consumed");
    tx.commit().await.expect("commit");
    let r = fetch(pool, e).await;
    assert_eq!(r.status, Status::Consumed);
    let consumed_at = r.consumed_at.expect("consumed_at set");

    // Everything after is a no-op.
    let mut tx = T::DB::begin(pool).await.expect("begin");
    T::DB::mark_consumed(&mut *tx, &TABLE, &[id])
        .await
        .expect("consumed");
    T::DB::defer(&mut *tx, &TABLE, &SVC, "none", id, Duration::ZERO)
        .await
        .expect("defer");
    tx.commit().await.expect("commit");
    assert!(
        !T::DB::retry_later(pool, &TABLE, id, AttemptsFence(0), Duration::ZERO, "x")
            .await
            .expect("retry")
    );
    assert!(!T::DB::mark_dead(
        pool,
        &TABLE,
        id,
        AttemptsFence(0),
        "x",
        DeadReason::Permanent
    )
    .await
    .expect("dead"));
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[id], t)
            .await
            .expect("mark"),
        0
    );
    assert_eq!(
        T::DB::release(pool, &TABLE, &[id], t, Duration::ZERO, "x")
            .await
            .expect("release"),
        0
    );
    assert!(!T::DB::mark_dead_leased(pool, &TABLE, id, t, "x")
        .await
        .expect("dead"));
    let r2 = fetch(pool, e).await;
    assert_eq!(
        (r2.status, r2.consumed_at, r2.attempts, r2.last_error),
        (Status::Consumed, Some(consumed_at), 0, None)
    );

    // defer: published -> pending, due now, attempts unchanged; the relay picks it up.
    let f = publish(pool, &SVC, Some("k")).await;
    let t = token();
    let fid = claim(pool, &SVC, 10, LONG, t).await[0].id;
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[fid], t)
            .await
            .expect("mark"),
        1
    );
    let mut tx = T::DB::begin(pool).await.expect("begin");
    T::DB::defer(&mut *tx, &TABLE, &SVC, "k", fid, Duration::ZERO)
        .await
        .expect("defer");
    tx.commit().await.expect("commit");
    let r = fetch(pool, f).await;
    assert_eq!((r.status, r.attempts), (Status::Pending, 0));
    assert_due_after(&r, Duration::ZERO);
    let (again, t2) = claim_until(pool, f).await;
    assert_eq!(again.id, fid);

    // Consumed while still pending (the consumer beat the relay's mark): the late mark
    // changes nothing.
    let mut tx = T::DB::begin(pool).await.expect("begin");
    T::DB::mark_consumed(&mut *tx, &TABLE, &[fid])
        .await
        .expect("consumed");
    tx.commit().await.expect("commit");
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[fid], t2)
            .await
            .expect("mark"),
        0
    );
    assert_eq!(fetch(pool, f).await.status, Status::Consumed);

    let counts = T::DB::counts(pool, &TABLE, &SVC).await.expect("counts");
    assert_eq!(
        (
            counts.pending,
            counts.published,
            counts.consumed,
            counts.dead
        ),
        (0, 0, 2, 0)
    );
    db.cleanup().await;
}

/// The consumer's ordering check, read by its lock: the nearest older row of the same
/// service and key that is pending or published holds the younger one back; consumed or
/// dead does not.
async fn open_predecessors<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();

    let k1 = publish(pool, &SVC, Some("k")).await;
    let k2 = publish(pool, &SVC, Some("k")).await;
    let j1 = publish(pool, &SVC, Some("j")).await;
    let k3 = publish(pool, &SVC, Some("k")).await;
    let free = publish(pool, &SVC, None).await;
    let (k1_id, k2_id) = (fetch(pool, k1).await.id, fetch(pool, k2).await.id);

    let before = |event: Uuid| async move {
        let mut tx = T::DB::begin(pool).await.expect("begin");
        let row = T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, event)
            .await
            .expect("lock")
            .expect("row");
        tx.commit().await.expect("commit");
        row.open_before
    };
    assert_eq!(before(k2).await, Some(k1_id), "pending predecessor");
    assert_eq!(before(k3).await, Some(k2_id), "the nearest one");
    assert_eq!(before(k1).await, None, "the head has none");
    assert_eq!(before(j1).await, None, "other keys do not count");
    assert_eq!(before(free).await, None, "a keyless row has none");

    let t = token();
    let claimed = claim(pool, &SVC, 10, LONG, t).await;
    assert_eq!(event_ids(&claimed), vec![k1, j1, free]);
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[k1_id], t)
            .await
            .expect("mark"),
        1
    );
    assert_eq!(before(k2).await, Some(k1_id), "published predecessor");

    let mut tx = T::DB::begin(pool).await.expect("begin");
    T::DB::mark_consumed(&mut *tx, &TABLE, &[k1_id])
        .await
        .expect("consumed");
    tx.commit().await.expect("commit");
    assert_eq!(before(k2).await, None, "consumed predecessor");
    assert_eq!(before(k3).await, Some(k2_id), "k2 pending");
    assert!(T::DB::mark_dead(
        pool,
        &TABLE,
        k2_id,
        AttemptsFence(0),
        "x",
        DeadReason::Permanent
    )
    .await
    .expect("dead"));
    assert_eq!(before(k3).await, None, "dead predecessor");
    db.cleanup().await;
}

/// A consumer batch's up-front lock never waits: it returns the states of the rows it
/// could lock (of its service), leaving out rows another transaction holds, each with
/// its nearest open predecessor; and the batch's one consumed mark for several rows.
async fn batch_lock_and_batch_reads<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();
    let k1 = publish(pool, &SVC, Some("k")).await;
    let k2 = publish(pool, &SVC, Some("k")).await;
    let free = publish(pool, &SVC, None).await;
    let other = publish(pool, &OTHER_SVC, Some("k")).await;
    let (k1_id, k2_id, free_id) = (
        fetch(pool, k1).await.id,
        fetch(pool, k2).await.id,
        fetch(pool, free).await.id,
    );
    let batch = [k1, k2, free, other, Uuid::now_v7()];

    // SQLite has one writer at a time: nothing else can hold a row.
    let one_writer = T::LABEL == "sqlite";
    let holder = if one_writer {
        None
    } else {
        let mut holder = T::DB::begin(pool).await.expect("begin");
        T::DB::lock_for_consume(&mut *holder, &TABLE, &SVC, k2)
            .await
            .expect("lock")
            .expect("row");
        Some(holder)
    };
    let mut tx = T::DB::begin(pool).await.expect("begin");
    let mut locked = T::DB::lock_batch_for_consume(&mut *tx, &TABLE, &SVC, &batch)
        .await
        .expect("batch lock (must not wait for the held row)");
    locked.sort_by_key(|(_, r)| r.id);
    let got: Vec<(Uuid, i64, Option<&str>, Option<i64>)> = locked
        .iter()
        .map(|(e, r)| (*e, r.id, r.key.as_deref(), r.open_before))
        .collect();
    let mut want = vec![(k1, k1_id, Some("k"), None)];
    if one_writer {
        want.push((k2, k2_id, Some("k"), Some(k1_id)));
    }
    want.push((free, free_id, None, None));
    assert_eq!(
        got, want,
        "the free rows of the service, none held by another"
    );
    assert!(locked.iter().all(|(_, r)| r.status == Status::Pending));

    // One consumed mark for several rows.
    T::DB::mark_consumed(&mut *tx, &TABLE, &[k1_id, free_id])
        .await
        .expect("consumed");
    tx.commit().await.expect("commit");
    if let Some(holder) = holder {
        holder.commit().await.expect("commit");
    }
    assert_eq!(fetch(pool, k1).await.status, Status::Consumed);
    assert_eq!(fetch(pool, free).await.status, Status::Consumed);
    assert_eq!(fetch(pool, k2).await.status, Status::Pending);
    assert_eq!(fetch(pool, other).await.status, Status::Pending);
    db.cleanup().await;
}

/// Services sharing one table never see each other's rows, keys included.
async fn services_share_a_table<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();

    let b1 = publish(pool, &OTHER_SVC, Some("k")).await;
    let a1 = publish(pool, &SVC, Some("k")).await;
    let a2 = publish(pool, &SVC, Some("k")).await;
    let (b1_id, a2_id) = (fetch(pool, b1).await.id, fetch(pool, a2).await.id);

    let ta = token();
    assert_eq!(
        event_ids(&claim(pool, &SVC, 10, LONG, ta).await),
        vec![a1],
        "billing's k is another key"
    );
    let tb = token();
    assert_eq!(
        event_ids(&claim(pool, &OTHER_SVC, 10, LONG, tb).await),
        vec![b1]
    );
    assert!(claim(
        pool,
        &ServiceName::new("nobody").unwrap(),
        10,
        LONG,
        token()
    )
    .await
    .is_empty());

    let mine: Vec<Uuid> = T::DB::fetch_all(pool, &TABLE, &SVC)
        .await
        .expect("fetch_all")
        .iter()
        .map(|r| {
            assert_eq!(r.service, SVC.as_str());
            r.event_id
        })
        .collect();
    assert_eq!(mine, vec![a1, a2]);
    let counts = T::DB::counts(pool, &TABLE, &SVC).await.expect("counts");
    assert_eq!((counts.pending, counts.published), (2, 0));
    let counts = T::DB::counts(pool, &TABLE, &OTHER_SVC)
        .await
        .expect("counts");
    assert_eq!((counts.pending, counts.published), (1, 0));

    let mut tx = T::DB::begin(pool).await.expect("begin");
    assert!(T::DB::lock_for_consume(&mut *tx, &TABLE, &OTHER_SVC, a1)
        .await
        .expect("lock")
        .is_none());
    assert!(T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, b1)
        .await
        .expect("lock")
        .is_none());
    // b1 (billing, key k, oldest) has no predecessor: orders' rows of key k are not
    // billing's.
    let b1_row = T::DB::lock_for_consume(&mut *tx, &TABLE, &OTHER_SVC, b1)
        .await
        .expect("lock")
        .expect("row");
    assert_eq!((b1_row.id, b1_row.open_before), (b1_id, None));
    tx.commit().await.expect("commit");

    let a1_id = fetch(pool, a1).await.id;
    assert_eq!(
        T::DB::mark_published(pool, &TABLE, &[a1_id], ta)
            .await
            .expect("mark"),
        1
    );
    let mut tx = T::DB::begin(pool).await.expect("begin");
    T::DB::mark_consumed(&mut *tx, &TABLE, &[a1_id])
        .await
        .expect("consumed");
    let a2_row = T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, a2)
        .await
        .expect("lock")
        .expect("row");
    tx.commit().await.expect("commit");
    assert_eq!(
        (a2_row.id, a2_row.open_before),
        (a2_id, None),
        "billing's open b1 is not orders' predecessor"
    );
    assert_eq!(
        fetch(pool, b1).await.status,
        Status::Pending,
        "billing's row untouched"
    );
    db.cleanup().await;
}

/// Times come from the database clock, in UTC: due times are the database's now plus
/// the delay the app passed.
async fn times_from_the_database_clock<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();

    let db_before = T::DB::now(pool).await.expect("now");
    let e = publish(pool, &SVC, None).await;
    let db_after = T::DB::now(pool).await.expect("now");
    let r = fetch(pool, e).await;
    assert!(
        micros_between(db_before, r.created_at) >= -1_000
            && micros_between(r.created_at, db_after) >= -1_000,
        "created_at {} within [{db_before}, {db_after}]",
        r.created_at
    );
    assert_eq!(r.updated_at, r.created_at);
    assert_eq!(r.next_attempt_at, r.created_at, "due at once");
    assert_eq!(
        (r.published_at, r.consumed_at, r.dead_at, r.last_error),
        (None, None, None, None)
    );
    // Stored and read back as UTC (the test runs on the database's host).
    let skew = micros_between(Utc::now(), db_after).abs();
    assert!(
        skew < 60_000_000,
        "database clock {db_after} vs app clock {}",
        Utc::now()
    );

    let t = token();
    let id = claim(pool, &SVC, 10, LONG, t).await[0].id;
    let ninety = Duration::from_secs(90);
    assert_eq!(
        T::DB::release(pool, &TABLE, &[id], t, ninety, "x")
            .await
            .expect("release"),
        1
    );
    assert_due_after(&fetch(pool, e).await, ninety);

    // Long delays are plain database arithmetic.
    let t = token();
    let f = publish(pool, &SVC, None).await;
    let fid = claim(pool, &SVC, 10, LONG, t).await[0].id;
    assert!(T::DB::retry_later(
        pool,
        &TABLE,
        fid,
        AttemptsFence(0),
        Duration::from_secs(86_400 * 365 * 50),
        "x"
    )
    .await
    .expect("retry"));
    let r = fetch(pool, f).await;
    assert!(micros_between(db_after, r.next_attempt_at) > 49 * 365 * 86_400 * 1_000_000);
    db.cleanup().await;
}

/// `(key, id)` of every claimed row, in claim order.
type ClaimLog = Arc<Mutex<Vec<(Option<String>, i64)>>>;

/// 20 writers insert in their own transactions while claimers claim and mark in a
/// loop: nothing lost, nothing claimed twice under a live lease, per-key order kept,
/// no busy/deadlock error surfaced to a writer.
async fn concurrent_writers_and_claimers<T: TestDatabase>() {
    const WRITERS: usize = 20;
    const PER_WRITER: usize = 30;
    let db = setup::<T>().await;
    let pool = db.pool().clone();
    let claimers = if T::DB::CONCURRENT_RELAYS { 2 } else { 1 };
    let retries_before = outbox_runtime::backend::mysql::mysql_retry_count();
    let started = Instant::now();

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            // Even writers use one key each (so per-key order is the writer's order);
            // odd writers write keyless rows.
            let key = (w % 2 == 0).then(|| format!("w{w}"));
            let mut written = Vec::with_capacity(PER_WRITER);
            while written.len() < PER_WRITER {
                let batch = (1 + written.len() % 3).min(PER_WRITER - written.len());
                let mut tx = T::DB::begin(&pool).await?;
                for _ in 0..batch {
                    let event_id = Uuid::now_v7();
                    let payload = format!(r#"{{"writer":{w}}}"#);
                    let row = NewRow {
                        event_id,
                        service: &SVC,
                        event_type: "OrderPlaced",
                        version: 1,
                        key: key.as_deref(),
                        payload: &payload,
                        max_retries: 3,
                        trace_context: None,
                    };
                    T::DB::insert(&mut *tx, &TABLE, &row).await?;
                    written.push(event_id);
                }
                tx.commit().await?;
            }
            Ok::<Vec<Uuid>, sqlx::Error>(written)
        }));
    }

    let seen: Arc<Mutex<HashMap<Uuid, u32>>> = Arc::default();
    // (key, id) in the order claims returned, recorded before the rows are marked.
    let claim_log: ClaimLog = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    for _ in 0..claimers {
        let (pool, seen, claim_log, stop) =
            (pool.clone(), seen.clone(), claim_log.clone(), stop.clone());
        relays.push(tokio::spawn(async move {
            let mut claims = 0u64;
            loop {
                let t = token();
                let rows = T::DB::claim(&pool, &TABLE, &SVC, 16, LONG, t).await?;
                if rows.is_empty() {
                    if stop.load(Ordering::SeqCst) {
                        return Ok::<u64, sqlx::Error>(claims);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                claims += 1;
                {
                    let mut seen = seen.lock().expect("lock");
                    let mut log = claim_log.lock().expect("lock");
                    for r in &rows {
                        *seen.entry(r.event_id).or_default() += 1;
                        log.push((r.key.clone(), r.id));
                    }
                }
                let ids = row_ids(&rows);
                let marked = T::DB::mark_published(&pool, &TABLE, &ids, t).await?;
                assert_eq!(
                    marked as usize,
                    ids.len(),
                    "every claimed row is still ours to mark"
                );
            }
        }));
    }

    let mut written = Vec::new();
    for w in writers {
        let ids = w
            .await
            .expect("writer task")
            .unwrap_or_else(|e| panic!("writer saw an error: {e}"));
        written.extend(ids);
    }
    let total = (WRITERS * PER_WRITER) as u64;
    assert_eq!(written.len() as u64, total);
    let writes_done = started.elapsed();

    let pool_ref = &pool;
    poll_until("every row published", || async move {
        let c = T::DB::counts(pool_ref, &TABLE, &SVC).await.expect("counts");
        (c.published == total).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut claims = 0;
    for r in relays {
        claims += r
            .await
            .expect("relay task")
            .unwrap_or_else(|e| panic!("claimer saw an error: {e}"));
    }
    let elapsed = started.elapsed();

    let seen = seen.lock().expect("lock").clone();
    for e in &written {
        assert_eq!(
            seen.get(e).copied(),
            Some(1),
            "event {e} claimed exactly once"
        );
    }
    assert_eq!(
        seen.len(),
        written.len(),
        "nothing claimed that was not written"
    );
    let counts = T::DB::counts(&pool, &TABLE, &SVC).await.expect("counts");
    assert_eq!((counts.pending, counts.published), (0, total));

    // Per key, claims happened in id order (each key has a single sequential writer).
    let mut last: HashMap<String, i64> = HashMap::new();
    for (key, id) in claim_log.lock().expect("lock").iter() {
        if let Some(k) = key {
            let prev = last.insert(k.clone(), *id);
            assert!(
                prev.is_none_or(|p| p < *id),
                "key {k}: {id} claimed after {prev:?}"
            );
        }
    }
    let retries = outbox_runtime::backend::mysql::mysql_retry_count() - retries_before;
    eprintln!(
        "[{}] {total} rows by {WRITERS} writers in {writes_done:?}; {claimers} claimer(s) drained \
         them in {claims} claims, {elapsed:?} overall ({:.0} rows/s); mysql retries (process-wide): {retries}",
        T::LABEL,
        total as f64 / elapsed.as_secs_f64(),
    );
    db.cleanup().await;
}

/// The consumer's lock reads the event as the business transaction stored it (type,
/// version, key, payload) and whether it is due, by the database clock.
async fn lock_reads_the_stored_event<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();
    let e = publish(pool, &SVC, Some("k")).await;
    let mut tx = T::DB::begin(pool).await.expect("begin");
    let st = T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, e)
        .await
        .expect("lock")
        .expect("found");
    assert_eq!(
        (st.event_type.as_str(), st.version, st.key.as_deref()),
        ("OrderPlaced", 2, Some("k"))
    );
    assert_eq!(st.payload, format!(r#"{{"event":"{e}"}}"#));
    assert!(st.due, "a fresh row is due");
    let batch = T::DB::lock_batch_for_consume(&mut *tx, &TABLE, &SVC, &[e])
        .await
        .expect("batch lock");
    assert_eq!(batch.len(), 1);
    assert_eq!(
        (batch[0].1.payload.as_str(), batch[0].1.due),
        (st.payload.as_str(), true)
    );
    tx.rollback().await.expect("rollback");

    // In a retry backoff: pending, not due.
    let t = token();
    let id = claim(pool, &SVC, 10, LONG, t).await[0].id;
    assert!(
        T::DB::retry_later(pool, &TABLE, id, AttemptsFence(0), LONG, "boom")
            .await
            .expect("retry")
    );
    let mut tx = T::DB::begin(pool).await.expect("begin");
    let st = T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, e)
        .await
        .expect("lock")
        .expect("found");
    assert_eq!((st.status, st.due), (Status::Pending, false));
    tx.rollback().await.expect("rollback");
    db.cleanup().await;
}

/// Deferring a row behind an open predecessor sends its key's *published* predecessors
/// back to pending, due now (their records never reached the consumer), and leaves
/// pending predecessors, later rows and other keys alone. The head-of-key claim then
/// takes them in order.
async fn defer_sends_lost_predecessors_again<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();
    let a1 = publish(pool, &SVC, Some("a")).await;
    let a2 = publish(pool, &SVC, Some("a")).await;
    let b1 = publish(pool, &SVC, Some("b")).await;
    // a1 and b1 published (their records lost), then a2 published too.
    let t = token();
    let first: Vec<i64> = claim(pool, &SVC, 10, LONG, t)
        .await
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(first.len(), 2, "heads a1 and b1");
    T::DB::mark_published(pool, &TABLE, &first, t)
        .await
        .expect("mark");
    let t = token();
    let second = claim(pool, &SVC, 10, LONG, t).await;
    assert_eq!(event_ids(&second), vec![a2]);
    T::DB::mark_published(pool, &TABLE, &[second[0].id], t)
        .await
        .expect("mark");
    let a3 = publish(pool, &SVC, Some("a")).await;

    // a2's record arrives; a1 is open.
    let (a1_id, a2_id) = (fetch(pool, a1).await.id, fetch(pool, a2).await.id);
    let mut tx = T::DB::begin(pool).await.expect("begin");
    let a2_row = T::DB::lock_for_consume(&mut *tx, &TABLE, &SVC, a2)
        .await
        .expect("lock")
        .expect("row");
    assert_eq!(a2_row.open_before, Some(a1_id));
    let republished = T::DB::defer(&mut *tx, &TABLE, &SVC, "a", a2_id, LONG)
        .await
        .expect("defer");
    tx.commit().await.expect("commit");
    assert_eq!(republished, 1, "only a1");
    let r1 = fetch(pool, a1).await;
    assert_eq!((r1.status, r1.attempts), (Status::Pending, 0));
    assert_due_after(&r1, Duration::ZERO);
    let r2 = fetch(pool, a2).await;
    assert_eq!(r2.status, Status::Pending);
    assert_due_after(&r2, LONG);
    assert_eq!(
        fetch(pool, b1).await.status,
        Status::Published,
        "other keys untouched"
    );
    assert_eq!(fetch(pool, a3).await.status, Status::Pending);

    // The claim sends a1 first; a2 waits behind it (and is not due yet anyway).
    let t = token();
    let again = claim(pool, &SVC, 10, LONG, t).await;
    assert_eq!(event_ids(&again), vec![a1]);
    db.cleanup().await;
}

/// Moves a row's `published_at` back by `secs` seconds (each backend stores time its way).
async fn backdate_published<DB: Backend>(pool: &Pool<DB>, id: i64, secs: i64) {
    let sql = match DB::BACKEND_NAME {
        "postgres" => "UPDATE outbox_events SET published_at = published_at - make_interval(secs => ?) WHERE id = ?",
        "mysql" => "UPDATE outbox_events SET published_at = published_at - INTERVAL ? SECOND WHERE id = ?",
        _ => "UPDATE outbox_events SET published_at = published_at - ? * 1000000 WHERE id = ?",
    };
    let mut conn = pool.acquire().await.expect("connection");
    DB::execute_portable(&mut conn, sql, &[secs.into(), id.into()])
        .await
        .expect("backdate");
}

/// The redelivery sweep takes published, unconsumed rows by how long ago they were
/// published: older than a bound, and (for the relay's sweep after a lost log) newer
/// than another; consumed rows never.
async fn redelivery_by_publish_age<T: TestDatabase>() {
    let db = setup::<T>().await;
    let pool = db.pool();
    let (a, b, c, d) = (
        publish(pool, &SVC, Some("a")).await,
        publish(pool, &SVC, Some("b")).await,
        publish(pool, &SVC, Some("c")).await,
        publish(pool, &SVC, Some("d")).await,
    );
    let t = token();
    let ids: Vec<i64> = claim(pool, &SVC, 10, LONG, t)
        .await
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids.len(), 4);
    T::DB::mark_published(pool, &TABLE, &ids, t)
        .await
        .expect("mark");
    let id = |e| async move { fetch(pool, e).await.id };
    backdate_published(pool, id(a).await, 100).await;
    backdate_published(pool, id(b).await, 50).await;
    backdate_published(pool, id(d).await, 100).await;
    let mut tx = T::DB::begin(pool).await.expect("begin");
    T::DB::mark_consumed(&mut *tx, &TABLE, &[id(d).await])
        .await
        .expect("consumed");
    tx.commit().await.expect("commit");

    let window = |older: u64, newer: Option<u64>| {
        (Duration::from_secs(older), newer.map(Duration::from_secs))
    };
    let (older, newer) = window(30, Some(70));
    assert_eq!(
        T::DB::redeliver_stale(pool, &TABLE, &SVC, older, newer, 10)
            .await
            .expect("sweep"),
        1,
        "published 50 s ago: between 30 and 70"
    );
    assert_eq!(fetch(pool, b).await.status, Status::Pending);
    let (older, newer) = window(60, None);
    assert_eq!(
        T::DB::redeliver_stale(pool, &TABLE, &SVC, older, newer, 10)
            .await
            .expect("sweep"),
        1,
        "published 100 s ago"
    );
    assert_eq!(fetch(pool, a).await.status, Status::Pending);
    assert_eq!(fetch(pool, c).await.status, Status::Published, "too recent");
    assert_eq!(
        fetch(pool, d).await.status,
        Status::Consumed,
        "consumed rows never"
    );
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------
// Every behaviour on every backend.
// ---------------------------------------------------------------------------------

outbox_tests::every_backend!(
    migrate_is_idempotent,
    claim_lease_and_fencing,
    head_of_key,
    heads_behind_a_deep_backlog,
    claim_window_is_bounded,
    claim_past_window_takes_only_hidden_heads,
    release_backs_off_without_attempt,
    consumer_failures_fenced_by_attempts,
    terminal_states_and_defer,
    open_predecessors,
    batch_lock_and_batch_reads,
    services_share_a_table,
    times_from_the_database_clock,
    concurrent_writers_and_claimers,
    lock_reads_the_stored_event,
    defer_sends_lost_predecessors_again,
    redelivery_by_publish_age,
);

// ---------------------------------------------------------------------------------
// What only one backend has.
// ---------------------------------------------------------------------------------

mod mysql_specific {
    use super::*;
    use outbox_runtime::backend::mysql::mysql_retry_count;
    use outbox_tests::db::TestMySql;
    use sqlx::mysql::MySqlPoolOptions;
    use sqlx::{Executor, MySql};

    /// `begin` gives READ COMMITTED: a second read in the transaction sees another
    /// transaction's commit (so locking reads take no gap locks).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn begin_is_read_committed() {
        let db = setup::<TestMySql>().await;
        let pool = db.pool();
        let count = format!("SELECT COUNT(*) FROM {}", *TABLE);
        let mut tx = MySql::begin(pool).await.expect("begin");
        let before: i64 = sqlx::query_scalar(&count)
            .fetch_one(&mut *tx)
            .await
            .expect("count");
        publish(pool, &SVC, None).await;
        let after: i64 = sqlx::query_scalar(&count)
            .fetch_one(&mut *tx)
            .await
            .expect("count");
        tx.commit().await.expect("commit");
        assert_eq!(
            after,
            before + 1,
            "READ COMMITTED sees the concurrent commit"
        );
        db.cleanup().await;
    }

    /// The table has the indexes the queries need.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn indexes_exist() {
        let db = setup::<TestMySql>().await;
        let mut names: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT CAST(index_name AS CHAR) FROM information_schema.statistics \
              WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(TABLE.as_str())
        .fetch_all(db.pool())
        .await
        .expect("statistics");
        names.sort();
        assert_eq!(names, vec!["PRIMARY", "ix_claim", "ix_key", "uq_event_id"]);
        db.cleanup().await;
    }

    /// The claim bounds its own idle time with the session's `wait_timeout` and puts
    /// the session's value back afterwards, claim or no claim: a pooled connection keeps
    /// the setting its `after_connect` gave it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn claim_restores_wait_timeout() {
        let db = setup::<TestMySql>().await;
        let pool = db.pool();
        let one = MySqlPoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET SESSION wait_timeout = 1234").await?;
                    Ok(())
                })
            })
            .connect_with((*pool.connect_options()).clone())
            .await
            .expect("pool");
        let wait_timeout = || async {
            sqlx::query_scalar::<_, u64>("SELECT @@SESSION.wait_timeout")
                .fetch_one(&one)
                .await
                .expect("wait_timeout")
        };
        assert!(claim(&one, &SVC, 10, LONG, token()).await.is_empty());
        assert_eq!(wait_timeout().await, 1234, "after an empty claim");
        publish(pool, &SVC, None).await;
        assert_eq!(claim(&one, &SVC, 10, LONG, token()).await.len(), 1);
        assert_eq!(wait_timeout().await, 1234, "after a claim");
        one.close().await;
        db.cleanup().await;
    }

    /// A lock-wait timeout (1205) of a pool-level transition is retried, counted, and
    /// succeeds once the lock is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn lock_wait_timeouts_are_retried() {
        let db = setup::<TestMySql>().await;
        let pool = db.pool();
        let e = publish(pool, &SVC, None).await;
        let t = token();
        let id = claim(pool, &SVC, 10, LONG, t).await[0].id;
        assert_eq!(
            MySql::mark_published(pool, &TABLE, &[id], t)
                .await
                .expect("mark"),
            1
        );

        // Sessions that give up on a row lock after one second.
        let impatient = MySqlPoolOptions::new()
            .max_connections(2)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET SESSION innodb_lock_wait_timeout = 1")
                        .await?;
                    Ok(())
                })
            })
            .connect_with((*pool.connect_options()).clone())
            .await
            .expect("pool");

        let before = mysql_retry_count();
        // A consumer holds the row lock.
        let mut holder = MySql::begin(pool).await.expect("begin");
        MySql::lock_for_consume(&mut *holder, &TABLE, &SVC, e)
            .await
            .expect("lock")
            .expect("row");
        let waiter = {
            let impatient = impatient.clone();
            tokio::spawn(async move {
                MySql::retry_later(
                    &impatient,
                    &TABLE,
                    id,
                    AttemptsFence(0),
                    Duration::ZERO,
                    "x",
                )
                .await
            })
        };
        // (The counter is process-wide: another test's retry could end this wait early,
        // which only makes the test weaker, never wrong.)
        poll_until("a retry after the lock-wait timeout", || async {
            (mysql_retry_count() > before).then_some(())
        })
        .await;
        holder.commit().await.expect("commit");
        let changed = waiter.await.expect("task").expect("retried, not surfaced");
        assert!(changed);
        assert_eq!(fetch(pool, e).await.attempts, 1);
        impatient.close().await;
        db.cleanup().await;
    }
}

mod sqlite_specific {
    use super::*;
    use outbox_runtime::sqlite::sqlite_connect_options;
    use outbox_tests::db::TestSqlite;
    use sqlx::{ConnectOptions, Connection, Executor, Sqlite};

    /// The connect options: WAL, a busy timeout, synchronous NORMAL, foreign keys.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn connect_options_apply() {
        let db = setup::<TestSqlite>().await;
        let pool = db.pool();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(pool)
            .await
            .expect("pragma");
        assert_eq!(mode, "wal");
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(pool)
            .await
            .expect("pragma");
        assert_eq!(busy, 10_000);
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(pool)
            .await
            .expect("pragma");
        assert_eq!(sync, 1, "NORMAL");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(pool)
            .await
            .expect("pragma");
        assert_eq!(fk, 1);
        db.cleanup().await;
    }

    /// `begin` is BEGIN IMMEDIATE: it holds the write lock before its first statement,
    /// so no writer upgrades a read lock (SQLITE_BUSY_SNAPSHOT).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn begin_takes_the_write_lock() {
        let db = setup::<TestSqlite>().await;
        let path = db.dir().join("outbox.db");
        let path = path.to_str().expect("utf-8 path");
        let mut other = sqlite_connect_options(path)
            .busy_timeout(Duration::ZERO)
            .connect()
            .await
            .expect("connect");

        let tx = Sqlite::begin(db.pool()).await.expect("begin");
        let err = other
            .execute("BEGIN IMMEDIATE")
            .await
            .expect_err("write lock is taken");
        assert!(err.to_string().contains("locked"), "{err}");
        tx.rollback().await.expect("rollback");
        other.execute("BEGIN IMMEDIATE").await.expect("free again");
        other.execute("ROLLBACK").await.expect("rollback");
        other.close().await.expect("close");
        db.cleanup().await;
    }

    /// The migration (several statements) ran completely: both indexes exist.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn indexes_exist() {
        let db = setup::<TestSqlite>().await;
        let mut names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
        )
        .bind(TABLE.as_str())
        .fetch_all(db.pool())
        .await
        .expect("indexes");
        names.sort();
        assert_eq!(
            names,
            vec![
                format!("{}_claim_idx", *TABLE),
                format!("{}_key_idx", *TABLE)
            ]
        );
        db.cleanup().await;
    }
}

mod postgres_specific {
    use super::*;
    // The documented operator paths (README, "Operating it").
    use outbox_runtime::postgres::{claim_sql, take_claim_turn};
    use outbox_tests::db::TestPg;
    use sqlx::Postgres;

    /// The migration ran completely: the due index replaced the old pending index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn indexes_exist() {
        let db = setup::<TestPg>().await;
        let mut names: Vec<String> =
            sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE tablename = $1")
                .bind(TABLE.as_str())
                .fetch_all(db.pool())
                .await
                .expect("pg_indexes");
        names.sort();
        let want: Vec<String> = [
            "due_idx",
            "event_id_key",
            "open_key_idx",
            "pending_key_idx",
            "pkey",
        ]
        .iter()
        .map(|s| format!("{}_{s}", *TABLE))
        .collect();
        assert_eq!(names, want);
        db.cleanup().await;
    }

    /// The lease is a HOT update: the migration leaves half of each page free and no
    /// index covers the lease's columns, so claiming writes no index entry (with full
    /// pages every claim wrote entries in all five indexes: 3.5x the claim's time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_claim_is_a_hot_update() {
        let db = setup::<TestPg>().await;
        let pool = db.pool();
        for i in 0..40 {
            publish(pool, &SVC, Some(&format!("k{i}"))).await;
        }
        let counts = || async {
            // Statistics reach the views within a second or so of the transaction.
            sqlx::query("SELECT pg_stat_clear_snapshot()")
                .execute(pool)
                .await
                .expect("clear snapshot");
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = $1",
            )
            .bind(TABLE.as_str())
            .fetch_one(pool)
            .await
            .expect("pg_stat_user_tables")
        };
        let before = counts().await;
        let claimed = claim(pool, &SVC, 100, LONG, token()).await;
        assert_eq!(claimed.len(), 40);
        let (updates, hot) = poll_until("the claim's updates in pg_stat_user_tables", || async {
            let now = counts().await;
            (now.0 - before.0 >= 40).then_some((now.0 - before.0, now.1 - before.1))
        })
        .await;
        assert_eq!(hot, updates, "every lease update is HOT");
        db.cleanup().await;
    }

    /// A table name as long as the grammar allows: PostgreSQL cuts identifiers at 63
    /// bytes, so the index names lose their ends. Every index must still exist, and a
    /// second `migrate` (every `start` runs one) must leave them alone, not drop and
    /// rebuild one under a name that happens to match after the cut (a rebuild locks
    /// the writers of a big table for as long as it takes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn longest_table_name_keeps_its_indexes_across_migrations() {
        let db = TestPg::create().await;
        let name = format!("t{}", "x".repeat(outbox_runtime::names::MAX_TABLE_LEN - 1));
        let table = TableName::new(&name).expect("the longest valid table name");
        let indexes = || async {
            let mut rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT indexdef, c.oid::bigint FROM pg_indexes i \
                 JOIN pg_class c ON c.relname = i.indexname WHERE i.tablename = $1",
            )
            .bind(table.as_str())
            .fetch_all(db.pool())
            .await
            .expect("pg_indexes");
            rows.sort();
            rows
        };
        Postgres::migrate(db.pool(), &table).await.expect("migrate");
        let first = indexes().await;
        let defs: Vec<&str> = first.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(first.len(), 5, "{defs:#?}");
        for wanted in [
            "(service, next_attempt_at, id) WHERE (status = 0)",
            "(service, event_key, id) WHERE ((status = ANY (ARRAY[0, 1])) AND (event_key IS NOT NULL))",
            "(service, event_key, id) WHERE ((status = 0) AND (event_key IS NOT NULL))",
        ] {
            assert!(defs.iter().any(|d| d.ends_with(wanted)), "no index {wanted}: {defs:#?}");
        }
        Postgres::migrate(db.pool(), &table)
            .await
            .expect("migrate again");
        assert_eq!(
            indexes().await,
            first,
            "the second migrate rebuilt an index"
        );
        db.cleanup().await;
    }

    /// The relays of a service take turns at the claim ([`take_claim_turn`], the
    /// advisory lock the README documents): while another transaction holds it, a claim waits (seen in
    /// `pg_locks`), then claims once it is released. Another service's claim does not
    /// wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn claims_take_turns() {
        let db = setup::<TestPg>().await;
        let pool = db.pool().clone();
        let mine = publish(&pool, &SVC, Some("k")).await;
        let other = publish(&pool, &OTHER_SVC, Some("k")).await;

        let mut holder = pool.begin().await.expect("begin");
        take_claim_turn(&mut holder, &TABLE, &SVC)
            .await
            .expect("take the claim lock");

        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { claim(&pool, &SVC, 10, LONG, token()).await })
        };
        let pool_ref = &pool;
        poll_until("the claim to wait for the advisory lock", || async move {
            let waiters: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks \
                  WHERE locktype = 'advisory' AND NOT granted \
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(pool_ref)
            .await
            .expect("pg_locks");
            (waiters == 1).then_some(())
        })
        .await;
        let others = claim(&pool, &OTHER_SVC, 10, LONG, token()).await;
        assert_eq!(
            event_ids(&others),
            vec![other],
            "another service does not wait"
        );
        assert!(
            !waiting.is_finished(),
            "the claim waits while the lock is held"
        );

        holder.commit().await.expect("release");
        let rows = waiting.await.expect("claim task");
        assert_eq!(event_ids(&rows), vec![mine], "claims once the lock is free");
        db.cleanup().await;
    }

    /// A sweep that sends published rows again never turns back a row a consumer is
    /// consuming: it waits for the consumer's row lock, then finds the row consumed.
    /// (The statements pick rows in a subquery; PostgreSQL checks only the outer
    /// condition again after such a wait, so the status is filtered there too.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sweeps_do_not_undo_a_concurrent_consume() {
        let db = setup::<TestPg>().await;
        let pool = db.pool().clone();
        let e = publish(&pool, &SVC, Some("k")).await;
        let t = token();
        let id = claim(&pool, &SVC, 10, LONG, t).await[0].id;
        Postgres::mark_published(&pool, &TABLE, &[id], t)
            .await
            .expect("mark");

        let mut consumer = Postgres::begin(&pool).await.expect("begin");
        Postgres::lock_for_consume(&mut consumer, &TABLE, &SVC, e)
            .await
            .expect("lock")
            .expect("row");
        let sweep = {
            let pool = pool.clone();
            tokio::spawn(async move {
                Postgres::redeliver_stale(&pool, &TABLE, &SVC, Duration::ZERO, None, 10)
                    .await
                    .expect("sweep")
            })
        };
        let pool_ref = &pool;
        poll_until(
            "the sweep to wait for the consumer's row lock",
            || async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                  WHERE datname = current_database() AND wait_event_type = 'Lock' \
                    AND query LIKE 'UPDATE%'",
                )
                .fetch_one(pool_ref)
                .await
                .expect("pg_stat_activity");
                (waiting == 1).then_some(())
            },
        )
        .await;
        Postgres::mark_consumed(&mut consumer, &TABLE, &[id])
            .await
            .expect("consumed");
        consumer.commit().await.expect("commit");
        assert_eq!(sweep.await.expect("sweep task"), 0, "nothing sent again");
        assert_eq!(fetch(&pool, e).await.status, Status::Consumed);
        db.cleanup().await;
    }

    /// The relay's fenced statements on a batch of ids (marks, give-back) find their
    /// rows by primary key and read nothing of the due index. With a status test beside
    /// the token, PostgreSQL planned them on the due index (partial on that status) when
    /// the table was young: each id of the list then scanned every pending row, and a
    /// mark took 40-350 ms at 5,000 events/s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fenced_marks_read_no_due_index() {
        let db = setup::<TestPg>().await;
        // A young table that was never analyzed (as every new table is for its first
        // minutes): PostgreSQL then sizes the due index by its pages, finds it small,
        // and prefers it to the primary key for `id = ANY(…) AND status = 0`.
        sqlx::query(&format!(
            "ALTER TABLE {} SET (autovacuum_enabled = false)",
            *TABLE
        ))
        .execute(db.pool())
        .await
        .expect("no autovacuum");
        // 1,000 consumed rows, then 1,000 pending ones.
        sqlx::query(&format!(
            "INSERT INTO {} (event_id, service, event_type, event_version, event_key, \
                             payload, max_retries, status) \
             SELECT gen_random_uuid(), $1, 'OrderPlaced', 1, 'k' || g, '{{}}', 3, \
                    CASE WHEN g <= 1000 THEN 2 ELSE 0 END \
               FROM generate_series(1, 2000) AS g",
            *TABLE
        ))
        .bind(SVC.as_str())
        .execute(db.pool())
        .await
        .expect("fill");
        // One connection, so the statements run often enough on it for PostgreSQL to
        // switch them to their generic plans.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*db.pool().connect_options()).clone())
            .await
            .expect("pool");
        let stats = || async {
            sqlx::query("SELECT pg_stat_clear_snapshot()")
                .execute(&pool)
                .await
                .expect("clear snapshot");
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT t.n_tup_upd, i.idx_scan FROM pg_stat_user_tables t \
                 JOIN pg_stat_user_indexes i ON i.relid = t.relid \
                 WHERE t.relname = $1 AND i.indexrelname = $2",
            )
            .bind(TABLE.as_str())
            .bind(format!("{}_due_idx", *TABLE))
            .fetch_one(&pool)
            .await
            .expect("statistics")
        };
        let t = token();
        let ids = row_ids(&claim(&pool, &SVC, 600, LONG, t).await);
        assert_eq!(ids.len(), 600);
        // The claim's own updates and index reads reach the views first.
        let before = poll_until("the claim in the statistics", || async {
            let now = stats().await;
            (now.0 >= 600).then_some(now)
        })
        .await;
        let chunks: Vec<&[i64]> = ids.chunks(25).collect();
        for chunk in &chunks[..8] {
            Postgres::release(&pool, &TABLE, chunk, t, LONG, "broker down")
                .await
                .expect("release");
        }
        for chunk in &chunks[8..] {
            assert_eq!(
                Postgres::mark_published(&pool, &TABLE, chunk, t)
                    .await
                    .expect("mark"),
                25
            );
        }
        let after = poll_until("the marks in the statistics", || async {
            let now = stats().await;
            (now.0 >= before.0 + 600).then_some(now)
        })
        .await;
        assert_eq!(
            after.1, before.1,
            "the marks and give-backs read the due index"
        );
        pool.close().await;
        db.cleanup().await;
    }

    /// The claim is planned for the table as it is when it runs. A prepared statement
    /// may switch to a generic plan after five runs and keep it; made while the table
    /// was small (new, or just emptied, before autovacuum first analyzed it), that plan
    /// scanned the whole table, or checked each candidate's head of key through the due
    /// index, once the backlog grew: 0.1-0.5 s per claim at 5,000 events/s, and the
    /// relay fell further behind with every claim. One connection runs every statement
    /// here, so the statistics counters show exactly what the last claim read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn claim_plans_for_the_table_as_it_is() {
        let db = setup::<TestPg>().await;
        let one = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*db.pool().connect_options()).clone())
            .await
            .expect("a pool of one connection");
        let exec = |sql: String| {
            let one = one.clone();
            async move { sqlx::query(&sql).execute(&one).await.expect("statement") }
        };
        exec(format!(
            "ALTER TABLE {} SET (autovacuum_enabled = false)",
            *TABLE
        ))
        .await;
        let fill = |rows: i64| {
            format!(
                "INSERT INTO {} (event_id, service, event_type, event_version, event_key, \
                                 payload, max_retries) \
                 SELECT gen_random_uuid(), '{}', 'OrderPlaced', 1, 'k' || (g % 1000), '{{}}', 3 \
                   FROM generate_series(1, {rows}) AS g",
                *TABLE,
                SVC.as_str()
            )
        };
        // Small: the claim runs often enough to be offered a generic plan.
        exec(fill(20)).await;
        for _ in 0..8 {
            Postgres::claim_in(&one, &TABLE, &SVC, 500, Window(2_000), LONG, token())
                .await
                .expect("claim");
            exec(format!(
                "UPDATE {} SET status = 1, lease_token = 0, locked_until = NULL \
                 WHERE lease_token <> 0",
                *TABLE
            ))
            .await;
        }
        // Then a backlog: 30,000 rows on 1,000 keys.
        exec(fill(30_000)).await;
        let counters = || async {
            // Flushes this backend's statistics when the statement ends, so the next
            // read sees them.
            exec("SELECT pg_stat_force_next_flush()".into()).await;
            exec("SELECT pg_stat_clear_snapshot()".into()).await;
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT t.seq_scan, i.idx_scan FROM pg_stat_user_tables t \
                   JOIN pg_stat_user_indexes i ON i.relid = t.relid \
                  WHERE t.relname = $1 AND i.indexrelname = $1 || '_due_idx'",
            )
            .bind(TABLE.as_str())
            .fetch_one(&one)
            .await
            .expect("statistics")
        };
        let before = counters().await;
        let rows = Postgres::claim_in(&one, &TABLE, &SVC, 500, Window(2_000), LONG, token())
            .await
            .expect("claim");
        let after = counters().await;
        assert_eq!(rows.len(), 500, "a full claim of heads");
        assert_eq!(after.0 - before.0, 0, "the claim scanned the whole table");
        assert!(
            after.1 - before.1 <= 2,
            "the claim read the due index {} times (the window and the candidates: 2; \
             more is a head-of-key check per candidate through it)",
            after.1 - before.1
        );
        one.close().await;
        db.cleanup().await;
    }

    /// The claim walks the due index, on a table where most rows are published and
    /// the statistics know it. The plan it replaced walked the primary key from its
    /// start under the claim's LIMIT, past every published row: 2,000 rows/s and
    /// falling on a 1,000,000-row backlog. Both claim statements are checked: the
    /// plain one and the relay's bounded-window one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn claim_walks_the_due_index() {
        const PUBLISHED: i64 = 100_000;
        const PENDING: i64 = 2_000;
        let db = setup::<TestPg>().await;
        let pool = db.pool();
        sqlx::query(&format!(
            "INSERT INTO {} (event_id, service, event_type, event_version, event_key, \
                                  payload, max_retries, status, published_at) \
             SELECT gen_random_uuid(), $1, 'OrderPlaced', 1, 'k' || (g % 100), '{{}}', 3, \
                    CASE WHEN g <= $2 THEN 1 ELSE 0 END, \
                    CASE WHEN g <= $2 THEN now() END \
               FROM generate_series(1, $3::bigint) AS g",
            *TABLE
        ))
        .bind(SVC.as_str())
        .bind(PUBLISHED)
        .bind(PUBLISHED + PENDING)
        .execute(pool)
        .await
        .expect("fill");
        sqlx::query(&format!("ANALYZE {}", *TABLE))
            .execute(pool)
            .await
            .expect("analyze");

        let mut conn = pool.acquire().await.expect("connection");
        for windowed in [false, true] {
            let sql = claim_sql(&TABLE, windowed);
            let explain = format!("EXPLAIN {sql}");
            let mut query = sqlx::query_scalar::<_, String>(&explain)
                .bind(SVC.as_str())
                .bind(500_i64)
                .bind(token())
                .bind(30.0_f64);
            if windowed {
                query = query.bind(500_i64);
            }
            let plan = query
                .fetch_all(&mut *conn)
                .await
                .expect("explain")
                .join("\n");
            // `t` is the UPDATE's target: by primary key, never a scan of the table.
            let target: Vec<&str> = plan
                .lines()
                .filter(|l| l.contains("Scan") && l.contains(&format!(" on {} t ", *TABLE)))
                .collect();
            assert!(
                !target.is_empty() && target.iter().all(|l| l.contains("_pkey on")),
                "the claimed rows are not updated by primary key (windowed: {windowed}):\n{plan}"
            );
            // `o` is the claimed rows' scan, `w` the window's.
            let aliases: &[&str] = if windowed { &["o", "w"] } else { &["o"] };
            for alias in aliases {
                let scans: Vec<&str> = plan
                    .lines()
                    .filter(|l| l.contains(&format!(" on {} {alias} ", *TABLE)))
                    .collect();
                assert!(
                    !scans.is_empty(),
                    "no scan of `{alias}` in the plan:\n{plan}"
                );
                for scan in scans {
                    assert!(
                        scan.contains(&format!("using {}_due_idx on", *TABLE)),
                        "`{alias}` (windowed: {windowed}) is not read through the due \
                         index: {scan}\n{plan}"
                    );
                }
            }
        }
        // A backlog of almost every row: the generic plan estimates the claimed rows as
        // a share of the table, which made the join plan hash them against a
        // sequential scan of the whole table (140-470 ms on 200,000 rows).
        sqlx::query(&format!(
            "UPDATE {} SET status = 0, published_at = NULL WHERE status = 1",
            *TABLE
        ))
        .execute(&mut *conn)
        .await
        .expect("backlog");
        sqlx::query(&format!("ANALYZE {}", *TABLE))
            .execute(&mut *conn)
            .await
            .expect("analyze");
        // EXPLAIN EXECUTE of a PREPAREd claim: an EXPLAIN with bound parameters plans
        // for their values, never the generic plan.
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .expect("plan_cache_mode");
        for windowed in [false, true] {
            let (types, args) = if windowed {
                (
                    "text, bigint, bigint, float8, bigint",
                    "'orders', 500, 7, 30, 500",
                )
            } else {
                ("text, bigint, bigint, float8", "'orders', 500, 7, 30")
            };
            sqlx::query(&format!(
                "PREPARE generic_claim({types}) AS {}",
                claim_sql(&TABLE, windowed)
            ))
            .execute(&mut *conn)
            .await
            .expect("prepare");
            let plan =
                sqlx::query_scalar::<_, String>(&format!("EXPLAIN EXECUTE generic_claim({args})"))
                    .fetch_all(&mut *conn)
                    .await
                    .expect("explain")
                    .join("\n");
            sqlx::query("DEALLOCATE generic_claim")
                .execute(&mut *conn)
                .await
                .expect("deallocate");
            assert!(
                !plan.contains(&format!("Seq Scan on {}", *TABLE)),
                "a claim (generic plan, windowed: {windowed}) scans the whole table:\n{plan}"
            );
        }
        sqlx::query(&format!(
            "UPDATE {} SET status = 1, published_at = now() WHERE id <= $1",
            *TABLE
        ))
        .bind(PUBLISHED)
        .execute(&mut *conn)
        .await
        .expect("published again");
        drop(conn);
        // The statement EXPLAINed is the one the relay runs: it claims the first heads.
        let rows = claim(pool, &SVC, 500, LONG, token()).await;
        assert_eq!(rows.len(), 100, "one head per key");
        assert!(
            rows.iter().all(|r| r.id > PUBLISHED),
            "only pending rows are claimed"
        );
        db.cleanup().await;
    }
}
