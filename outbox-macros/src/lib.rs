//! Attribute macros of `outbox-runtime`: [`macro@outbox_service`], [`macro@outbox_event`]
//! and [`macro@outbox_handler`].
//!
//! Use them through `outbox-runtime`, which re-exports them: the generated code names
//! only `::outbox_runtime::...`, so a crate that uses the macros depends on
//! `outbox-runtime` alone.
//!
//! Every mistake the macros can see is reported at once, at the offending token, with
//! the fix; the item is still emitted as written, so one mistake gives one error and
//! not a cascade. Mistakes only the type checker can see (an undeclared service, an
//! event routed through another service, a non-`Send` handler) are turned into trait
//! assertions spanned at the user's tokens, whose messages come from
//! `#[diagnostic::on_unimplemented]` on the runtime's traits.

mod attr;
mod event;
mod handler;
use outbox_names as names;
mod service;

use proc_macro::TokenStream;

/// Declares an outbox service on a unit struct: one outbox table, one Kafka topic, one
/// consumer group.
///
/// ```ignore
/// use outbox_runtime::outbox_service;
///
/// #[outbox_service]                 // name "task": the type name in kebab-case
/// pub struct Task;
///
/// #[outbox_service]                 // name "active-scheduler"
/// pub struct ActiveScheduler;
///
/// #[outbox_service(name = "agent", table = "outbox_events")] // legacy shared table
/// pub struct Agent;
/// ```
///
/// Options, all optional:
///
/// - `name = "..."`: the service name, `[a-z][a-z0-9-]*` (default: the type name in
///   kebab-case, `ActiveScheduler` → `active-scheduler`);
/// - `table = "..."`: the outbox table, `[a-z_][a-z0-9_]*` (default
///   `<name with - as _>_outbox`);
/// - `topic = "..."`: the Kafka topic (default `outbox.<name>`);
/// - `group = "..."`: the Kafka consumer group (default `outbox.<name>.consumer`).
///
/// Every name is checked at compile time against the grammar of
/// `outbox_runtime::names`, the same check the catalog runs again at startup.
///
/// Implements `outbox_runtime::Service` for the struct and registers the service in the
/// compile-time catalog.
#[proc_macro_attribute]
pub fn outbox_service(args: TokenStream, input: TokenStream) -> TokenStream {
    service::expand(args.into(), input.into()).into()
}

/// Declares an outbox event: a struct or enum that derives `Serialize` and
/// `Deserialize`, owned by one service.
///
/// ```ignore
/// use outbox_runtime::outbox_event;
/// use serde::{Deserialize, Serialize};
///
/// #[outbox_event(service = Task, key = task_id)]
/// #[derive(Serialize, Deserialize)]
/// pub struct TaskCreated {
///     pub task_id: String,
///     pub title: String,
/// }
///
/// #[outbox_event(service = Task, name = "task.state-changed", version = 2, max_retries = 3)]
/// #[derive(Serialize, Deserialize)]
/// pub enum TaskStateChanged {
///     Started { task_id: String },
///     Finished { task_id: String, ok: bool },
/// }
///
/// // The owning service can also be given by its name: `"active-scheduler"` means the
/// // type `ActiveScheduler` (the name in UpperCamelCase), which must be in scope and
/// // be a service with exactly that name.
/// #[outbox_event(service = "active-scheduler")]
/// #[derive(Serialize, Deserialize)]
/// pub struct SlotFreed { pub slot: u32 }
/// ```
///
/// Options:
///
/// - `service = Type` or `service = "name"` (required): the service that owns the event;
///   its outbox, topic and consumer carry it;
/// - `name = "..."`: the event type name on the wire (default: the Rust type name),
///   `[A-Za-z][A-Za-z0-9._-]*`;
/// - `version = N`: the schema version, from 1 (default 1);
/// - `key = field`: the field whose value is the Kafka key, which orders the events
///   of one key (structs with named fields; the field's type must implement
///   `outbox_runtime::EventKey`: strings, integers, UUIDs, `Option`s of them);
/// - `max_retries = N`: retries before the event goes dead, overriding the runtime
///   default;
/// - `upcast(1 = TaskCreatedV1, 2 = TaskCreatedV2)`: the older versions the consumer
///   still decodes, each a plain serde type read from rows of that version and converted
///   into the next version (`From<TaskCreatedV1> for TaskCreatedV2`, ...,
///   `From<TaskCreatedV2> for TaskCreated`); every version below `version`, none twice,
///   no gap up to `version - 1` (README, "Evolving an event");
/// - `public` (a flag): other services may subscribe to the event
///   (`#[outbox_handler(subscriber = ...)]`); without it, only its own service handles it.
///
/// Events must be `'static` and non-generic. Implements `outbox_runtime::Event`, and
/// the proofs that the event is published through and handled by its own service
/// only, and registers the event in the compile-time catalog.
#[proc_macro_attribute]
pub fn outbox_event(args: TokenStream, input: TokenStream) -> TokenStream {
    event::expand(args.into(), input.into()).into()
}

