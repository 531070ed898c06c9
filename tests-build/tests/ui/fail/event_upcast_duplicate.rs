// Version 2 is given two types.
use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[derive(Deserialize)]
pub struct TaskCreatedV1 {
    pub id: String,
}

#[derive(Deserialize)]
pub struct TaskCreatedV2 {
    pub id: String,
}

#[outbox_event(
    service = Task,
    version = 3,
    upcast(1 = TaskCreatedV1, 2 = TaskCreatedV2, 2 = TaskCreatedV1)
)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

fn main() {}
