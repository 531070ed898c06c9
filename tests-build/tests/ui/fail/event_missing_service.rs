use outbox_runtime::outbox_event;
use serde::{Deserialize, Serialize};

#[outbox_event(name = "task.created")]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

fn main() {}
