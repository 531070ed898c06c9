//! Every statement of the store, written once as a template and rendered per database
//! ([`SqlDialect`]) and per table, once: [`statements`] caches the rendering, so no
//! store call formats SQL (MySQL only appends the `?` list of a variable-length `IN`).
//!
//! Tokens of the templates:
//!
//! | token | meaning |
//! |---|---|
//! | `{t}` | the table |
//! | `{p}` | the next bind parameter (`$n` on PostgreSQL, `?` elsewhere) |
//! | `{p_delay}`, `{p_uuid}`, `{p_text}` | a parameter that may be NULL (PostgreSQL needs its type) |
//! | `{now}` | the database clock |
//! | `{now_plus}`, `{now_minus}` | the clock moved by a delay parameter |
//! | `{in_ids}` | `IN` a list of row ids, bound as the dialect binds them |
//! | `{in_list}` | `IN` a list of event ids or keys |
//! | `{unlease}` | clears the lease (fences a relay still holding it) and stamps `updated_at` |
//! | `{lease}` | takes the lease: token and expiry parameters |
//! | `{pending}` … `{discarded}`, `{open}`, `{done}` | status values, from [`Status`] |
//! | `{dead_filter}` | the operator's [`super::DeadFilter`] on dead rows of a service |
//! | `{row}`, `{row_state}`, `{claimed}` | the columns the row decoders read (`{row_state}`: of alias `o`) |
//! | `{claimable}` | heads of key among due, unleased rows of a service (alias `o`) |
//! | `{head_of_key}` | `o` is its key's oldest pending row, as the dialect tests it ([`HeadOfKey`]) |
//! | `{for_update}`, `{skip_locked}` | row locks, where the database has them |
//!
//! Status values are literals in the rendered text (not parameters): PostgreSQL's
//! partial indexes (`WHERE status = 0`) match only literal predicates.

use std::borrow::Cow;
use std::sync::{Arc, RwLock};

use super::Status;
use crate::route::TableName;

/// How one database spells what the templates leave open.
#[derive(Debug)]
pub(crate) struct SqlDialect {
    /// The backend's name (the cache key, with the table).
    pub name: &'static str,
    /// `$1, $2, …` (PostgreSQL) rather than `?`.
    pub numbered: bool,
    /// The clock expression.
    pub now: &'static str,
    /// A delay around one `{p}`, added to or taken from `{now}`.
    pub interval: &'static str,
    /// A delay parameter that may be NULL, as in `{p_delay} IS NULL`.
    pub nullable_delay: &'static str,
    /// A uuid parameter that may be NULL.
    pub nullable_uuid: &'static str,
    /// A text parameter that may be NULL.
    pub nullable_text: &'static str,
    /// `IN` a list of row ids; `{list}` is a `?` per element, appended per call.
    pub in_ids: &'static str,
    /// `IN` a list of other values.
    pub in_list: &'static str,
    /// Locks a row that is read in the consumer's transaction.
    pub for_update: &'static str,
    /// Locks the rows that no other transaction holds, without waiting.
    pub skip_locked: &'static str,
    /// The claim's head-of-key test of row `o` (see `{head_of_key}`).
    pub head_of_key: HeadOfKey,
    /// How an UPDATE or DELETE is bounded to the first rows.
    pub bounded: Bounded,
    /// An INSERT that skips rows whose event id exists: how it begins and ends
    /// (MySQL: `INSERT IGNORE`, since `ON DUPLICATE KEY UPDATE` reports a skipped row
    /// as affected when the client asks for found rows, as sqlx does).
    pub skip_duplicate: (&'static str, &'static str),
    /// Raises the watermark of (service, key) in `{t}_seen` to an event id, if higher.
    pub raise_watermark: &'static str,
    /// The dialect's own statements (its claim), rendered into [`Statements::own`].
    pub own: &'static [&'static str],
}

/// How a bounded UPDATE or DELETE is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Each form is used by some backends only.
#[cfg_attr(
    not(all(feature = "mysql", any(feature = "postgres", feature = "sqlite"))),
    allow(dead_code)
)]
pub(crate) enum Bounded {
    /// `WHERE id IN (SELECT id … LIMIT n) AND recheck`: the status is checked again on
    /// the row changed (PostgreSQL re-evaluates only the outer condition after waiting
    /// for a row lock).
    Subquery,
    /// `WHERE … ORDER BY id LIMIT n` (MySQL: no LIMIT'd subquery on the same table).
    OrderLimit,
}

