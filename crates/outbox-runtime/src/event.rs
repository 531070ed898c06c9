//! Events: serde types owned by one service, registered at compile time.
//!
//! `#[outbox_event(service = Task, key = task_id)]` on a struct or enum that derives
//! `Serialize` and `Deserialize` implements [`Event`], [`PublishedThrough`] and
//! [`HandledBy`] for its service and registers an [`EventRegistration`] with
//! `inventory`. Nothing is listed by hand.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::service::Service;

/// A typed outbox event. Implemented by `#[outbox_event]`; do not implement by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an outbox event",
    label = "not an outbox event",
    note = "declare it with `#[outbox_event(service = ...)]` and derive `Serialize` and `Deserialize`"
)]
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The service that owns the event: its outbox, topic and consumer carry it.
    type Service: Service;
    /// The event type name on the wire (default: the Rust type name).
    const EVENT_TYPE: &'static str;
    /// The schema version (default 1).
    const VERSION: u32;
    /// Retries before the event goes dead, if the event type overrides the runtime
    /// default.
    const MAX_RETRIES: Option<u32>;
    /// The Kafka message key that orders events (`key = field`), if any. `publish`
    /// trims surrounding whitespace and treats an empty key as none.
    fn key(&self) -> Option<String>;
}

/// Proof that an event may be published through the outbox of service `S`, that is,
/// `S` owns it. Implemented by `#[outbox_event]` for the owning service only.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be published through the outbox of service `{S}`",
    label = "this event is owned by another service",
    note = "an event travels through the outbox, topic and consumer of the service named in its `#[outbox_event(service = ...)]`; publish it through `Outbox<ThatService, _>`"
)]
pub trait PublishedThrough<S: Service>: Event {}

/// Proof that an event may be handled by the consumer of service `S`, that is, `S`
/// owns it. Implemented by `#[outbox_event]` for the owning service only.
#[diagnostic::on_unimplemented(
    message = "a handler on the consumer of service `{S}` cannot receive `{Self}`",
    label = "this event is owned by another service",
    note = "handlers run in the consumer of the service that owns the event; attach the handler to that service, or drop `service = ...` from `#[outbox_handler]`"
)]
pub trait HandledBy<S: Service>: Event {}

/// Types usable as an event key (`key = field`). Implemented for strings, integers,
/// UUIDs and `Option`s of them.
///
/// `publish` trims surrounding whitespace from the key (`str::trim`) and stores a key
/// that is then empty as no key (NULL): `" a "` and `"a"` order together, and blank
/// keys do not all share one ordering key. The length limit applies after trimming.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an outbox event key",
    label = "the `key = ...` field has this type",
    note = "key fields must be strings, integers, UUIDs or `Option`s of those; implement `outbox_runtime::EventKey` for other types"
)]
pub trait EventKey {
    /// The key, before `publish` trims it; `None` for no key.
    fn to_key(&self) -> Option<String>;
}

macro_rules! key_via_to_string {
    ($($t:ty),*) => {$(
        impl EventKey for $t {
            fn to_key(&self) -> Option<String> { Some(self.to_string()) }
        }
    )*};
}
key_via_to_string!(
    String, str, u8, u16, u32, u64, u128, i8, i16, i32, i64, i128, usize, isize, Uuid
);

impl<T: EventKey + ?Sized> EventKey for &T {
    fn to_key(&self) -> Option<String> {
        (**self).to_key()
    }
}

impl<T: EventKey> EventKey for Option<T> {
    fn to_key(&self) -> Option<String> {
        self.as_ref().and_then(EventKey::to_key)
    }
}

/// One event type as registered at compile time, collected through `inventory`.
#[derive(Debug, Clone, Copy)]
pub struct EventRegistration {
    /// The event type name.
    pub event_type: &'static str,
    /// The schema version.
    pub version: u32,
    /// The owning service's name.
    pub service: &'static str,
    /// The owning service's compile-time table (empty only for hand-written impls).
    pub service_table: &'static str,
    /// The event-type retry override.
    pub max_retries: Option<u32>,
    /// The key field, if any (for docs and the JSON export).
    pub key_field: Option<&'static str>,
    /// Where the type is declared (`crate::module::Type`).
    pub rust_type: &'static str,
}

impl EventRegistration {
    /// The registration of `E`; `rust_type` names its declaration, `key_field` its key.
    pub const fn of<E: Event>(rust_type: &'static str, key_field: Option<&'static str>) -> Self {
        EventRegistration {
            event_type: E::EVENT_TYPE,
            version: E::VERSION,
            service: <E::Service as Service>::NAME,
            service_table: <E::Service as Service>::TABLE,
            max_retries: E::MAX_RETRIES,
            key_field,
            rust_type,
        }
    }
}

inventory::collect!(EventRegistration);

/// The identity of one published event: the de-duplication key end to end (never the
/// Kafka offset). A UUIDv7, so ids of one service sort by creation time.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        EventId(Uuid::now_v7())
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