/// Registers an async fn as the handler of one event type, run by the consumer of the
/// service that owns the event, inside a database transaction.
///
/// ```ignore
/// use outbox_runtime::{outbox_handler, Backend, HandlerContext, HandlerError, Sqlite};
///
/// #[outbox_handler]
/// async fn on_task_created(
///     ctx: &mut HandlerContext<Sqlite>,
///     event: TaskCreated,
/// ) -> Result<(), HandlerError> {
///     sqlx::query("INSERT INTO tasks (id, title) VALUES (?, ?)")
///         .bind(&event.task_id)
///         .bind(&event.title)
///         .execute(ctx.conn())
///         .await?;
///     Ok(())
/// }
///
/// // Generic over the backend: runs on whichever database the consumer uses.
/// // `service = Task` asserts at compile time that `Task` owns the event.
/// #[outbox_handler(service = Task)]
/// async fn audit<DB: Backend>(
///     ctx: &mut HandlerContext<DB>,
///     event: TaskCreated,
/// ) -> Result<(), HandlerError> {
///     tracing::info!(id = %ctx.event_id(), "task {} created", event.task_id);
///     Ok(())
/// }
/// ```
///
/// The accepted shape is `async fn name(ctx: &mut HandlerContext<Db>, event: E) -> R`:
///
/// - `Db` is a backend type (`Postgres`, `MySql`, `Sqlite`) or the fn's single type
///   parameter bounded by `Backend`;
/// - the first argument is the consumer's transaction: the handler's writes and the
///   event's `consumed` mark commit together, or not at all;
/// - `E` is an `#[outbox_event]` type, taken by value;
/// - `R` is `Result<(), X>` with `X: Into<HandlerError>` (any `std::error::Error`
///   converts, as a transient failure); an `Err` retries the event with backoff;
/// - the returned future must be `Send`.
///
/// Options (one of them at most):
///
/// - `service = Type` (or `service = "name"`, as in [`macro@outbox_event`]) asserts at
///   compile time that the event is owned by that service; such a handler runs in the
///   consumer of the service that owns its event, and the option only documents and
///   checks it;
/// - `subscriber = Type` (or `"name"`) makes it a subscription: the handler runs in that
///   other service, on its own database, from its inbox (README, "Subscriptions"). The
///   event must be `public`, the subscriber a declared service and not the event's
///   owner; each is a compile error otherwise.
///
/// Handlers are free fns (not methods). Mistakes in the shape are errors at the
/// offending token: a missing `async`, a `self` receiver, a wrong number of arguments,
/// a first argument that is not `&mut HandlerContext<Db>` (a pool would write outside
/// the consumer's transaction), an event taken by reference, generic parameters other
/// than the backend, a missing or non-`Result` return type, a future that is not
/// `Send`.
///
/// The fn is kept as written and can still be called directly, e.g. in tests.
#[proc_macro_attribute]
pub fn outbox_handler(args: TokenStream, input: TokenStream) -> TokenStream {
    handler::expand(args.into(), input.into()).into()
}
