//! The operator's changes, each audited in its own transaction: replay (one event, or
//! every dead letter matching a filter, rate-limited, with a dry run), discard, park and
//! unpark.

use std::time::Duration;

use uuid::Uuid;

use super::{Admin, Page};
use crate::backend::{Backend, DeadFilter, NewAudit, Status, MAX_KEY_LEN};
use crate::error::{Error, Result};
use crate::event::EventId;
use crate::wakeup;

/// How [`Admin::replay_matching`] goes about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ReplayOptions {
    /// Only count and sample what would be replayed; change nothing, write no audit
    /// row.
    pub dry_run: bool,
    /// At most this many events per second (so a large replay does not flood the
    /// handlers that failed on them); `None`: as fast as the database goes.
    pub rate_per_sec: Option<u32>,
    /// At most this many events in all (oldest first).
    pub limit: Option<u64>,
    /// Events per transaction (default 100; at most the rate).
    pub batch: u32,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            dry_run: false,
            rate_per_sec: None,
            limit: None,
            batch: 100,
        }
    }
}

impl ReplayOptions {
    /// A dry run: how many, and which.
    pub fn dry_run() -> Self {
        ReplayOptions {
            dry_run: true,
            ..ReplayOptions::default()
        }
    }

    /// At most `per_sec` events per second.
    pub fn rate(mut self, per_sec: u32) -> Self {
        self.rate_per_sec = Some(per_sec);
        self
    }

    /// At most `n` events in all.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }
}

/// What [`Admin::replay_matching`] did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    /// Whether it was a dry run.
    pub dry_run: bool,
    /// Dead letters matching the filter when it began (capped by the limit).
    pub matched: u64,
    /// Events replayed (0 in a dry run). Fewer than `matched` if some stopped being dead
    /// meanwhile (another operator replayed them).
    pub replayed: u64,
    /// The first matching event ids, oldest first (at most 20).
    pub sample: Vec<Uuid>,
}

/// Progress of a replay, after each transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReplayProgress {
    /// Replayed so far.
    pub done: u64,
    /// Matched when it began.
    pub total: u64,
}

/// How many event ids a report samples.
const SAMPLE: u32 = 20;

/// One audited change.
enum Change<'a> {
    Replay(EventId),
    Discard(EventId),
    Park(&'a str),
    Unpark(&'a str),
}

impl Change<'_> {
    fn action(&self) -> &'static str {
        match self {
            Change::Replay(_) => "replay",
            Change::Discard(_) => "discard",
            Change::Park(_) => "park",
            Change::Unpark(_) => "unpark",
        }
    }

    fn target(&self) -> String {
        match self {
            Change::Replay(id) | Change::Discard(id) => id.to_string(),
            Change::Park(key) | Change::Unpark(key) => (*key).to_owned(),
        }
    }

    /// Whether a relay has new work once it commits.
    fn wakes(&self) -> bool {
        matches!(self, Change::Replay(_) | Change::Unpark(_))
    }
}

impl<DB: Backend> Admin<DB> {
    /// Replays one dead event: pending again, due now, with a fresh retry budget.
    /// `false` if `service` has no such dead event (already replayed, discarded, never
    /// dead).
    pub async fn replay(&self, service: &str, event_id: EventId) -> Result<bool> {
        Ok(self.change(service, Change::Replay(event_id)).await? == 1)
    }

    /// Sets a dead event aside for good ([`Status::Discarded`]): the row is kept, with
    /// its payload and reason, and no filtered replay takes it. `false` if `service`
    /// has no such dead event.
    pub async fn discard(&self, service: &str, event_id: EventId) -> Result<bool> {
        Ok(self.change(service, Change::Discard(event_id)).await? == 1)
    }

    /// Holds `key`: its pending events are not published until [`unpark`](Self::unpark),
    /// and the key's later events wait behind them, in order. Events a relay is
    /// publishing at this instant go through. Returns how many events were parked; 0 if
    /// the key has nothing pending (nothing is held then: parking holds events, not a
    /// name).
    pub async fn park(&self, service: &str, key: &str) -> Result<u64> {
        check_key(key)?;
        self.change(service, Change::Park(key)).await
    }

    /// Releases a parked key: its events are due now and drain in order. Returns how
    /// many were parked.
    pub async fn unpark(&self, service: &str, key: &str) -> Result<u64> {
        check_key(key)?;
        self.change(service, Change::Unpark(key)).await
    }