/// An UPDATE or DELETE changing only the first `LIMIT` rows that match.
struct BoundedOp {
    /// `UPDATE {t} SET …` or `DELETE FROM {t}`.
    head: &'static str,
    /// Which rows.
    filter: &'static str,
    /// Whether the subquery form orders by id (the in-place form always does).
    ordered: bool,
    /// The status condition checked again on each row changed.
    recheck: &'static str,
}

const ROW: &str = "id, event_id, service, event_type, event_version, event_key, payload, \
    status, attempts, max_retries, next_attempt_at, last_error, created_at, updated_at, \
    published_at, consumed_at, dead_at, waiting_since, trace_context, dead_reason, parked_at";
// The consumer's lock reads the row and, in the same statement, its key's nearest older
// open row (`open_before`), so the predecessor check costs no statement of its own.
const ROW_STATE: &str = "o.id, o.status, o.attempts, o.max_retries, o.event_key, o.event_type, \
    o.event_version, o.payload, CASE WHEN o.next_attempt_at <= {now} THEN 1 ELSE 0 END AS due, \
    CASE WHEN o.waiting_since IS NULL THEN 0 ELSE 1 END AS waiting, o.created_at, \
    o.published_at, (SELECT MAX(b.id) FROM {t} b WHERE b.service = o.service \
    AND b.event_key = o.event_key AND b.id < o.id AND b.status {open}) AS open_before";
const CLAIMED: &str = "id, event_id, event_type, event_version, event_key, payload, attempts, \
    created_at, trace_context";
const CLAIMABLE: &str = "o.service = {p} AND o.status = {pending} \
    AND o.next_attempt_at <= {now} AND (o.locked_until IS NULL OR o.locked_until <= {now}) \
    AND (o.event_key IS NULL OR {head_of_key})";

/// How the claim tells that pending row `o` is the oldest pending row of its key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HeadOfKey {
    /// No pending row of the key with a lower id: a range on the key index's `id`
    /// (PostgreSQL and SQLite stop at the first entry).
    NoneBefore,
    /// `o.id` is the key's first pending id, read from the key index in id order with
    /// `LIMIT 1`. MariaDB runs the `NOT EXISTS` form as a lookup of every pending row of
    /// the key, then filters `p.id < o.id`: a claim of 500 heads over 1,000 keys 200
    /// rows deep took 20 ms against 5.5 ms in this form (same rows claimed).
    FirstId,
}

impl HeadOfKey {
    fn sql(self) -> &'static str {
        match self {
            HeadOfKey::NoneBefore => {
                "NOT EXISTS (SELECT 1 FROM {t} p WHERE p.service = o.service \
                AND p.event_key = o.event_key AND p.status = {pending} AND p.id < o.id)"
            }
            HeadOfKey::FirstId => {
                "o.id = (SELECT p.id FROM {t} p WHERE p.service = o.service \
                AND p.event_key = o.event_key AND p.status = {pending} ORDER BY p.id LIMIT 1)"
            }
        }
    }
}

/// Dead rows of a service that match an operator's filter. Parameters: service, then
/// each filter field twice (NULL test, value): event type, reason, error pattern, key,
/// older than, newer than. The pattern is lower case with `!` as its escape character.
const DEAD_FILTER: &str = "service = {p} AND status = {dead} \
    AND ({p_text} IS NULL OR event_type = {p}) \
    AND ({p_text} IS NULL OR dead_reason = {p}) \
    AND ({p_text} IS NULL OR LOWER(last_error) LIKE {p} ESCAPE '!') \
    AND ({p_text} IS NULL OR event_key = {p}) \
    AND ({p_delay} IS NULL OR dead_at <= {now_minus}) \
    AND ({p_delay} IS NULL OR dead_at >= {now_minus})";

/// A rendered statement. Only a MySQL list leaves a tail: the `?` list goes between.
#[derive(Debug)]
pub(crate) struct Sql {
    head: String,
    tail: Option<String>,
}

impl Sql {
    /// The text, for a list of `n` elements if the statement has one.
    pub(crate) fn get(&self, n: usize) -> Cow<'_, str> {
        match &self.tail {
            None => Cow::Borrowed(&self.head),
            Some(tail) => {
                let mut s = String::with_capacity(self.head.len() + tail.len() + n * 3);
                s.push_str(&self.head);
                push_marks(&mut s, n);
                s.push_str(tail);
                Cow::Owned(s)
            }
        }
    }

    /// The text of a statement without a list.
    pub(crate) fn text(&self) -> &str {
        &self.head
    }
}

