//! A web console for operators (feature `console`): an axum [`Router`] the application
//! mounts, server-rendered HTML without JavaScript, over [`Admin`].
//!
//! ```ignore
//! let admin = Admin::new(pool.clone(), catalog.clone());
//! let options = ConsoleOptions::read_only()
//!     .operator_token(std::env::var("OUTBOX_CONSOLE_TOKEN")?)
//!     .base_path("/outbox");
//! let app = axum::Router::new().nest("/outbox", outbox_runtime::console::router(admin, options));
//! ```
//!
//! It shows every service's overview (rows by status, the oldest due event, events not
//! consumed yet, dead letters, held keys), each service's dead letters with filters
//! (event type, reason, error text, key, age) and pages, one event whole, parked keys
//! and the audit log; and, for an operator, replay (one event, or a filter after a dry
//! run shows how many), discard, park and unpark, each audited as `console`.
//!
//! # Security model
//!
//! - Read-only unless [`ConsoleOptions::operator_token`] is set: no action is shown and
//!   every POST is refused.
//! - Every change is a POST carrying the operator token, typed into the form, and a CSRF
//!   token matching a `SameSite=Strict`, `HttpOnly` cookie (see `security.rs`); anything
//!   else is refused with 403 and changes nothing. Single-event actions also need their
//!   confirmation box ticked; a filtered replay first shows its dry run.
//! - Every value shown is escaped (payloads, keys and errors are untrusted input), and
//!   the Content-Security-Policy forbids scripts, so markup in a payload cannot run.
//! - No secret is shown: not the database URL, not the operator token.
//! - It authenticates no one by itself: serve it on an internal address or behind the
//!   application's own authentication; the token is a guard against mistakes and
//!   forged requests, not an identity.

mod actions;
mod html;
mod pages;
mod security;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::admin::Admin;
use crate::backend::Backend;

/// How the console behaves ([`router`]).
#[derive(Clone, Default)]
pub struct ConsoleOptions {
    operator_token: Option<String>,
    title: Option<String>,
    base_path: String,
}

impl std::fmt::Debug for ConsoleOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOptions")
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "***"),
            )
            .field("title", &self.title)
            .field("base_path", &self.base_path)
            .finish()
    }
}

impl ConsoleOptions {
    /// A console that shows and changes nothing.
    pub fn read_only() -> Self {
        ConsoleOptions::default()
    }

    /// Allows changes to whoever types `token` into the action forms. An empty token
    /// leaves the console read-only.
    pub fn operator_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.operator_token = (!token.is_empty()).then_some(token);
        self
    }

    /// The page titles' suffix (default "outbox console").
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Where the router is mounted (`/outbox` for `Router::nest("/outbox", …)`), for its
    /// links; default: the root.
    pub fn base_path(mut self, path: impl Into<String>) -> Self {
        self.base_path = path.into().trim_end_matches('/').to_owned();
        self
    }

    /// Whether actions are allowed.
    pub fn allows_changes(&self) -> bool {
        self.operator_token.is_some()
    }
}

/// What every handler shares.
struct Console<DB: Backend> {
    admin: Admin<DB>,
    options: ConsoleOptions,
}

impl<DB: Backend> Console<DB> {
    fn title(&self) -> &str {
        self.options.title.as_deref().unwrap_or("outbox console")
    }

    fn base(&self) -> &str {
        &self.options.base_path
    }
}

type Shared<DB> = Arc<Console<DB>>;

/// The console's routes over `admin` (whose changes it audits as `console`). Mount it
/// with `Router::nest` (and [`ConsoleOptions::base_path`]) or serve it as is.
pub fn router<DB: Backend>(admin: Admin<DB>, options: ConsoleOptions) -> Router {
    let console = Arc::new(Console {
        admin: admin.acting_as("console"),
        options,
    });
    Router::new()
        .route("/", get(pages::overview::<DB>))
        .route("/audit", get(pages::audit::<DB>))
        .route("/services/{service}/dead", get(pages::dead::<DB>))
        .route("/services/{service}/events/{id}", get(pages::event::<DB>))
        .route("/services/{service}/keys", get(pages::keys::<DB>))
        .route(
            "/services/{service}/events/{id}/replay",
            post(actions::replay_one::<DB>),
        )
        .route(
            "/services/{service}/events/{id}/discard",
            post(actions::discard::<DB>),
        )
        .route(
            "/services/{service}/replay",
            post(actions::replay_matching::<DB>),
        )
        .route("/services/{service}/keys/park", post(actions::park::<DB>))
        .route(
            "/services/{service}/keys/unpark",
            post(actions::unpark::<DB>),
        )
        .layer(axum::middleware::map_response(security::harden))
        .with_state(console)
}
