use outbox_runtime::{outbox_event, outbox_service};
use serde::Serialize;

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task)]
#[derive(Serialize)]
pub struct TaskCreated {
    pub task_id: String,
}

fn main() {}