/// Appends `?, ?, ?` with `n` marks.
fn push_marks(s: &mut String, n: usize) {
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
}

/// Every statement of the store for one dialect and table. Field docs name the bind
/// parameters in order.
#[derive(Debug)]
pub(crate) struct Statements {
    /// event id, service, type, version, key, payload, max retries.
    pub insert: Sql,
    /// [`insert`](Self::insert)'s, then the trace context. Only an event with a trace
    /// context names the column, so a publisher without one (no `otel` feature, no
    /// span) still writes into a table `migrate` has not upgraded yet.
    pub insert_traced: Sql,
    /// ids, token.
    pub mark_published: Sql,
    /// delay, error, ids, token.
    pub release: Sql,
    /// reason, id, token.
    pub mark_dead_leased: Sql,
    /// event id, service.
    pub lock_by_event: Sql,
    /// event ids, service.
    pub lock_by_events: Sql,
    /// event id, service (the plain read before a lock by id).
    pub find_by_event: Sql,
    /// service, event ids; returns id, event_id.
    pub find_by_events: Sql,
    /// id, service.
    pub lock_by_id: Sql,
    /// ids.
    pub lock_by_ids: Sql,
    /// ids.
    pub mark_consumed: Sql,
    /// service, key, id.
    pub republish_predecessors: Sql,
    /// delay, id.
    pub defer: Sql,
    /// delay, reason, id, grace.
    pub wait: Sql,
    /// service.
    pub waiting: Sql,
    /// service.
    pub backlog: Sql,
    /// delay, error, id, attempts.
    pub retry_later: Sql,
    /// reason, id, attempts.
    pub mark_dead: Sql,
    /// service, consumed age, dead age (nullable), dead age, limit.
    pub purge: Sql,
    /// service, older than, newer than (nullable), newer than, limit.
    pub redeliver_stale: Sql,
    /// service, limit.
    pub fetch_dead: Sql,
    /// service, event id (nullable), event id, limit.
    pub revive: Sql,
    /// event id.
    pub fetch: Sql,
    /// service.
    pub fetch_all: Sql,
    /// service.
    pub counts: Sql,
    /// [`DEAD_FILTER`]'s, after id, limit.
    pub dead_page: Sql,
    /// [`DEAD_FILTER`]'s.
    pub dead_count: Sql,
    /// ids, service.
    pub revive_ids: Sql,
    /// service, event id.
    pub discard: Sql,
    /// delay (the hold), service, key.
    pub park: Sql,
    /// service, key.
    pub unpark: Sql,
    /// service.
    pub parked: Sql,
    /// service.
    pub key_counts: Sql,
    /// reference, actor, action, service, target, affected.
    pub audit_insert: Sql,
    /// affected, reference.
    pub audit_add: Sql,
    /// service (nullable), service, limit.
    pub audit_list: Sql,
    /// [`SqlDialect::own`], in its order.
    pub own: Vec<Sql>,
}

/// Every statement that moves a row out of pending clears its lease with this, and only
/// the claim sets one (on pending rows): a row whose `lease_token` is a relay's token is
/// pending. The relay's fenced statements test the token alone. With
/// `status = {pending}` beside it, PostgreSQL planned them on the due index (partial on
/// that status) instead of the primary key while the table was young (never
/// analyzed); such a plan scans every pending row per id of the list, and a mark took
/// 40-350 ms at 5,000 events/s instead of a few (auto_explain, section c of
/// BENCHMARKS.md).
const UNLEASE: &str = "locked_until = NULL, lease_token = 0, updated_at = {now}";

const PURGE: BoundedOp = BoundedOp {
    head: "DELETE FROM {t}",
    filter: "service = {p} AND ((status = {consumed} AND consumed_at < {now_minus}) \
        OR ({p_delay} IS NOT NULL AND status IN ({dead}, {discarded}) \
            AND dead_at < {now_minus}))",
    ordered: false,
    recheck: "status {done}",
};
const REDELIVER_STALE: BoundedOp = BoundedOp {
    head: "UPDATE {t} SET status = {pending}, next_attempt_at = {now}, {unlease}",
    filter: "service = {p} AND status = {published} AND published_at < {now_minus} \
        AND ({p_delay} IS NULL OR published_at >= {now_minus})",
    ordered: true,
    recheck: "status = {published}",
};
const REVIVE_SET: &str = "UPDATE {t} SET status = {pending}, attempts = 0, \
    next_attempt_at = {now}, dead_at = NULL, dead_reason = NULL, waiting_since = NULL, {unlease}";
