//! The second-fastest path from intake to the handlers: when a batch's handlers could
//! not all run in intake's own transaction (one failed, a row was held elsewhere), the
//! rows intake has just written alone go to lanes by key, which settle them at once (a
//! batch per transaction, through the consumer's settlement), instead of waiting for
//! the worker's next claim.
//!
//! Only an optimisation: the row in the inbox is the truth. A lane that is full takes
//! nothing (intake then wakes the worker); a row a lane and the worker both reach is
//! settled once (row lock, status check), the other sees a duplicate; a row whose
//! key has an older open row is deferred behind it by the settlement's predecessor
//! check, and the worker takes it in order.

use std::sync::Arc;

use rdkafka::message::OwnedMessage;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backend::Backend;
use crate::config::OutboxConfig;
use crate::consumer::Consumer;
use crate::runtime::ShutdownSignal;

/// Rows queued per lane before intake leaves the rest to the worker.
const LANE_DEPTH: usize = 512;

/// Where intake hands rows: one sender per lane.
pub(super) struct Lanes {
    lanes: Vec<mpsc::Sender<OwnedMessage>>,
}

impl Lanes {
    /// Queues `msg` on its key's lane (the consumer's `lane_of`). `false` if the lane
    /// is full or gone (the worker takes the row instead).
    pub(super) fn offer(&self, msg: OwnedMessage) -> bool {
        let lane = crate::consumer::lane_of(&msg, self.lanes.len());
        self.lanes
            .get(lane)
            .is_some_and(|l| l.try_send(msg).is_ok())
    }
}

/// Starts [`OutboxConfig::consumer_lanes`] lanes settling through `consumer`.
pub(super) fn start<DB: Backend>(
    config: &OutboxConfig,
    consumer: Arc<Consumer<DB>>,
    shutdown: ShutdownSignal,
) -> (Lanes, Vec<JoinHandle<()>>) {
    let batch_size = config.consumer_batch_size.max(1);
    let mut lanes = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..config.consumer_lanes.max(1) {
        let (tx, mut rx) = mpsc::channel::<OwnedMessage>(LANE_DEPTH);
        let consumer = consumer.clone();
        let mut shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut batch = Vec::with_capacity(batch_size);
            loop {
                let first = tokio::select! {
                    _ = shutdown.changed() => return,
                    msg = rx.recv() => msg,
                };
                let Some(first) = first else { return };
                batch.push(first);
                while batch.len() < batch_size {
                    match rx.try_recv() {
                        Ok(msg) => batch.push(msg),
                        Err(_) => break,
                    }
                }
                if *shutdown.borrow() {
                    return;
                }
                // Rows not settled at shutdown stay pending in the inbox: the worker
                // of the next run takes them.
                consumer.settle_inbox_rows(&batch, &mut shutdown).await;
                batch.clear();
            }
        }));
        lanes.push(tx);
    }
    (Lanes { lanes }, tasks)
}
