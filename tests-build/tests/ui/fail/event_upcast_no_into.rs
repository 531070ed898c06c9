// Each older version converts into the next: V1 into V2 (missing here), V2 into the
// current type (given).
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
    pub task_id: String,
}

impl From<TaskCreatedV2> for TaskCreated {
    fn from(v2: TaskCreatedV2) -> Self {
        TaskCreated {
            task_id: v2.task_id,
        }
    }
}

#[outbox_event(service = Task, version = 3, upcast(1 = TaskCreatedV1, 2 = TaskCreatedV2))]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

fn main() {}