const REVIVE: BoundedOp = BoundedOp {
    head: REVIVE_SET,
    filter: "service = {p} AND status = {dead} AND ({p_uuid} IS NULL OR event_id = {p})",
    ordered: true,
    recheck: "status = {dead}",
};

impl Statements {
    /// Renders every statement for `d` and `table`.
    fn render(d: &SqlDialect, table: &TableName) -> Statements {
        let r = |tpl: &str| render(d, table, tpl);
        let b = |op: &BoundedOp| r(&bounded(d, op));
        Statements {
            insert: r(
                "INSERT INTO {t} (event_id, service, event_type, event_version, \
                event_key, payload, max_retries, next_attempt_at, created_at, updated_at) \
                VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {now}, {now}, {now})",
            ),
            insert_traced: r(
                "INSERT INTO {t} (event_id, service, event_type, event_version, \
                event_key, payload, max_retries, trace_context, next_attempt_at, created_at, \
                updated_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {now}, {now}, {now})",
            ),
            mark_published: r(
                "UPDATE {t} SET status = {published}, published_at = {now}, \
                {unlease} WHERE id {in_ids} AND lease_token = {p}",
            ),
            release: r(
                "UPDATE {t} SET next_attempt_at = {now_plus}, last_error = {p}, \
                {unlease} WHERE id {in_ids} AND lease_token = {p}",
            ),
            mark_dead_leased: r("UPDATE {t} SET status = {dead}, attempts = attempts + 1, \
                last_error = {p}, dead_reason = {p}, dead_at = {now}, {unlease} \
                WHERE id = {p} AND lease_token = {p}"),
            lock_by_event: r("SELECT {row_state} FROM {t} o \
                WHERE o.event_id = {p} AND o.service = {p}{for_update}"),
            lock_by_events: r("SELECT o.event_id, {row_state} FROM {t} o \
                WHERE o.event_id {in_list} AND o.service = {p}{skip_locked}"),
            find_by_event: r("SELECT id FROM {t} WHERE event_id = {p} AND service = {p}"),
            find_by_events: r(
                "SELECT id, event_id FROM {t} WHERE service = {p} AND event_id {in_list}",
            ),
            lock_by_id: r("SELECT {row_state} FROM {t} o \
                WHERE o.id = {p} AND o.service = {p}{for_update}"),
            lock_by_ids: r(
                "SELECT o.event_id, {row_state} FROM {t} o WHERE o.id {in_ids}{skip_locked}",
            ),
            mark_consumed: r("UPDATE {t} SET status = {consumed}, consumed_at = {now}, \
                {unlease} WHERE id {in_ids} AND status {open}"),
            republish_predecessors: r("UPDATE {t} SET status = {pending}, \
                next_attempt_at = {now}, {unlease} WHERE service = {p} AND event_key = {p} \
                AND id < {p} AND status = {published}"),
            defer: r(
                "UPDATE {t} SET status = {pending}, next_attempt_at = {now_plus}, \
                {unlease} WHERE id = {p} AND status {open}",
            ),
            // The grace test and the update are one statement: the database clock
            // decides, and `waiting_since` is set once, the first time.
            wait: r(
                "UPDATE {t} SET status = {pending}, next_attempt_at = {now_plus}, \
                last_error = {p}, waiting_since = COALESCE(waiting_since, {now}), {unlease} \
                WHERE id = {p} AND status {open} \
                AND (waiting_since IS NULL OR waiting_since > {now_minus})",
            ),
            waiting: r(
                "SELECT event_type, last_error, COUNT(*), MIN(waiting_since) FROM {t} \
                WHERE service = {p} AND status = {pending} AND waiting_since IS NOT NULL \
                GROUP BY event_type, last_error ORDER BY event_type, last_error",
            ),
            // COUNT, not SUM: SUM of integers is NUMERIC on PostgreSQL.
            backlog: r("SELECT status, COUNT(*), \
                COUNT(CASE WHEN status = {pending} AND next_attempt_at <= {now} THEN 1 END), \
                MIN(CASE WHEN status = {pending} AND next_attempt_at <= {now} \
                    THEN next_attempt_at END), \
                MIN(published_at), COUNT(waiting_since), {now} FROM {t} \
                WHERE service = {p} AND status IN ({pending}, {published}, {dead}) \
                GROUP BY status"),
            // A handler ran, so the event no longer waits for one.
            retry_later: r(
                "UPDATE {t} SET status = {pending}, attempts = attempts + 1, \
                next_attempt_at = {now_plus}, last_error = {p}, waiting_since = NULL, \
                {unlease} WHERE id = {p} AND attempts = {p} AND status {open}",
            ),
            mark_dead: r("UPDATE {t} SET status = {dead}, attempts = attempts + 1, \
                last_error = {p}, dead_reason = {p}, dead_at = {now}, {unlease} \
                WHERE id = {p} AND attempts = {p} AND status {open}"),
            purge: b(&PURGE),
            redeliver_stale: b(&REDELIVER_STALE),
            fetch_dead: r(
                "SELECT {row} FROM {t} WHERE service = {p} AND status = {dead} \
                ORDER BY id LIMIT {p}",
            ),
            revive: b(&REVIVE),
            fetch: r("SELECT {row} FROM {t} WHERE event_id = {p}"),
            fetch_all: r("SELECT {row} FROM {t} WHERE service = {p} ORDER BY id"),
            counts: r("SELECT status, COUNT(*) FROM {t} WHERE service = {p} GROUP BY status"),
            dead_page: r("SELECT {row} FROM {t} WHERE {dead_filter} AND id > {p} \
                ORDER BY id LIMIT {p}"),
            dead_count: r("SELECT COUNT(*) FROM {t} WHERE {dead_filter}"),
            revive_ids: r(&format!(
                "{REVIVE_SET} WHERE id {{in_ids}} AND service = {{p}} AND status = {{dead}}"
            )),
            discard: r("UPDATE {t} SET status = {discarded}, updated_at = {now} \
                WHERE service = {p} AND event_id = {p} AND status = {dead}"),
            // A parked row is not due for a century, so no claim ever looks at it, and
            // every later event of its key waits behind it (head of key): the claim and
            // the consumer need no change. Leased rows are left to their relay.
            park: r("UPDATE {t} SET parked_at = COALESCE(parked_at, {now}), \
                next_attempt_at = {now_plus}, updated_at = {now} \
                WHERE service = {p} AND event_key = {p} AND status = {pending} \
                AND (locked_until IS NULL OR locked_until <= {now})"),
            unpark: r("UPDATE {t} SET parked_at = NULL, next_attempt_at = {now}, \
                updated_at = {now} WHERE service = {p} AND event_key = {p} \
                AND status = {pending} AND parked_at IS NOT NULL"),
            parked: r("SELECT event_key, COUNT(*), MIN(parked_at) FROM {t} \
                WHERE service = {p} AND status = {pending} AND event_key IS NOT NULL \
                GROUP BY event_key HAVING COUNT(parked_at) > 0 ORDER BY event_key"),
            key_counts: r("SELECT \
                COUNT(DISTINCT CASE WHEN parked_at IS NULL \
                    AND (attempts > 0 OR waiting_since IS NOT NULL) THEN event_key END), \
                COUNT(DISTINCT CASE WHEN parked_at IS NOT NULL THEN event_key END) \
                FROM {t} WHERE service = {p} AND status = {pending} \
                AND event_key IS NOT NULL"),
            audit_insert: r("INSERT INTO {t}_audit \
                (ref, at, actor, action, service, target, affected) \
                VALUES ({p}, {now}, {p}, {p}, {p}, {p}, {p})"),
            audit_add: r("UPDATE {t}_audit SET affected = affected + {p} WHERE ref = {p}"),
            audit_list: r("SELECT id, at, actor, action, service, target, affected \
                FROM {t}_audit WHERE ({p_text} IS NULL OR service = {p}) \
                ORDER BY id DESC LIMIT {p}"),
            own: d.own.iter().map(|tpl| r(tpl)).collect(),
        }
    }
}

