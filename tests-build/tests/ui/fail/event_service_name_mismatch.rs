use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

// The type is `ActiveScheduler`, but the service is named "scheduler".
#[outbox_service(name = "scheduler")]
pub struct ActiveScheduler;

#[outbox_event(service = "active-scheduler")]
#[derive(Serialize, Deserialize)]
pub struct SlotFreed {
    pub slot: u32,
}

fn main() {}
