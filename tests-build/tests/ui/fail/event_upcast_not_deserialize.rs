// An older version is read from the row as its own type: it derives `Deserialize`.
use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

pub struct TaskCreatedV1 {
    pub id: String,
}

impl From<TaskCreatedV1> for TaskCreated {
    fn from(v1: TaskCreatedV1) -> Self {
        TaskCreated { task_id: v1.id }
    }
}

#[outbox_event(service = Task, version = 2, upcast(1 = TaskCreatedV1))]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

fn main() {}
