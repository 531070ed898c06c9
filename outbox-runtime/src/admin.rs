//! Operator verbs: look at a service's outbox, see what waits for a newer consumer, list
//! its dead letters with their reasons, and replay them once the cause is fixed.
//!
//! ```ignore
//! let admin = Admin::new(pool.clone(), catalog.clone());
//! for row in admin.dead_letters("notification", 100).await? {
//!     println!("{} {}: {}", row.event_id, row.event_type, row.last_error.unwrap_or_default());
//! }
//! admin.replay("notification", event_id).await?;   // one
//! admin.replay_dead("notification", 1000).await?;   // the oldest 1000
//! ```
//!
//! A replayed event is pending again with a fresh retry budget and goes through the
//! relay and the consumer like a new one (same event id, so a consumer that already
//! applied it would still see it as a duplicate). Replaying a dead event whose key has
//! moved on delivers it after its successors: that is the operator's call.

use sqlx::Pool;
use uuid::Uuid;

use crate::backend::{Backend, OutboxRow, StatusCounts, WaitingCount};
use crate::catalog::{Catalog, Route};
use crate::error::{Error, Result};
use crate::event::EventId;
use crate::wakeup;

/// Operator access to the outboxes of a catalog.
pub struct Admin<DB: Backend> {
    pool: Pool<DB>,
    catalog: Catalog,
}

impl<DB: Backend> Admin<DB> {
    /// Admin over `catalog`'s services on `pool`.
    pub fn new(pool: Pool<DB>, catalog: Catalog) -> Self {
        Admin { pool, catalog }
    }

    fn route(&self, service: &str) -> Result<&Route> {
        self.catalog
            .route(service)
            .ok_or_else(|| Error::UnknownService(service.to_owned()))
    }

    /// Rows of `service` by status.
    pub async fn counts(&self, service: &str) -> Result<StatusCounts> {
        let r = self.route(service)?;
        DB::counts(&self.pool, r.table(), r.service())
            .await
            .map_err(|e| Error::db(format!("counting rows of {service} in {}", r.table()), e))
    }

    /// The events of `service` waiting for a consumer that can handle them (unknown
    /// type, no handler, newer version: see [`crate::OutboxConfig::waiting`]), counted
    /// by event type and reason, with the oldest one's start. During a rolling deploy
    /// these are the new release's events the old instances left for the new ones; rows
    /// that stay here after the deploy need a consumer that handles them, or go dead
    /// after the grace period.
    pub async fn waiting(&self, service: &str) -> Result<Vec<WaitingCount>> {
        let r = self.route(service)?;
        DB::waiting(&self.pool, r.table(), r.service())
            .await
            .map_err(|e| {
                Error::db(
                    format!("counting waiting events of {service} in {}", r.table()),
                    e,
                )
            })
    }

    /// The oldest `limit` dead events of `service`, with their reasons in `last_error`.
    pub async fn dead_letters(&self, service: &str, limit: u32) -> Result<Vec<OutboxRow>> {
        let r = self.route(service)?;
        DB::fetch_dead(&self.pool, r.table(), r.service(), limit)
            .await
            .map_err(|e| {
                Error::db(
                    format!("listing dead letters of {service} in {}", r.table()),
                    e,
                )
            })
    }

    /// Replays one dead event; `false` if it is not dead (or not this service's).
    pub async fn replay(&self, service: &str, event_id: EventId) -> Result<bool> {
        Ok(self.revive(service, Some(event_id.0), 1).await? == 1)
    }

    /// Replays the oldest `limit` dead events of `service`; returns how many.
    pub async fn replay_dead(&self, service: &str, limit: u32) -> Result<u64> {
        self.revive(service, None, limit).await
    }

    async fn revive(&self, service: &str, event_id: Option<Uuid>, limit: u32) -> Result<u64> {
        let r = self.route(service)?;
        let n = DB::revive(&self.pool, r.table(), r.service(), event_id, limit)
            .await
            .map_err(|e| {
                Error::db(
                    format!("replaying dead letters of {service} in {}", r.table()),
                    e,
                )
            })?;
        if n > 0 {
            tracing::info!(service, replayed = n, "dead letters replayed");
            wakeup::wake_local(r.table(), r.service());
        }
        Ok(n)
    }
}
