//! The release before the deploy: `rollout.Noted` version 1 and its handler, nothing
//! else. See `rollout/worker.rs` and `tests/tests/rolling_deploy.rs`.

#[path = "rollout/worker.rs"]
mod worker;

use futures::future::BoxFuture;
use futures::FutureExt;
use outbox_runtime::serde::{Deserialize, Serialize};
use outbox_runtime::{
    outbox_event, outbox_handler, Backend, EventId, HandlerContext, HandlerError, OutboxTx,
};
use worker::{Release, Rollout};

/// Something was noted on an account.
#[outbox_event(service = Rollout, name = "rollout.Noted", key = account)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(crate = "outbox_runtime::serde")]
pub struct Noted {
    /// The account (the key).
    pub account: String,
    /// Its number.
    pub n: u32,
}

#[outbox_handler]
async fn on_noted<DB: Backend>(ctx: &mut HandlerContext<DB>, e: Noted) -> Result<(), HandlerError> {
    worker::record(ctx, V1::NAME, &e.account).await
}

struct V1;

impl Release for V1 {
    const NAME: &'static str = "v1";
    fn publish<'a, DB: Backend>(
        tx: &'a mut OutboxTx<'_, Rollout, DB>,
        key: String,
        n: u32,
    ) -> BoxFuture<'a, outbox_runtime::Result<EventId>> {
        async move { tx.publish(&Noted { account: key, n }).await }.boxed()
    }
}

fn main() {
    worker::main::<V1>();
}