/// Rows per multi-row INSERT ([`insert_many`]): 9 binds each, far below every
/// database's bind limit (SQLite's 32,766 the lowest).
pub(crate) const INSERT_ROWS: usize = 500;

/// A multi-row INSERT of `rows` rows for `d` and `table`, with the trace context column
/// if `traced` (binds per row: event id, service, type, version, key, payload, max
/// retries[, trace context]). Rendered per call: bulk inserts are rare and large.
pub(crate) fn insert_many(d: &SqlDialect, table: &TableName, rows: usize, traced: bool) -> String {
    let (columns, binds) = if traced {
        (
            "event_id, service, event_type, event_version, event_key, payload, max_retries, \
          trace_context, next_attempt_at, created_at, updated_at",
            8,
        )
    } else {
        (
            "event_id, service, event_type, event_version, event_key, payload, max_retries, \
          next_attempt_at, created_at, updated_at",
            7,
        )
    };
    let tuple = format!("({}{{now}}, {{now}}, {{now}})", "{p}, ".repeat(binds));
    let tuples = vec![tuple; rows.max(1)].join(", ");
    render(
        d,
        table,
        &format!("INSERT INTO {{t}} ({columns}) VALUES {tuples}"),
    )
    .head
}

/// An inbox INSERT of `rows` rows (see [`super::Backend::insert_inbox`]): the
/// publish-time columns, the status, and for a dead row its reason, class and time; a
/// row whose event id exists is skipped.
pub(crate) fn insert_inbox(d: &SqlDialect, table: &TableName, rows: usize) -> String {
    let columns = "event_id, service, event_type, event_version, event_key, payload, \
        max_retries, trace_context, status, last_error, dead_reason, dead_at, \
        next_attempt_at, created_at, updated_at";
    let tuple = format!(
        "({}CASE WHEN {{p}} THEN {{now}} ELSE NULL END, {{now}}, {{now}}, {{now}})",
        "{p}, ".repeat(11)
    );
    let tuples = vec![tuple; rows.max(1)].join(", ");
    render(
        d,
        table,
        &format!(
            "{} {{t}} ({columns}) VALUES {tuples}{}",
            d.skip_duplicate.0, d.skip_duplicate.1
        ),
    )
    .head
}

