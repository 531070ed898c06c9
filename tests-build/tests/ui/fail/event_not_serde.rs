use outbox_runtime::{outbox_event, outbox_service};

#[outbox_service]
pub struct Task;

// Forgot `#[derive(Serialize, Deserialize)]`.
#[outbox_event(service = Task)]
pub struct TaskCreated {
    pub task_id: String,
}

fn main() {}
