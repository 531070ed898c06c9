// Version 4 reads versions 1 and 3, but nothing converts version 2.
use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[derive(Deserialize)]
pub struct TaskCreatedV1 {
    pub id: String,
}

#[derive(Deserialize)]
pub struct TaskCreatedV3 {
    pub id: String,
}

#[outbox_event(service = Task, version = 4, upcast(1 = TaskCreatedV1, 3 = TaskCreatedV3))]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

fn main() {}
