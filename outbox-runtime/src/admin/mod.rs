//! The operator API: what the `outbox` command line ([`crate::cli`]) and the web console
//! call, and what an application can call itself.
//!
//! ```ignore
//! let admin = Admin::new(pool.clone(), catalog.clone()).acting_as("alice");
//! for s in admin.overview().await? {
//!     println!("{}: {} due, oldest {:.0} s, {} dead", s.service, s.backlog.due, s.backlog.oldest_due, s.counts.dead);
//! }
//! let filter = DeadFilter { reason: Some(DeadReason::Exhausted), ..DeadFilter::default() };
//! let page = admin.dead_letters("notification", &filter, Page::first(50)).await?;
//! let dry = admin.replay_matching("notification", &filter, &ReplayOptions::dry_run(), |_| {}).await?;
//! println!("would replay {}", dry.matched);
//! admin.replay_matching("notification", &filter, &ReplayOptions::default().rate(200), |_| {}).await?;
//! admin.park("notification", "user-42").await?;   // hold a key; later `unpark`
//! ```
//!
//! Reads ([`overview`](Admin::overview), [`dead_letters`](Admin::dead_letters),
//! [`event`](Admin::event), [`parked`](Admin::parked), [`audit_log`](Admin::audit_log))
//! change nothing. Every change ([`replay`](Admin::replay),
//! [`replay_matching`](Admin::replay_matching), [`discard`](Admin::discard),
//! [`park`](Admin::park), [`unpark`](Admin::unpark)) writes an audit row to
//! `<table>_audit` in the transaction that makes it: who ([`Admin::acting_as`]), when
//! (database clock), what, on what, how many rows. All of it runs the store's own
//! statements ([`Backend`]), on PostgreSQL, MySQL/MariaDB and SQLite alike.
//!
//! A replayed event is pending again with a fresh retry budget and goes through the
//! relay and the consumer like a new one (same event id, so a consumer that already
//! applied it still sees it as a duplicate). Replaying a dead event whose key has moved
//! on delivers it after its successors: that is the operator's call.

mod actions;
pub mod units;

use std::sync::Arc;

use sqlx::Pool;

pub use actions::{ReplayOptions, ReplayProgress, ReplayReport};

use crate::backend::{
    AuditEntry, Backend, Backlog, DeadFilter, OutboxRow, ParkedKey, StatusCounts, WaitingCount,
};
use crate::catalog::{Catalog, Route};
use crate::error::{Error, Result};
use crate::event::EventId;

/// Operator access to the outboxes of a catalog, on one database.
///
/// Cheap to clone (a pool and a shared catalog).
pub struct Admin<DB: Backend> {
    pool: Pool<DB>,
    catalog: Arc<Catalog>,
    actor: Arc<str>,
}

impl<DB: Backend> Clone for Admin<DB> {
    fn clone(&self) -> Self {
        Admin {
            pool: self.pool.clone(),
            catalog: Arc::clone(&self.catalog),
            actor: Arc::clone(&self.actor),
        }
    }
}

/// One service at a glance ([`Admin::overview`]). Ages are seconds on the database
/// clock.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServiceOverview {
    /// The service.
    pub service: String,
    /// Its outbox table.
    pub table: String,
    /// Its topic.
    pub topic: String,
    /// Rows by status.
    pub counts: StatusCounts,
    /// What waits: due rows and the oldest's age, published rows not consumed yet and
    /// the oldest's age, rows waiting for a consumer that can handle them.
    pub backlog: Backlog,
    /// Keys held behind a head that failed and waits for its retry.
    pub failing_keys: u64,
    /// Keys an operator parked.
    pub parked_keys: u64,
}

/// Where a page of dead letters starts ([`Admin::dead_letters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Page {
    /// The cursor: the `next` of the previous page (a row id), `None` for the first.
    /// Stable under concurrent changes: rows are listed in id order, and a row that
    /// stops matching (replayed) or starts matching (dies) never shifts the others.
    pub after: Option<i64>,
    /// Rows per page, 1 to [`Page::MAX`].
    pub limit: u32,
}

impl Page {
    /// The largest page.
    pub const MAX: u32 = 1000;

    /// The first page of `limit` rows.
    pub fn first(limit: u32) -> Page {
        Page { after: None, limit }
    }
}

/// A page of dead letters ([`Admin::dead_letters`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadPage {
    /// The rows, in id order.
    pub rows: Vec<OutboxRow>,
    /// The cursor of the next page, if this one was full.
    pub next: Option<i64>,
}

/// One event, whole ([`Admin::event`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventDetail {
    /// The row as stored: envelope fields, payload, attempts, times, last error.
    pub row: OutboxRow,
    /// The topic its record goes to.
    pub topic: String,
    /// The table it is stored in.
    pub table: String,
}

impl<DB: Backend> Admin<DB> {
    /// Admin over `catalog`'s services on `pool`, acting as `"unknown"` until
    /// [`acting_as`](Self::acting_as) says who.
    pub fn new(pool: Pool<DB>, catalog: Catalog) -> Self {
        Admin {
            pool,
            catalog: Arc::new(catalog),
            actor: Arc::from("unknown"),
        }
    }

    /// Who the audit rows of this admin's changes name (an operator's login, `cli:$USER`,
    /// `console`).
    pub fn acting_as(mut self, actor: impl Into<String>) -> Self {
        self.actor = Arc::from(actor.into());
        self
    }

