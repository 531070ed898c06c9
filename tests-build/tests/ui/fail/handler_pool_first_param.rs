use outbox_runtime::{outbox_event, outbox_handler, outbox_service, HandlerError};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task, key = task_id)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

// Writing through the pool would commit apart from the consumed mark.
#[outbox_handler]
async fn on_task_created(
    _pool: &sqlx::SqlitePool,
    _event: TaskCreated,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