    /// Applies `change` and its audit row in one transaction.
    async fn change(&self, service: &str, change: Change<'_>) -> Result<u64> {
        let r = self.route(service)?;
        let (table, name) = (r.table(), r.service());
        let (action, target) = (change.action(), change.target());
        let context = || format!("{action} of {target} in service {service} ({table})");
        let dead_row = match &change {
            Change::Replay(id) => DB::fetch(&self.pool, table, id.0)
                .await
                .map_err(|e| Error::db(context(), e))?
                .filter(|row| row.service == service && row.status == Status::Dead)
                .map(|row| row.id),
            _ => None,
        };
        let mut tx = DB::begin(&self.pool)
            .await
            .map_err(|e| Error::db(context(), e))?;
        let changed = match &change {
            Change::Replay(_) => match dead_row {
                Some(id) => DB::revive_ids(&mut tx, table, name, &[id]).await,
                None => Ok(0),
            },
            Change::Discard(id) => DB::discard(&mut tx, table, name, id.0).await.map(u64::from),
            Change::Park(key) => DB::park(&mut tx, table, name, key).await,
            Change::Unpark(key) => DB::unpark(&mut tx, table, name, key).await,
        }
        .map_err(|e| Error::db(context(), e))?;
        let entry = NewAudit {
            actor: &self.actor,
            action,
            service: name,
            target: &target,
            affected: changed,
        };
        DB::audit_insert(&mut tx, table, Uuid::now_v7(), &entry)
            .await
            .map_err(|e| Error::db(context(), e))?;
        tx.commit().await.map_err(|e| Error::db(context(), e))?;
        tracing::info!(service, action, target, changed, actor = %self.actor, "operator action");
        if changed > 0 && change.wakes() {
            wakeup::wake_everywhere(&self.pool, table, name).await;
        }
        Ok(changed)
    }

    /// Replays the dead letters of `service` that match `filter`, oldest first, in
    /// transactions of `options.batch` events at most `options.rate_per_sec` a second,
    /// calling `progress` after each. One audit row records the action (the filter as
    /// JSON); each transaction adds its count to it, so an interrupted replay's row says
    /// how far it got. A dry run counts and samples, and changes nothing.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops between or inside a transaction: what committed is
    /// replayed and counted in the audit row, the rest is still dead.
    pub async fn replay_matching(
        &self,
        service: &str,
        filter: &DeadFilter,
        options: &ReplayOptions,
        mut progress: impl FnMut(ReplayProgress) + Send,
    ) -> Result<ReplayReport> {
        let r = self.route(service)?;
        let (table, name) = (r.table(), r.service());
        if options.batch == 0 || options.rate_per_sec == Some(0) {
            return Err(Error::InvalidRequest(
                "a replay needs a batch and a rate of at least 1".into(),
            ));
        }
        let mut matched = self.count_dead(service, filter).await?;
        if let Some(limit) = options.limit {
            matched = matched.min(limit);
        }
        let sample_size = SAMPLE.min(u32::try_from(matched).unwrap_or(SAMPLE)).max(1);
        let sample = self
            .dead_letters(service, filter, Page::first(sample_size))
            .await?
            .rows
            .into_iter()
            .take(matched as usize)
            .map(|row| row.event_id)
            .collect();
        let mut report = ReplayReport {
            dry_run: options.dry_run,
            matched,
            replayed: 0,
            sample,
        };
        if options.dry_run {
            return Ok(report);
        }
        let target = serde_json::to_string(filter).unwrap_or_else(|_| format!("{filter:?}"));
        let context = || format!("replaying dead letters of {service} in {table} ({target})");
        let reference = Uuid::now_v7();
        let mut tx = DB::begin(&self.pool)
            .await
            .map_err(|e| Error::db(context(), e))?;
        let entry = NewAudit {
            actor: &self.actor,
            action: "replay_matching",
            service: name,
            target: &target,
            affected: 0,
        };
        DB::audit_insert(&mut tx, table, reference, &entry)
            .await
            .map_err(|e| Error::db(context(), e))?;
        tx.commit().await.map_err(|e| Error::db(context(), e))?;

        let batch = options
            .batch
            .min(options.rate_per_sec.unwrap_or(u32::MAX))
            .min(Page::MAX);
        let started = tokio::time::Instant::now();
        let mut after = 0i64;
        while report.replayed < matched {
            let want = u64::from(batch).min(matched - report.replayed) as u32;
            let rows = DB::dead_page(&self.pool, table, name, filter, after, want)
                .await
                .map_err(|e| Error::db(context(), e))?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
            let mut tx = DB::begin(&self.pool)
                .await
                .map_err(|e| Error::db(context(), e))?;
            let n = DB::revive_ids(&mut tx, table, name, &ids)
                .await
                .map_err(|e| Error::db(context(), e))?;
            DB::audit_add(&mut tx, table, reference, n)
                .await
                .map_err(|e| Error::db(context(), e))?;
            tx.commit().await.map_err(|e| Error::db(context(), e))?;
            report.replayed += n;
            wakeup::wake_everywhere(&self.pool, table, name).await;
            progress(ReplayProgress {
                done: report.replayed,
                total: matched,
            });
            if let Some(rate) = options.rate_per_sec {
                // Paced from the start, so the average holds whatever each batch took.
                let due =
                    started + Duration::from_secs_f64(report.replayed as f64 / f64::from(rate));
                tokio::time::sleep_until(due).await;
            }
        }
        tracing::info!(service, replayed = report.replayed, matched, actor = %self.actor, filter = %target, "operator action: dead letters replayed");
        Ok(report)
    }
}

/// An event key an operator typed: not empty, not longer than any stored key.
fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidRequest(format!(
            "an event key has 1 to {MAX_KEY_LEN} bytes, not {}",
            key.len()
        )));
    }
    Ok(())
}