    /// Who the audit rows name.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The operator's view of `subscriber`'s inbox, on this admin's database (the
    /// subscriber's): the same calls, with each publisher it subscribes to in place of
    /// a service (`admin.inbox("notification")?.replay("task", id)` replays `task`'s
    /// event in `notification`'s inbox). Changes are audited in `<inbox>_audit`.
    pub fn inbox(&self, subscriber: &str) -> Result<Admin<DB>> {
        let specs: Vec<crate::catalog::RouteSpec> = self
            .catalog
            .subscriptions_of(subscriber)
            .map(|s| crate::catalog::RouteSpec {
                service: s.publisher.clone(),
                table: s.inbox.clone(),
                topic: Some(s.topic.clone()),
                group: Some(s.group.clone()),
            })
            .collect();
        if specs.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "service `{subscriber}` has no subscriptions in this catalog, so no inbox"
            )));
        }
        let catalog = Catalog::from_routes(specs).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Admin {
            pool: self.pool.clone(),
            catalog: Arc::new(catalog),
            actor: Arc::clone(&self.actor),
        })
    }

    pub(crate) fn route(&self, service: &str) -> Result<&Route> {
        self.catalog
            .route(service)
            .ok_or_else(|| Error::UnknownService(service.to_owned()))
    }

    /// Every service of the catalog at a glance, in the catalog's order.
    pub async fn overview(&self) -> Result<Vec<ServiceOverview>> {
        let mut all = Vec::new();
        for route in self.catalog.routes() {
            all.push(self.service_overview(route.service().as_str()).await?);
        }
        Ok(all)
    }

    /// One service at a glance.
    pub async fn service_overview(&self, service: &str) -> Result<ServiceOverview> {
        let r = self.route(service)?;
        let (table, name) = (r.table(), r.service());
        let context = |what: &str| format!("reading the {what} of {service} in {table}");
        let counts = DB::counts(&self.pool, table, name)
            .await
            .map_err(|e| Error::db(context("row counts"), e))?;
        let backlog = DB::backlog(&self.pool, table, name)
            .await
            .map_err(|e| Error::db(context("backlog"), e))?;
        let keys = DB::key_counts(&self.pool, table, name)
            .await
            .map_err(|e| Error::db(context("held keys"), e))?;
        Ok(ServiceOverview {
            service: service.to_owned(),
            table: table.to_string(),
            topic: r.topic().to_string(),
            counts,
            backlog,
            failing_keys: keys.failing,
            parked_keys: keys.parked,
        })
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

    /// A page of the dead letters of `service` that match `filter`, oldest first, with
    /// their reasons (`dead_reason`, `last_error`).
    pub async fn dead_letters(
        &self,
        service: &str,
        filter: &DeadFilter,
        page: Page,
    ) -> Result<DeadPage> {
        let r = self.route(service)?;
        if page.limit == 0 || page.limit > Page::MAX {
            return Err(Error::InvalidRequest(format!(
                "a page holds 1 to {} rows, not {}",
                Page::MAX,
                page.limit
            )));
        }
        let rows = DB::dead_page(
            &self.pool,
            r.table(),
            r.service(),
            filter,
            page.after.unwrap_or(0),
            page.limit,
        )
        .await
        .map_err(|e| {
            Error::db(
                format!("listing dead letters of {service} in {}", r.table()),
                e,
            )
        })?;
        let next = match rows.last() {
            Some(last) if rows.len() == page.limit as usize => Some(last.id),
            _ => None,
        };
        Ok(DeadPage { rows, next })
    }

    /// How many dead letters of `service` match `filter`.
    pub async fn count_dead(&self, service: &str, filter: &DeadFilter) -> Result<u64> {
        let r = self.route(service)?;
        DB::dead_count(&self.pool, r.table(), r.service(), filter)
            .await
            .map_err(|e| {
                Error::db(
                    format!("counting dead letters of {service} in {}", r.table()),
                    e,
                )
            })
    }

    /// One event of `service`, whole; `None` if `service` has no such event.
    pub async fn event(&self, service: &str, event_id: EventId) -> Result<Option<EventDetail>> {
        let r = self.route(service)?;
        let row = DB::fetch(&self.pool, r.table(), event_id.0)
            .await
            .map_err(|e| {
                Error::db(
                    format!("reading event {event_id} of {service} in {}", r.table()),
                    e,
                )
            })?;
        Ok(row
            .filter(|row| row.service == service)
            .map(|row| EventDetail {
                row,
                topic: r.topic().to_string(),
                table: r.table().to_string(),
            }))
    }

    /// The parked keys of `service` ([`park`](Self::park)).
    pub async fn parked(&self, service: &str) -> Result<Vec<ParkedKey>> {
        let r = self.route(service)?;
        DB::parked(&self.pool, r.table(), r.service())
            .await
            .map_err(|e| {
                Error::db(
                    format!("listing parked keys of {service} in {}", r.table()),
                    e,
                )
            })
    }

    /// The newest `limit` audit rows, of `service` or of every service of the catalog,
    /// newest first.
    pub async fn audit_log(&self, service: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>> {
        let routes: Vec<&Route> = match service {
            Some(s) => vec![self.route(s)?],
            None => self.catalog.routes().collect(),
        };
        let mut entries = Vec::new();
        let mut tables = Vec::new();
        for r in routes {
            // Services sharing a table share its audit table: read it once.
            if tables.contains(&r.table()) {
                continue;
            }
            tables.push(r.table());
            let only = service.map(|_| r.service());
            let rows = DB::audit(&self.pool, r.table(), only, limit)
                .await
                .map_err(|e| Error::db(format!("reading the audit log of {}", r.table()), e))?;
            entries.extend(rows);
        }
        entries.sort_by(|a, b| b.at.cmp(&a.at).then(b.id.cmp(&a.id)));
        entries.truncate(limit as usize);
        Ok(entries)
    }
}
