//! # outbox-runtime
//!
//! A typed transactional outbox for services that publish events to Kafka in the same
//! database transaction as their business writes, and handle them exactly once in
//! effect.
//!
//! - [`outbox_service`], [`outbox_event`], [`outbox_handler`] declare services, events
//!   and handlers; misroutes are compile errors.
//! - [`Catalog`]: the route catalog (`event type -> service -> table / topic / group`),
//!   built once from the compile-time registry and validated at startup.
//! - [`Outbox`] / [`OutboxTx`]: `publish` inside the caller's transaction.
//! - [`OutboxRuntime`]: runs the relays (claim due rows with a lease, produce to Kafka,
//!   mark them published) and the consumers (typed dispatch to handlers inside a
//!   database transaction) of any subset of services, and housekeeping.
//! - [`OutboxConfig`], [`KafkaConfig`]: the settings; [`RelayStats`], [`ConsumerStats`]:
//!   the counters.
//! - [`envelope`]: the wire format (CloudEvents binary-mode headers).
//! - `otel` (feature `otel`): one OpenTelemetry trace from `publish` through the relay
//!   to the handler (W3C trace context in the row and the record).
//! - [`Admin`]: dead letters and replay, for operators; [`postgres`] / [`sqlite`]: what
//!   operators and pool builders need from the store.
//!
//! See `ARCHITECTURE.md` in the repository for how one event flows end to end.
//!
//! ```no_run
//! use outbox_runtime::{
//!     outbox_event, outbox_handler, outbox_service, sqlx, Catalog, HandlerContext,
//!     HandlerError, KafkaConfig, OutboxRuntime, Postgres,
//! };
//! use serde::{Deserialize, Serialize};
//!
//! #[outbox_service] // table task_outbox, topic outbox.task, group outbox.task.consumer
//! pub struct Task;
//!
//! #[outbox_event(service = Task, key = task_id)] // the key orders one task's events
//! #[derive(Serialize, Deserialize)]
//! pub struct TaskCreated {
//!     pub task_id: String,
//!     pub title: String,
//! }
//!
//! /// Runs in task's consumer, inside a transaction that also marks the event consumed.
//! #[outbox_handler]
//! async fn on_task_created(
//!     ctx: &mut HandlerContext<Postgres>,
//!     e: TaskCreated,
//! ) -> Result<(), HandlerError> {
//!     sqlx::query("INSERT INTO task_view (id, title) VALUES ($1, $2)")
//!         .bind(&e.task_id)
//!         .bind(&e.title)
//!         .execute(ctx.conn())
//!         .await?;
//!     Ok(())
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
//! let catalog = Catalog::global()?; // validated once, every problem listed at once
//! let runtime = OutboxRuntime::new(catalog, pool.clone(), KafkaConfig::new("127.0.0.1:9092"));
//! let outbox = runtime.outbox::<Task>()?; // publishes with the runtime's settings
//! let runtime = runtime
//!     .start() // checks the broker, creates missing tables and topics, runs relays and consumers
//!     .await?;
//!
//! let mut tx = outbox.begin().await?; // your business transaction
//! sqlx::query("INSERT INTO tasks (id) VALUES ($1)").bind("t-1").execute(&mut *tx).await?;
//! tx.publish(&TaskCreated { task_id: "t-1".into(), title: "ship".into() }).await?;
//! tx.commit().await?; // the event exists if and only if this commits
//!
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
// Without `kafka` the items that serve only the relay and the consumers (handler
// contexts, wake-up listeners, failpoints) are unused; the full build still warns.
#![cfg_attr(not(feature = "kafka"), allow(dead_code, unused_macros))]

/// A named crash point (`fail` crate), compiled in only with the `failpoints` feature.
/// The names are listed in `RELIABILITY.md`.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

