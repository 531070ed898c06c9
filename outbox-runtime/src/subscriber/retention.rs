//! Retention of an inbox without a forgetting window: settled rows are deleted only
//! once their key's watermark covers them, so a repeat that comes after its row is
//! gone is still recognised ([`crate::backend::Backend::purge_inbox`]).
//!
//! A sweep raises the watermark of the rows it finds old enough, and deletes them in a
//! later sweep, once the watermark has been in place for [`settle_time`]: intake reads
//! the watermarks before it writes a batch and gives the batch up if that took half
//! as long, so no intake can write a row that a sweep already forgot.

use std::time::Duration;

use sqlx::Pool;
use tokio::sync::watch;

use crate::backend::Backend;
use crate::catalog::Route;
use crate::config::Retention;

/// How long a raised watermark stands before the rows it covers are deleted: the
/// sweep interval, at least one second.
pub(crate) fn settle_time(retention: &Retention) -> Duration {
    retention.interval.max(Duration::from_secs(1))
}

/// Sweeps the inbox of `route` every `retention.interval` until shutdown, in bounded
/// batches.
///
/// # Cancel safety
///
/// Each batch is one transaction: stopping at any point leaves the inbox and its
/// watermarks consistent.
pub(crate) async fn retention<DB: Backend>(
    pool: Pool<DB>,
    route: Route,
    retention: Retention,
    mut shutdown: watch::Receiver<bool>,
) {
    let settle = settle_time(&retention);
    loop {
        loop {
            if *shutdown.borrow() {
                return;
            }
            match DB::purge_inbox(
                &pool,
                route.table(),
                route.service(),
                retention.consumed_after,
                retention.dead_after,
                retention.batch,
                settle,
            )
            .await
            {
                Ok((deleted, raised)) => {
                    if deleted > 0 || raised > 0 {
                        tracing::debug!(inbox = %route.table(), publisher = %route.service(),
                            deleted, raised, "inbox retention sweep");
                    }
                    // A full batch of deletions: more may be due at once.
                    if deleted < u64::from(retention.batch) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(inbox = %route.table(), error = %e,
                        "inbox retention sweep failed; trying again later");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(retention.interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}
