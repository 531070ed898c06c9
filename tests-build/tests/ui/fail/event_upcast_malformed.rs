// `upcast` takes a list of `N = Type`.
use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task, version = 2, upcast = TaskCreatedV1)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

#[outbox_event(service = Task, version = 2, upcast(TaskCreatedV1))]
#[derive(Serialize, Deserialize)]
pub struct TaskAssigned {
    pub task_id: String,
}

#[outbox_event(service = Task, version = 2, upcast())]
#[derive(Serialize, Deserialize)]
pub struct TaskClosed {
    pub task_id: String,
}

fn main() {}
