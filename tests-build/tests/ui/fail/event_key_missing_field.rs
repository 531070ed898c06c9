use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task, key = taskid)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
    pub title: String,
}

fn main() {}
