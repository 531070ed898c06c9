//! Publishing: write an event into the service's outbox table inside the caller's own
//! transaction.
//!
//! ```ignore
//! let outbox = Outbox::<Task, Postgres>::new(pool.clone(), &catalog)?;
//!
//! // Either with your own sqlx transaction ...
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE tasks SET done = true WHERE id = $1").bind(id).execute(&mut *tx).await?;
//! outbox.publish(&mut tx, &TaskCompleted { task_id: id }).await?;
//! tx.commit().await?;
//! // The relays wake at once: the outbox notices the commit (its commit watch).
//!
//! // ... or with an OutboxTx, which wakes the relays itself after commit.
//! let mut tx = outbox.begin().await?;
//! sqlx::query("UPDATE tasks SET done = true WHERE id = $1").bind(id).execute(&mut *tx).await?;
//! tx.publish(&TaskCompleted { task_id: id }).await?;
//! tx.commit().await?;
//! ```
//!
//! The row commits or rolls back with the business write; a rolled-back event never
//! exists, so it is never delivered. The type system routes: `Outbox<Task, _>` accepts
//! only events owned by `Task`.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{Pool, Transaction};

use crate::backend::{Backend, NewRow};
use crate::catalog::{Catalog, Route};
use crate::commit_watch::CommitWatch;
use crate::config::OutboxConfig;
use crate::error::{Error, Result};
use crate::event::{Event, EventId, PublishedThrough};
use crate::names::{check_name, NameKind};
use crate::service::Service;
use crate::wakeup::{self, Notifier};

/// Per-publish overrides.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Retries before the event goes dead (overrides the event type and the config).
    pub max_retries: Option<u32>,
    /// The ordering key (overrides the event's `key = field`). Surrounding whitespace is
    /// trimmed; a key that is empty after trimming means the event has no key (no
    /// ordering), so `Some("")` publishes a keyed event type without one. The length
    /// limit ([`crate::backend::MAX_KEY_LEN`]) applies to the trimmed key.
    pub key: Option<String>,
    /// The event id (default: a fresh UUIDv7). Set it to make a retried business call
    /// idempotent: publishing the same id twice fails with a unique violation.
    pub event_id: Option<EventId>,
}

/// An untyped event, for the compatibility route (rows written as the legacy system
/// wrote them). The type is checked against the route catalog when it is published:
/// it must be registered, owned by the publishing service, and not newer than the
/// catalog's version; only the payload is taken as given.
#[derive(Debug, Clone)]
pub struct RawEvent {
    /// The event type name: one of the publishing service's types in the catalog.
    pub event_type: String,
    /// The schema version: at most the catalog's version of the type.
    pub version: u32,
    /// The ordering key. Surrounding whitespace is trimmed; empty after trimming means
    /// no key. The length limit applies to the trimmed key.
    pub key: Option<String>,
    /// The payload; should be JSON, is not checked (so a poison payload can be stored
    /// and handled as the consumer handles any undecodable payload).
    pub payload: String,
    /// Retries before dead (default: the config's).
    pub max_retries: Option<u32>,
}

/// The outbox of service `S` on database `DB`. Cheap to clone.
pub struct Outbox<S: Service, DB: Backend> {
    pool: Pool<DB>,
    route: Arc<Route>,
    // For `publish_raw`'s checks: which service owns a type, at which version.
    catalog: Catalog,
    config: Arc<OutboxConfig>,
    notifier: Notifier,
    watch: CommitWatch,
    _service: PhantomData<fn() -> S>,
}

impl<S: Service, DB: Backend> Clone for Outbox<S, DB> {
    fn clone(&self) -> Self {
        Outbox {
            pool: self.pool.clone(),
            route: self.route.clone(),
            catalog: self.catalog.clone(),
            config: self.config.clone(),
            notifier: self.notifier.clone(),
            watch: self.watch.clone(),
            _service: PhantomData,
        }
    }
}