/// `{p}, {p}, …` with `n` marks.
fn marks(n: usize) -> String {
    vec!["{p}"; n.max(1)].join(", ")
}

/// The watermarks of `n` keys of a service (settled ones only: the first bind is the
/// settling time).
pub(crate) fn watermarks(d: &SqlDialect, table: &TableName, n: usize, settled: bool) -> String {
    let settled = if settled {
        "raised_at < {now_minus} AND "
    } else {
        ""
    };
    render(
        d,
        table,
        &format!(
            "SELECT event_key, last_event_id FROM {{t}}_seen WHERE {settled}service = {{p}} \
             AND event_key IN ({})",
            marks(n)
        ),
    )
    .head
}

/// The rows of a service retention may delete (as [`PURGE`] filters them), oldest
/// first, up to a limit.
pub(crate) fn purge_candidates(d: &SqlDialect, table: &TableName) -> String {
    render(
        d,
        table,
        &format!(
            "SELECT id, event_key, event_id FROM {{t}} WHERE {} ORDER BY id LIMIT {{p}}",
            PURGE.filter
        ),
    )
    .head
}

/// Deletes `n` rows by id, if they are still settled.
pub(crate) fn delete_settled(d: &SqlDialect, table: &TableName, n: usize) -> String {
    render(
        d,
        table,
        &format!(
            "DELETE FROM {{t}} WHERE id IN ({}) AND status {{done}}",
            marks(n)
        ),
    )
    .head
}

/// Raises one watermark (the dialect's upsert).
pub(crate) fn raise_watermark(d: &SqlDialect, table: &TableName) -> String {
    render(d, table, d.raise_watermark).head
}

/// The template of a bounded operation in `d`'s form.
fn bounded(d: &SqlDialect, op: &BoundedOp) -> String {
    let BoundedOp {
        head,
        filter,
        ordered,
        recheck,
    } = op;
    match d.bounded {
        Bounded::Subquery => {
            let order = if *ordered { "ORDER BY id " } else { "" };
            format!(
                "{head} WHERE id IN (SELECT id FROM {{t}} WHERE {filter} {order}LIMIT {{p}}) \
                 AND {recheck}"
            )
        }
        Bounded::OrderLimit => format!("{head} WHERE {filter} ORDER BY id LIMIT {{p}}"),
    }
}

/// `tpl` rendered for `d` and `table`.
pub(crate) fn render(d: &SqlDialect, table: &TableName, tpl: &str) -> Sql {
    let mut r = Renderer {
        d,
        table,
        params: 0,
        out: String::with_capacity(tpl.len() * 2),
        tail: None,
    };
    r.expand(tpl);
    match r.tail {
        None => Sql {
            head: r.out,
            tail: None,
        },
        Some(at) => {
            let tail = r.out.split_off(at);
            Sql {
                head: r.out,
                tail: Some(tail),
            }
        }
    }
}

struct Renderer<'a> {
    d: &'a SqlDialect,
    table: &'a TableName,
    params: usize,
    out: String,
    /// Where an expanded list goes (MySQL).
    tail: Option<usize>,
}