pub mod admin;
#[doc(hidden)]
pub mod backend;
mod catalog;
#[cfg(feature = "cli")]
pub mod cli;
mod commit_watch;
pub mod compat;
mod config;
#[cfg(feature = "console")]
pub mod console;
#[cfg(feature = "kafka")]
mod consumer;
#[cfg(feature = "kafka")]
pub mod envelope;
mod error;
mod event;
mod handler;
#[cfg(feature = "kafka")]
mod health;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "kafka")]
pub mod metrics;
/// The name grammar (the `outbox-names` crate, which the macros share).
pub use outbox_names as names;
#[cfg(feature = "otel")]
pub mod otel;
mod outbox;
mod redact;
#[cfg(feature = "kafka")]
mod relay;
mod retry;
mod route;
#[cfg(feature = "kafka")]
mod runtime;
mod service;
#[cfg(feature = "kafka")]
mod subscriber;
mod trace;
mod wakeup;

#[doc(hidden)]
pub mod __private;

/// Not part of the API (it may change in any release): the pieces the project's own
/// tests and benchmark drive directly, below the runtime.
#[cfg(feature = "kafka")]
#[doc(hidden)]
pub mod internals {
    pub use crate::consumer::{Consumer, Outcome};
    pub use crate::relay::Relay;
    pub use crate::runtime::ShutdownSignal;
}

/// PostgreSQL statements for operators: the relay's claim, to `EXPLAIN` against your
/// own table, and the claim turn, to hold a service's relays off in a transaction of
/// your own (README, "Operating it").
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use crate::backend::postgres::{claim_sql, take_claim_turn};
}

/// SQLite connection settings the framework relies on (WAL, busy timeout).
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use crate::backend::sqlite::{sqlite_connect_options, sqlite_outbox_options};
}

pub use admin::{
    Admin, DeadPage, EventDetail, Page, ReplayOptions, ReplayProgress, ReplayReport,
    ServiceOverview,
};
pub use backend::{
    AuditEntry, Backend, Backlog, DeadFilter, DeadReason, KeyCounts, OutboxRow, ParkedKey,
    SqlValue, Status, StatusCounts, WaitingCount,
};
pub use catalog::{
    Catalog, CatalogBuilder, CatalogError, EventInfo, RouteSpec, SubscriptionInfo, VersionInfo,
};
pub use config::{OutboxConfig, Retention, Waiting};
#[cfg(feature = "kafka")]
pub use consumer::ConsumerStats;
pub use error::{Error, Result};
pub use event::{DecodeError, Event, EventId, EventKey, PublicEvent};
pub use handler::{EventMeta, FailureKind, HandlerContext, HandlerError};
#[cfg(feature = "kafka")]
pub use health::{ComponentHealth, Health, Problem, Role, Side};
#[cfg(feature = "kafka")]
pub use kafka::{KafkaConfig, OnUnreachableBroker, TopicSettings};
pub use outbox::{Outbox, OutboxTx, PublishOptions, RawEvent};
pub use outbox_macros::{outbox_event, outbox_handler, outbox_service};
#[cfg(feature = "kafka")]
pub use relay::RelayStats;
pub use retry::Backoff;
pub use route::{GroupName, Route, ServiceName, TableName, TopicName};
#[cfg(feature = "kafka")]
pub use runtime::{migrate, OutboxRuntime, RuntimeHandle};
/// serde, whose derives every event needs; re-exported so that a missing derive is
/// reported with a path the user's crate can name.
pub use serde;
pub use service::Service;
#[cfg(feature = "kafka")]
pub use subscriber::{IntakeStats, Subscriber};

/// schemars, for `#[derive(JsonSchema)]` on events whose schema the catalog exports
/// (feature `schema`); derive with `#[schemars(crate = "outbox_runtime::schemars")]`
/// unless your crate depends on the same schemars itself.
#[cfg(feature = "schema")]
pub use schemars;

/// The sqlx this crate is built with: use `outbox_runtime::sqlx` for your own queries,
/// pools and transactions, so your crate never pins a second, incompatible sqlx.
pub use sqlx;

/// The database types, re-exported so handler signatures need no direct sqlx import.
#[cfg(feature = "mysql")]
pub use sqlx::MySql;
#[cfg(feature = "postgres")]
pub use sqlx::Postgres;
#[cfg(feature = "sqlite")]
pub use sqlx::Sqlite;