impl<S: Service, DB: Backend> Outbox<S, DB> {
    /// The outbox of `S`, routed by `catalog`, with the default settings, for a process
    /// that only publishes. In a process that runs an [`crate::OutboxRuntime`], take
    /// outboxes from it ([`crate::OutboxRuntime::outbox`]) so they publish with its
    /// settings.
    pub fn new(pool: Pool<DB>, catalog: &Catalog) -> Result<Self> {
        Self::with_config(pool, catalog, OutboxConfig::default())
    }

    /// The outbox of `S` with explicit settings, for a process that only publishes:
    /// publishing reads [`OutboxConfig::default_max_retries`] and
    /// [`OutboxConfig::max_payload_bytes`]; give the same `OutboxConfig` to the
    /// runtime that consumes (its consumer skips records over `max_payload_bytes`).
    pub fn with_config(pool: Pool<DB>, catalog: &Catalog, config: OutboxConfig) -> Result<Self> {
        Self::with_shared_config(pool, catalog, Arc::new(config))
    }

    /// The outbox of `S` reading the settings a runtime shares with it.
    pub(crate) fn with_shared_config(
        pool: Pool<DB>,
        catalog: &Catalog,
        config: Arc<OutboxConfig>,
    ) -> Result<Self> {
        let route = catalog.route_of::<S>()?.clone();
        Ok(Outbox {
            pool,
            route: Arc::new(route),
            catalog: catalog.clone(),
            config,
            notifier: Notifier::new(),
            watch: CommitWatch::new(),
            _service: PhantomData,
        })
    }

    /// The service's route (table, topic, group).
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// Creates the service's outbox table if missing (idempotent).
    pub async fn migrate(&self) -> Result<()> {
        DB::migrate(&self.pool, self.route.table())
            .await
            .map_err(|e| Error::db(format!("migrating outbox table {}", self.route.table()), e))
    }

