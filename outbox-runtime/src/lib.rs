//! # outbox-runtime
//!
//! A typed transactional outbox for services that publish events to Kafka in the same
//! database transaction as their business writes, and handle them exactly once in
//! effect.
//!
//! - [`outbox_service`], [`outbox_event`], [`outbox_handler`] declare services, events
//!   and handlers; misroutes are compile errors.
//! - [`catalog`]: the route catalog (`event type -> service -> table / topic / group`),
//!   built once from the compile-time registry and validated at startup.
//! - [`outbox`]: `publish` inside the caller's transaction.
//! - [`backend`]: the outbox repository and its state machine, per database.
//! - [`relay`]: claims due rows with a lease, produces to Kafka, marks them published.
//! - [`consumer`]: typed dispatch to handlers inside a database transaction.
//! - [`runtime`]: runs relays and consumers for any subset of services.
//! - [`envelope`]: the wire format.
//! - [`admin`]: dead letters and replay, for operators.
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

/// A named crash point (`fail` crate), compiled in only with the `failpoints` feature.
/// The names are listed in `RELIABILITY.md`.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

pub mod admin;
pub mod backend;
pub mod catalog;
pub mod config;
pub mod consumer;
pub mod envelope;
pub mod error;
pub mod event;
pub mod handler;
pub mod kafka;
/// The name grammar (the `outbox-names` crate, which the macros share).
pub use outbox_names as names;
pub mod outbox;
pub mod redact;
pub mod relay;
pub mod retry;
pub mod route;
pub mod runtime;
pub mod service;
mod wakeup;

#[doc(hidden)]
pub mod __private;

pub use admin::Admin;
pub use backend::{Backend, OutboxRow, SqlValue, Status, StatusCounts};
pub use catalog::{Catalog, CatalogBuilder, CatalogError};
pub use config::{OutboxConfig, Retention};
pub use error::{Error, Result};
pub use event::{Event, EventId, EventKey};
pub use handler::{EventMeta, FailureKind, HandlerContext, HandlerError};
pub use kafka::{KafkaConfig, OnUnreachableBroker, TopicSettings};
pub use outbox::{Outbox, OutboxTx, PublishOptions, RawEvent};
pub use outbox_macros::{outbox_event, outbox_handler, outbox_service};
pub use route::{GroupName, Route, ServiceName, TableName, TopicName};
pub use runtime::{OutboxRuntime, RuntimeHandle};
pub use service::Service;

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
