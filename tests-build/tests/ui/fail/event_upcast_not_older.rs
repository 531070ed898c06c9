// Older versions must be below the current one: 2 is the current version here, and
// without `version` the current version is 1.
use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[derive(Deserialize)]
pub struct TaskCreatedV1 {
    pub id: String,
}

#[outbox_event(service = Task, version = 2, upcast(1 = TaskCreatedV1, 2 = TaskCreatedV1))]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

#[outbox_event(service = Task, upcast(1 = TaskCreatedV1))]
#[derive(Serialize, Deserialize)]
pub struct TaskAssigned {
    pub task_id: String,
}

fn main() {}
