//! Typed handlers: plain async fns, registered by `#[outbox_handler]`, run by their
//! service's consumer inside a database transaction that also records consumption.
//!
//! ```ignore
//! #[outbox_handler]
//! async fn on_task_created(
//!     ctx: &mut HandlerContext<Postgres>,
//!     event: TaskCreated,
//! ) -> Result<(), HandlerError> {
//!     sqlx::query("INSERT INTO tasks (id, title) VALUES ($1, $2)")
//!         .bind(&event.task_id)
//!         .bind(&event.title)
//!         .execute(ctx.conn())
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! The first parameter is the transaction the consumer opened: the handler's writes and
//! the row's `consumed` mark commit together, or not at all. A handler can also be
//! generic over the backend (`async fn h<DB: Backend>(ctx: &mut HandlerContext<DB>, ..)`)
//! and then runs on whichever backend the consumer uses.

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;

use futures::future::BoxFuture;

use crate::backend::{Backend, SqlValue};
use crate::event::{Event, EventId};

/// What a handler knows about the event it is handling.
#[derive(Debug, Clone)]
pub struct EventMeta {
    /// The event id (the de-duplication key).
    pub event_id: EventId,
    /// The event type name.
    pub event_type: String,
    /// The schema version the event was written with.
    pub version: u32,
    /// The owning service.
    pub service: String,
    /// The ordering key, if any.
    pub key: Option<String>,
    /// Which delivery attempt this is: 1 the first time, 2 after one failure, ...
    pub attempt: u32,
}

/// The handler's view of the consumer's transaction: write through [`conn`](Self::conn)
/// and the writes commit atomically with the event's `consumed` mark.
///
/// Under load the transaction is shared with the handlers of the other records queued
/// in the same lane ([`crate::OutboxConfig::consumer_batch_size`]), run one after
/// another: a handler sees the writes of those before it, as if they had committed.
/// Do not change state that outlives your handler (`SET`, `SET LOCAL`, advisory locks,
/// temporary tables); an error returned by any handler rolls the whole batch back, and
/// its records run again one per transaction.
pub struct HandlerContext<DB: Backend> {
    tx: sqlx::Transaction<'static, DB>,
    meta: EventMeta,
    /// The handlers that succeeded in this transaction, for the metrics recorded once
    /// it commits (a rolled-back batch runs its handlers again).
    pub(crate) succeeded: Vec<Succeeded>,
}

/// A handler that succeeded: what the metrics record after COMMIT.
#[derive(Debug, Clone)]
pub(crate) struct Succeeded {
    pub event_type: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub published_at: Option<chrono::DateTime<chrono::Utc>>,
    pub took: std::time::Duration,
}

impl<DB: Backend> HandlerContext<DB> {
    /// Wraps the consumer's transaction from its BEGIN (used by the consumer): the
    /// transaction lives here until COMMIT, and each handler run in it sees the facts
    /// of its own event ([`set_meta`](Self::set_meta)).
    pub(crate) fn begin(tx: sqlx::Transaction<'static, DB>) -> Self {
        let meta = EventMeta {
            event_id: EventId(uuid::Uuid::nil()),
            event_type: String::new(),
            version: 0,
            service: String::new(),
            key: None,
            attempt: 0,
        };
        HandlerContext {
            tx,
            meta,
            succeeded: Vec::new(),
        }
    }

    /// The event the next handler run handles (used by the consumer).
    pub(crate) fn set_meta(&mut self, meta: EventMeta) {
        self.meta = meta;
    }

    /// Gives the transaction back (used by the consumer after the handler returns).
    pub(crate) fn into_transaction(self) -> sqlx::Transaction<'static, DB> {
        self.tx
    }

    /// The connection of the transaction: pass it to sqlx as the executor.
    pub fn conn(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }

    /// The transaction itself, for APIs that take a `&mut Transaction`.
    pub fn transaction(&mut self) -> &mut sqlx::Transaction<'static, DB> {
        &mut self.tx
    }

    /// Facts about the event being handled.
    pub fn meta(&self) -> &EventMeta {
        &self.meta
    }

    /// The event id: the key to de-duplicate side effects outside this database.
    pub fn event_id(&self) -> EventId {
        self.meta.event_id
    }

    /// Which delivery attempt this is (1 the first time).
    pub fn attempt(&self) -> u32 {
        self.meta.attempt
    }

    /// Runs one statement in the transaction with `?` placeholders, on any backend: for
    /// handlers generic over the backend. Returns rows affected.
    pub async fn execute(&mut self, sql: &str, args: &[SqlValue]) -> Result<u64, HandlerError> {
        DB::execute_portable(&mut self.tx, sql, args)
            .await
            .map_err(HandlerError::from)
    }
}