impl Renderer<'_> {
    fn expand(&mut self, mut tpl: &str) {
        while let Some(open) = tpl.find('{') {
            self.out.push_str(&tpl[..open]);
            let rest = &tpl[open + 1..];
            let Some(close) = rest.find('}') else {
                self.out.push_str(&tpl[open..]);
                return;
            };
            self.token(&rest[..close]);
            tpl = &rest[close + 1..];
        }
        self.out.push_str(tpl);
    }

    fn status(&mut self, statuses: &[Status]) {
        let values: Vec<String> = statuses.iter().map(|s| s.as_i16().to_string()).collect();
        self.out.push_str(&values.join(", "));
    }

    fn token(&mut self, token: &str) {
        let d = self.d;
        match token {
            "t" => self.out.push_str(self.table.as_str()),
            "p" => {
                self.params += 1;
                if d.numbered {
                    self.out.push('$');
                    self.out.push_str(&self.params.to_string());
                } else {
                    self.out.push('?');
                }
            }
            "list" => self.tail = Some(self.out.len()),
            "p_delay" => self.expand(d.nullable_delay),
            "p_uuid" => self.expand(d.nullable_uuid),
            "p_text" => self.expand(d.nullable_text),
            "now" => self.out.push_str(d.now),
            "now_plus" | "now_minus" => {
                self.out.push_str(d.now);
                self.out
                    .push_str(if token == "now_plus" { " + " } else { " - " });
                self.expand(d.interval);
            }
            "in_ids" => self.expand(d.in_ids),
            "in_list" => self.expand(d.in_list),
            "unlease" => self.expand(UNLEASE),
            "lease" => {
                self.expand("lease_token = {p}, locked_until = {now_plus}, updated_at = {now}")
            }
            "pending" => self.status(&[Status::Pending]),
            "published" => self.status(&[Status::Published]),
            "consumed" => self.status(&[Status::Consumed]),
            "dead" => self.status(&[Status::Dead]),
            "discarded" => self.status(&[Status::Discarded]),
            "dead_filter" => self.expand(DEAD_FILTER),
            "open" => {
                self.out.push_str("IN (");
                self.status(&[Status::Pending, Status::Published]);
                self.out.push(')');
            }
            "done" => {
                self.out.push_str("IN (");
                self.status(&[Status::Consumed, Status::Dead, Status::Discarded]);
                self.out.push(')');
            }
            "row" => self.out.push_str(ROW),
            "row_state" => self.expand(ROW_STATE),
            "claimed" => self.out.push_str(CLAIMED),
            "claimable" => self.expand(CLAIMABLE),
            "head_of_key" => self.expand(d.head_of_key.sql()),
            "for_update" => self.out.push_str(d.for_update),
            "skip_locked" => self.out.push_str(d.skip_locked),
            // Templates are constants, checked by the tests below; an unknown token is
            // left in the text, where the database rejects it.
            other => {
                debug_assert!(false, "unknown SQL template token {{{other}}}");
                self.out.push('{');
                self.out.push_str(other);
                self.out.push('}');
            }
        }
    }
}

