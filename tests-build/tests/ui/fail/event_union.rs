use outbox_runtime::{outbox_event, outbox_service};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task)]
pub union TaskId {
    pub small: u32,
    pub big: u64,
}

fn main() {}