/// How a failure should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// Retry with exponential backoff; dead after the event's max retries.
    Transient,
    /// Dead at once: retrying cannot help.
    Permanent,
    /// The payload does not deserialize into the handler's type: dead at once.
    Undecodable,
}

/// A handler's failure. Any `std::error::Error` converts into a transient one, so `?`
/// works on sqlx, serde and IO errors; use [`HandlerError::permanent`] for failures
/// that retrying cannot fix. A `serde_json` error anywhere in the converted error's
/// chain is redacted (`redact_json_error`): its message goes to
/// `last_error` and the logs, and must not carry values from a payload.
///
/// Deliberately not `std::error::Error` itself (as `anyhow::Error`), so the blanket
/// conversion can exist.
pub struct HandlerError {
    kind: FailureKind,
    message: String,
}

impl HandlerError {
    /// A failure worth retrying (the default for converted errors).
    pub fn transient(message: impl fmt::Display) -> Self {
        HandlerError {
            kind: FailureKind::Transient,
            message: message.to_string(),
        }
    }

    /// A failure retrying cannot fix: the event goes dead at once with this reason.
    pub fn permanent(message: impl fmt::Display) -> Self {
        HandlerError {
            kind: FailureKind::Permanent,
            message: message.to_string(),
        }
    }

    /// The payload could not be decoded into the handler's event type.
    pub fn undecodable(message: impl fmt::Display) -> Self {
        HandlerError {
            kind: FailureKind::Undecodable,
            message: message.to_string(),
        }
    }

    /// How the consumer treats this failure.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The failure's message (what ends up in `last_error`).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HandlerError({:?}: {})", self.kind, self.message)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(err: E) -> Self {
        // Keep the whole source chain: the last error is what an operator reads.
        HandlerError::transient(crate::redact::redacted_error_chain(&err))
    }
}

/// The return type of a handler: `Result<(), E>` where `E` converts into
/// [`HandlerError`].
#[diagnostic::on_unimplemented(
    message = "an outbox handler must return `Result<(), E>` where `E` converts into `HandlerError`; it returns `{Self}`",
    label = "wrong return type",
    note = "returning `()` would hide failures: return `Result<(), outbox_runtime::HandlerError>` and use `?`"
)]
pub trait HandlerResult {
    /// Converts into the framework's result.
    fn into_handler_result(self) -> Result<(), HandlerError>;
}

impl<E: Into<HandlerError>> HandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

/// A type-erased handler for backend `DB`: decodes the payload, written at the given
/// schema version (the row's), into the current event type ([`Event::decode`]) and runs
/// the user's fn.
pub type HandlerFn<DB> = for<'a> fn(
    &'a mut HandlerContext<DB>,
    u32,
    &'a [u8],
) -> BoxFuture<'a, Result<(), HandlerError>>;

/// Hands out the [`HandlerFn`] of a registered handler for the backend the consumer
/// runs on. Generated code implements it through [`ConcreteHandler`] or
/// [`GenericHandlerFactory`].
pub trait HandlerFactory: Sync + 'static {
    /// Fills `slot` (an `&mut Option<HandlerFn<DB>>`) if this handler runs on `DB`.
    fn fill(&self, slot: &mut dyn Any);
    /// The backends this handler runs on, for error messages.
    fn backends(&self) -> &'static [&'static str];
}

/// A handler written for one backend (`&mut HandlerContext<Postgres>`).
pub struct ConcreteHandler<DB: Backend>(pub HandlerFn<DB>);

impl<DB: Backend> HandlerFactory for ConcreteHandler<DB> {
    fn fill(&self, slot: &mut dyn Any) {
        if let Some(slot) = slot.downcast_mut::<Option<HandlerFn<DB>>>() {
            *slot = Some(self.0);
        }
    }
    fn backends(&self) -> &'static [&'static str] {
        DB::BACKEND_NAMES
    }
}

