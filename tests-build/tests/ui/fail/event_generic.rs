use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated<'a> {
    pub task_id: &'a str,
}

fn main() {}