    /// Writes `event` into the outbox on `conn`: pass your transaction (`&mut tx`). The
    /// event is delivered if and only if that transaction commits. Returns the event id.
    /// The relays are woken when the transaction commits: the outbox's commit watch
    /// notices it (see [`notify_committed`](Self::notify_committed)).
    /// With the `otel` feature, the row keeps the W3C trace context of the current
    /// `tracing` span, which the relay and the handler continue.
    ///
    /// (A plain fn returning a boxed future, not an `async fn`: the event is serialised
    /// before the future exists, so a misrouted event is one compile error, not three.)
    pub fn publish<'a, E: PublishedThrough<S>>(
        &'a self,
        conn: &'a mut DB::Connection,
        event: &E,
    ) -> BoxFuture<'a, Result<EventId>> {
        self.publish_with(conn, event, PublishOptions::default())
    }

    /// [`publish`](Self::publish) with per-call overrides.
    pub fn publish_with<'a, E: PublishedThrough<S>>(
        &'a self,
        conn: &'a mut DB::Connection,
        event: &E,
        options: PublishOptions,
    ) -> BoxFuture<'a, Result<EventId>> {
        let write = self.write_event(conn, event, options);
        Box::pin(async move {
            let id = write.await?;
            self.watch_commit(&[id]);
            Ok(id)
        })
    }

    /// Writes one event (what `publish_with` does, without watching for the commit).
    fn write_event<'a, E: PublishedThrough<S>>(
        &'a self,
        conn: &'a mut DB::Connection,
        event: &E,
        options: PublishOptions,
    ) -> BoxFuture<'a, Result<EventId>> {
        let encoded = serde_json::to_string(event).map_err(|source| Error::Serialize {
            event_type: E::EVENT_TYPE.to_owned(),
            source,
        });
        let key = options.key.or_else(|| event.key());
        let max_retries = options
            .max_retries
            .or(E::MAX_RETRIES)
            .unwrap_or(self.config.default_max_retries);
        // The caller's span, here and now (feature `otel`): the future may be polled
        // in another.
        let trace_context = crate::trace::current();
        Box::pin(async move {
            let payload = encoded?;
            self.insert(
                conn,
                E::EVENT_TYPE,
                E::VERSION,
                key.as_deref(),
                &payload,
                max_retries,
                options.event_id,
                trace_context.as_deref(),
            )
            .await
        })
    }

    /// Writes an untyped event (the compatibility route). Refused, before anything is
    /// written, when the type is not in the route catalog
    /// ([`Error::UnknownEventType`]), belongs to another service
    /// ([`Error::EventOfOtherService`]) or is newer than the catalog's version
    /// ([`Error::EventVersionTooNew`]): each would only die later in a consumer.
    pub async fn publish_raw(
        &self,
        conn: &mut DB::Connection,
        event: &RawEvent,
    ) -> Result<EventId> {
        let id = self.write_raw(conn, event).await?;
        self.watch_commit(&[id]);
        Ok(id)
    }

    /// Writes one untyped event (`publish_raw` without watching for the commit).
    async fn write_raw(&self, conn: &mut DB::Connection, event: &RawEvent) -> Result<EventId> {
        self.check_raw(event)?;
        self.insert(
            conn,
            &event.event_type,
            event.version,
            event.key.as_deref(),
            &event.payload,
            event.max_retries.unwrap_or(self.config.default_max_retries),
            None,
            crate::trace::current().as_deref(),
        )
        .await
    }

    /// What the catalog says about a raw event's type and version.
    fn check_raw(&self, event: &RawEvent) -> Result<()> {
        check_name(NameKind::EventType, &event.event_type).map_err(Error::InvalidName)?;
        let service = self.route.service().as_str();
        let Some(info) = self.catalog.event(&event.event_type) else {
            return Err(Error::UnknownEventType {
                event_type: event.event_type.clone(),
                service: service.to_owned(),
                known: self
                    .catalog
                    .events_of_service(service)
                    .map(|e| e.event_type.clone())
                    .collect(),
            });
        };
        if info.service != service {
            return Err(Error::EventOfOtherService {
                event_type: event.event_type.clone(),
                owner: info.service.clone(),
                owner_type: self
                    .catalog
                    .route(&info.service)
                    .map(|r| r.rust_type().to_owned())
                    .unwrap_or_else(|| info.service.clone()),
                service: service.to_owned(),
            });
        }
        if event.version > info.version {
            return Err(Error::EventVersionTooNew {
                event_type: event.event_type.clone(),
                version: event.version,
                known: info.version,
            });
        }
        Ok(())
    }

    /// Writes `events` into the outbox on `conn` (your transaction) in one multi-row
    /// statement per 500 events: what publishing each in turn does, in far fewer round
    /// trips, for backfills and imports. Every event is checked before anything is
    /// written; all or nothing with the transaction. Returns the ids in order (ids, and
    /// so each key's order, follow the slice).
    pub fn publish_all<'a, E: PublishedThrough<S>>(
        &'a self,
        conn: &'a mut DB::Connection,
        events: &[E],
    ) -> BoxFuture<'a, Result<Vec<EventId>>> {
        let write = self.write_all(conn, events);
        Box::pin(async move {
            let ids = write.await?;
            // One id tells when the transaction committed.
            self.watch_commit(&ids[ids.len().saturating_sub(1)..]);
            Ok(ids)
        })
    }

    /// Writes many events (`publish_all` without watching for the commit).
    fn write_all<'a, E: PublishedThrough<S>>(
        &'a self,
        conn: &'a mut DB::Connection,
        events: &[E],
    ) -> BoxFuture<'a, Result<Vec<EventId>>> {
        let encoded: Result<Vec<(String, Option<String>)>> = events
            .iter()
            .map(|event| {
                let payload = serde_json::to_string(event).map_err(|source| Error::Serialize {
                    event_type: E::EVENT_TYPE.to_owned(),
                    source,
                })?;
                Ok((payload, event.key()))
            })
            .collect();
        let max_retries = E::MAX_RETRIES.unwrap_or(self.config.default_max_retries);
        let max_retries = i32::try_from(max_retries).unwrap_or(i32::MAX);
        let trace_context = crate::trace::current();
        Box::pin(async move {
            let encoded = encoded?;
            let mut ids = Vec::with_capacity(encoded.len());
            let mut rows = Vec::with_capacity(encoded.len());
            for (payload, key) in &encoded {
                let key = self.checked_key(E::EVENT_TYPE, payload, key.as_deref())?;
                let id = EventId::new();
                ids.push(id);
                rows.push(NewRow {
                    event_id: id.0,
                    service: self.route.service(),
                    event_type: E::EVENT_TYPE,
                    version: i32::try_from(E::VERSION).unwrap_or(i32::MAX),
                    key,
                    payload,
                    max_retries,
                    trace_context: trace_context.as_deref(),
                });
            }
            DB::insert_many(conn, self.route.table(), &rows)
                .await
                .map_err(|e| self.insert_error(e, E::EVENT_TYPE))?;
            Ok(ids)
        })
    }

    /// `key` trimmed (blank = none), after checking the payload's size and the key's
    /// length.
    fn checked_key<'k>(
        &self,
        event_type: &str,
        payload: &str,
        key: Option<&'k str>,
    ) -> Result<Option<&'k str>> {
        if payload.len() > self.config.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                event_type: event_type.to_owned(),
                size: payload.len(),
                limit: self.config.max_payload_bytes,
            });
        }
        // Keys that differ only by surrounding whitespace are one key, and a blank key is
        // none: otherwise every blank-keyed event would wait on every other one.
        let key = key.map(str::trim).filter(|k| !k.is_empty());
        if let Some(key) = key.filter(|k| k.len() > crate::backend::MAX_KEY_LEN) {
            return Err(Error::KeyTooLong {
                event_type: event_type.to_owned(),
                len: key.len(),
                limit: crate::backend::MAX_KEY_LEN,
            });
        }
        Ok(key)
    }

    /// A failed insert, with the missing table named as such.
    fn insert_error(&self, e: sqlx::Error, event_type: &str) -> Error {
        if crate::error::is_missing_table(&e) {
            return Error::MissingTable {
                table: self.route.table().to_string(),
                service: self.route.service().to_string(),
                source: e,
            };
        }
        Error::db(
            format!(
                "publishing `{event_type}` into {} (service {})",
                self.route.table(),
                S::NAME
            ),
            e,
        )
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert(
        &self,
        conn: &mut DB::Connection,
        event_type: &str,
        version: u32,
        key: Option<&str>,
        payload: &str,
        max_retries: u32,
        event_id: Option<EventId>,
        trace_context: Option<&str>,
    ) -> Result<EventId> {
        let key = self.checked_key(event_type, payload, key)?;
        let id = event_id.unwrap_or_default();
        let row = NewRow {
            event_id: id.0,
            service: self.route.service(),
            event_type,
            version: i32::try_from(version).unwrap_or(i32::MAX),
            key,
            payload,
            max_retries: i32::try_from(max_retries).unwrap_or(i32::MAX),
            trace_context,
        };
        DB::insert(conn, self.route.table(), &row)
            .await
            .map_err(|e| self.insert_error(e, event_type))?;
        Ok(id)
    }

    /// Hands the event ids just written on the caller's own transaction to the commit
    /// watch, which wakes the relays once they are committed.
    fn watch_commit(&self, ids: &[EventId]) {
        for id in ids {
            self.watch.watch(
                id.0,
                &self.pool,
                self.route.table(),
                self.route.service(),
                &self.notifier,
                self.config.relay_poll_interval,
            );
        }
    }

    /// Wakes the service's relays after you committed a transaction that published:
    /// in this process at once, and in other processes through LISTEN/NOTIFY on
    /// PostgreSQL (coalesced, outside your transaction).
    ///
    /// Optional: by default the outbox notices the commits of your own transactions
    /// that published (its commit watch asks the database, 1 ms after a publish and
    /// then less and less often, at most every 5 ms) and wakes the relays itself.
    /// Calling this turns that watch off for this outbox and its clones: you then
    /// wake the relays after each such commit, or they find the rows at their poll.
    /// ([`Outbox::begin`]'s transactions always wake them at commit.)
    pub fn notify_committed(&self) {
        self.watch.turn_off();
        self.wake_relays();
    }

    /// Wakes the relays now, here and (PostgreSQL) in other processes.
    fn wake_relays(&self) {
        wakeup::wake_local(self.route.table(), self.route.service());
        self.notifier
            .signal(&self.pool, self.route.table(), self.route.service());
    }

    /// Begins a transaction that publishes through this outbox and wakes the relays
    /// when it commits.
    pub async fn begin(&self) -> Result<OutboxTx<'_, S, DB>> {
        let tx = DB::begin(&self.pool)
            .await
            .map_err(|e| Error::db("beginning a transaction", e))?;
        Ok(OutboxTx {
            tx,
            outbox: self,
            published: 0,
        })
    }
}