/// A handler generic over the backend: `#[outbox_handler]` on
/// `async fn h<DB: Backend>(ctx: &mut HandlerContext<DB>, event: E)` implements this.
pub trait GenericHandler: Send + Sync + 'static {
    /// Decodes the payload (of schema `version`) and runs the handler on backend `DB`.
    fn call<'a, DB: Backend>(
        ctx: &'a mut HandlerContext<DB>,
        version: u32,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// The factory of a [`GenericHandler`]: serves every backend compiled in.
pub struct GenericHandlerFactory<H>(PhantomData<fn() -> H>);

impl<H> GenericHandlerFactory<H> {
    /// The factory (const, for `inventory::submit!`).
    pub const fn new() -> Self {
        GenericHandlerFactory(PhantomData)
    }
}

impl<H> Default for GenericHandlerFactory<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H: GenericHandler> HandlerFactory for GenericHandlerFactory<H> {
    fn fill(&self, slot: &mut dyn Any) {
        #[cfg(feature = "postgres")]
        if let Some(slot) = slot.downcast_mut::<Option<HandlerFn<sqlx::Postgres>>>() {
            *slot = Some(H::call::<sqlx::Postgres>);
        }
        #[cfg(feature = "mysql")]
        if let Some(slot) = slot.downcast_mut::<Option<HandlerFn<sqlx::MySql>>>() {
            *slot = Some(H::call::<sqlx::MySql>);
        }
        #[cfg(feature = "sqlite")]
        if let Some(slot) = slot.downcast_mut::<Option<HandlerFn<sqlx::Sqlite>>>() {
            *slot = Some(H::call::<sqlx::Sqlite>);
        }
        let _ = slot;
    }
    fn backends(&self) -> &'static [&'static str] {
        &["any"]
    }
}

/// One handler as registered at compile time, collected through `inventory`.
pub struct HandlerRegistration {
    /// The owning service of the handled event: the consumer that runs the handler,
    /// unless `subscriber` is set.
    pub service: &'static str,
    /// For a subscription (`#[outbox_handler(subscriber = Notification)]`): the
    /// subscribing service, whose inbox and subscriber consumer run the handler.
    pub subscriber: Option<&'static str>,
    /// The handled event type.
    pub event_type: &'static str,
    /// The event's schema version the handler was compiled against.
    pub event_version: u32,
    /// The handler's path (`crate::module::fn_name`), for messages.
    pub name: &'static str,
    /// Hands out the type-erased fn for the consumer's backend.
    pub factory: &'static dyn HandlerFactory,
}

impl HandlerRegistration {
    /// The registration of a handler of event `E`.
    pub const fn of<E: Event>(name: &'static str, factory: &'static dyn HandlerFactory) -> Self {
        HandlerRegistration {
            service: <E::Service as crate::service::Service>::NAME,
            subscriber: None,
            event_type: E::EVENT_TYPE,
            event_version: E::VERSION,
            name,
            factory,
        }
    }

    /// The registration of a handler of event `E` (public: the macro checks it) in
    /// the service named `subscriber`.
    pub const fn subscription<E: Event>(
        subscriber: &'static str,
        name: &'static str,
        factory: &'static dyn HandlerFactory,
    ) -> Self {
        HandlerRegistration {
            service: <E::Service as crate::service::Service>::NAME,
            subscriber: Some(subscriber),
            event_type: E::EVENT_TYPE,
            event_version: E::VERSION,
            name,
            factory,
        }
    }

    /// The handler fn for backend `DB`, if the handler runs on it.
    pub fn for_backend<DB: Backend>(&self) -> Option<HandlerFn<DB>> {
        let mut slot: Option<HandlerFn<DB>> = None;
        self.factory.fill(&mut slot);
        slot
    }
}

impl fmt::Debug for HandlerRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerRegistration")
            .field("service", &self.service)
            .field("subscriber", &self.subscriber)
            .field("event_type", &self.event_type)
            .field("name", &self.name)
            .field("backends", &self.factory.backends())
            .finish()
    }
}

inventory::collect!(HandlerRegistration);

/// Decodes a payload of schema `version` into the handler's event type, upcasting an
/// older version ([`Event::decode`]); a failure is [`FailureKind::Undecodable`] (the
/// event goes dead at once with serde's error, redacted: where and why, never the
/// values).
pub fn decode_payload<E: Event>(version: u32, payload: &[u8]) -> Result<E, HandlerError> {
    E::decode(version, payload).map_err(|e| HandlerError::undecodable(e.message()))
}