/// Rendered statements, per dialect and table.
type Cache = Vec<((&'static str, TableName), Arc<Statements>)>;
static CACHE: RwLock<Cache> = RwLock::new(Vec::new());

/// The statements of `d` for `table`, rendered on first use and kept for the life of
/// the process (an application has a handful of tables).
pub(crate) fn statements(d: &'static SqlDialect, table: &TableName) -> Arc<Statements> {
    let find = |cache: &Cache| {
        cache
            .iter()
            .find(|((name, t), _)| *name == d.name && t == table)
            .map(|(_, s)| Arc::clone(s))
    };
    // A poisoned lock only means a panic elsewhere mid-push; the list is still valid.
    if let Some(s) = find(&CACHE.read().unwrap_or_else(|e| e.into_inner())) {
        return s;
    }
    let rendered = Arc::new(Statements::render(d, table));
    let mut cache = CACHE.write().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = find(&cache) {
        return s;
    }
    cache.push(((d.name, table.clone()), Arc::clone(&rendered)));
    rendered
}

/// `sql` with its `?` placeholders numbered `$1, $2, …` (PostgreSQL); a `?` inside a
/// literal is numbered too, as documented on [`super::Backend::execute_portable`].
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dialects built in.
    fn dialects() -> Vec<&'static SqlDialect> {
        vec![
            #[cfg(feature = "postgres")]
            &crate::backend::postgres::SQL,
            #[cfg(feature = "mysql")]
            &crate::backend::mysql::SQL,
            #[cfg(feature = "sqlite")]
            &crate::backend::sqlite::SQL,
        ]
    }

    fn all(s: &Statements) -> Vec<String> {
        let mut v: Vec<String> = [
            &s.insert,
            &s.insert_traced,
            &s.mark_published,
            &s.release,
            &s.mark_dead_leased,
            &s.lock_by_event,
            &s.lock_by_events,
            &s.find_by_event,
            &s.find_by_events,
            &s.lock_by_id,
            &s.lock_by_ids,
            &s.mark_consumed,
            &s.republish_predecessors,
            &s.defer,
            &s.retry_later,
            &s.mark_dead,
            &s.purge,
            &s.redeliver_stale,
            &s.fetch_dead,
            &s.revive,
            &s.fetch,
            &s.fetch_all,
            &s.counts,
            &s.dead_page,
            &s.dead_count,
            &s.revive_ids,
            &s.discard,
            &s.park,
            &s.unpark,
            &s.parked,
            &s.key_counts,
            &s.audit_insert,
            &s.audit_add,
            &s.audit_list,
        ]
        .iter()
        .map(|s| s.get(2).into_owned())
        .collect();
        v.extend(s.own.iter().map(|s| s.get(2).into_owned()));
        v
    }

    #[test]
    fn every_token_is_rendered() {
        let table = TableName::new("orders_outbox").unwrap();
        for d in dialects() {
            for sql in all(&Statements::render(d, &table)) {
                assert!(
                    !sql.contains('{') && !sql.contains('}'),
                    "{}: {sql}",
                    d.name
                );
            }
        }
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn parameters_are_numbered_in_text_order() {
        let table = TableName::new("t").unwrap();
        let s = Statements::render(&crate::backend::postgres::SQL, &table);
        assert_eq!(
            s.release.text(),
            "UPDATE t SET next_attempt_at = now() + make_interval(secs => $1), last_error = $2, \
             locked_until = NULL, lease_token = 0, updated_at = now() \
             WHERE id = ANY($3) AND lease_token = $4"
        );
        assert_eq!(
            s.purge.text(),
            "DELETE FROM t WHERE id IN (SELECT id FROM t WHERE service = $1 AND ((status = 2 \
             AND consumed_at < now() - make_interval(secs => $2)) OR ($3::float8 IS NOT NULL \
             AND status IN (3, 4) AND dead_at < now() - make_interval(secs => $4))) LIMIT $5) \
             AND status IN (2, 3, 4)"
        );
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn lists_are_appended_and_bounds_in_place() {
        let table = TableName::new("t").unwrap();
        let s = Statements::render(&crate::backend::mysql::SQL, &table);
        assert_eq!(
            s.mark_consumed.get(3),
            "UPDATE t SET status = 2, consumed_at = UTC_TIMESTAMP(6), locked_until = NULL, \
             lease_token = 0, updated_at = UTC_TIMESTAMP(6) WHERE id IN (?, ?, ?) \
             AND status IN (0, 1)"
        );
        assert_eq!(
            s.revive.text(),
            "UPDATE t SET status = 0, attempts = 0, next_attempt_at = UTC_TIMESTAMP(6), \
             dead_at = NULL, dead_reason = NULL, waiting_since = NULL, locked_until = NULL, \
             lease_token = 0, updated_at = UTC_TIMESTAMP(6) WHERE service = ? AND status = 3 \
             AND (? IS NULL OR event_id = ?) ORDER BY id LIMIT ?"
        );
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn multi_row_inserts_number_every_row() {
        let table = TableName::new("t").unwrap();
        let sql = insert_many(&crate::backend::postgres::SQL, &table, 2, false);
        assert!(sql.ends_with(
            "VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now(), now()), \
             ($8, $9, $10, $11, $12, $13, $14, now(), now(), now())"
        ));
        let traced = insert_many(&crate::backend::postgres::SQL, &table, 1, true);
        assert!(traced.contains("trace_context") && traced.contains("$8, now()"));
    }

    #[test]
    fn rendered_once_per_dialect_and_table() {
        let table = TableName::new("cached_outbox").unwrap();
        for d in dialects() {
            assert!(Arc::ptr_eq(&statements(d, &table), &statements(d, &table)));
        }
    }

    #[test]
    fn portable_placeholders_are_numbered() {
        assert_eq!(numbered("a = ? AND b = ?"), "a = $1 AND b = $2");
    }
}