/// A business transaction that can publish through one service's outbox. Derefs to the
/// connection, so `&mut *tx` is an executor for your own queries. Dropped without
/// [`commit`](Self::commit), it rolls back, events included.
pub struct OutboxTx<'o, S: Service, DB: Backend> {
    tx: Transaction<'static, DB>,
    outbox: &'o Outbox<S, DB>,
    published: usize,
}

impl<S: Service, DB: Backend> OutboxTx<'_, S, DB> {
    /// Publishes `event` in this transaction.
    pub fn publish<'a, E: PublishedThrough<S>>(
        &'a mut self,
        event: &E,
    ) -> BoxFuture<'a, Result<EventId>> {
        self.publish_with(event, PublishOptions::default())
    }

    /// Publishes with per-call overrides.
    pub fn publish_with<'a, E: PublishedThrough<S>>(
        &'a mut self,
        event: &E,
        options: PublishOptions,
    ) -> BoxFuture<'a, Result<EventId>> {
        let insert = self.outbox.write_event(&mut self.tx, event, options);
        let published = &mut self.published;
        Box::pin(async move {
            let id = insert.await?;
            *published += 1;
            Ok(id)
        })
    }

    /// Publishes many events in this transaction ([`Outbox::publish_all`]).
    pub fn publish_all<'a, E: PublishedThrough<S>>(
        &'a mut self,
        events: &[E],
    ) -> BoxFuture<'a, Result<Vec<EventId>>> {
        let insert = self.outbox.write_all(&mut self.tx, events);
        let published = &mut self.published;
        Box::pin(async move {
            let ids = insert.await?;
            *published += ids.len();
            Ok(ids)
        })
    }

    /// Publishes an untyped event in this transaction.
    pub async fn publish_raw(&mut self, event: &RawEvent) -> Result<EventId> {
        let id = self.outbox.write_raw(&mut self.tx, event).await?;
        self.published += 1;
        Ok(id)
    }

    /// The underlying sqlx transaction.
    pub fn transaction(&mut self) -> &mut Transaction<'static, DB> {
        &mut self.tx
    }

    /// Commits, then wakes the relays if anything was published. An error here can be
    /// ambiguous (the commit may have happened): the event ids returned by `publish`
    /// let the caller check.
    pub async fn commit(self) -> Result<()> {
        self.tx
            .commit()
            .await
            .map_err(|e| Error::db("committing a transaction that published events", e))?;
        if self.published > 0 {
            self.outbox.wake_relays();
        }
        Ok(())
    }

    /// Rolls back; the events published in it never exist.
    pub async fn rollback(self) -> Result<()> {
        self.tx
            .rollback()
            .await
            .map_err(|e| Error::db("rolling back a transaction", e))
    }
}

impl<S: Service, DB: Backend> Deref for OutboxTx<'_, S, DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<S: Service, DB: Backend> DerefMut for OutboxTx<'_, S, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

// `Event` is used in docs and bounds of the public API.
#[allow(unused)]
fn _assert_event_bound<E: Event>() {}
