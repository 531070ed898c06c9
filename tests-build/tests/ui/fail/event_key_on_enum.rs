use outbox_runtime::{outbox_event, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task, key = task_id)]
#[derive(Serialize, Deserialize)]
pub enum TaskChanged {
    Renamed { task_id: String, title: String },
    Closed { task_id: String },
}

fn main() {}
