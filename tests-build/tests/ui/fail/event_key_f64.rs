use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task, key = score)]
#[derive(Serialize, Deserialize)]
pub struct TaskScored {
    pub task_id: String,
    pub score: f64,
}

fn main() {}
