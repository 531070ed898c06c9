//! The release being deployed: `rollout.Noted` at version 2 (a new optional field) and
//! a new event type, `rollout.Renamed`, with handlers for both. See `rollout/worker.rs`
//! and `tests/tests/rolling_deploy.rs`.

#[path = "rollout/worker.rs"]
mod worker;

use futures::future::BoxFuture;
use futures::FutureExt;
use outbox_runtime::serde::{Deserialize, Serialize};
use outbox_runtime::{
    outbox_event, outbox_handler, Backend, EventId, HandlerContext, HandlerError, OutboxTx,
};
use worker::{Release, Rollout};

/// Something was noted on an account; version 2 says by whom.
#[outbox_event(service = Rollout, name = "rollout.Noted", version = 2, key = account)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(crate = "outbox_runtime::serde")]
pub struct Noted {
    /// The account (the key).
    pub account: String,
    /// Its number.
    pub n: u32,
    /// Who noted it (new in version 2).
    #[serde(default)]
    pub by: Option<String>,
}

/// An account was renamed (new in this release).
#[outbox_event(service = Rollout, name = "rollout.Renamed", key = account)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(crate = "outbox_runtime::serde")]
pub struct Renamed {
    /// The account (the key).
    pub account: String,
    /// Its new name.
    pub name: String,
}

#[outbox_handler]
async fn on_noted<DB: Backend>(ctx: &mut HandlerContext<DB>, e: Noted) -> Result<(), HandlerError> {
    worker::record(ctx, V2::NAME, &e.account).await
}

#[outbox_handler]
async fn on_renamed<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    e: Renamed,
) -> Result<(), HandlerError> {
    worker::record(ctx, V2::NAME, &e.account).await
}

struct V2;

impl Release for V2 {
    const NAME: &'static str = "v2";
    fn publish<'a, DB: Backend>(
        tx: &'a mut OutboxTx<'_, Rollout, DB>,
        key: String,
        n: u32,
    ) -> BoxFuture<'a, outbox_runtime::Result<EventId>> {
        async move {
            if n.is_multiple_of(2) {
                tx.publish(&Noted {
                    account: key,
                    n,
                    by: Some("v2".into()),
                })
                .await
            } else {
                tx.publish(&Renamed {
                    account: key,
                    name: format!("name {n}"),
                })
                .await
            }
        }
        .boxed()
    }
}

fn main() {
    worker::main::<V2>();
}
