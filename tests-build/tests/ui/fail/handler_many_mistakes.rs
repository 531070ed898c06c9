// Every mistake in the shape of a handler is reported in one compile, each at its token.
use outbox_runtime::{outbox_event, outbox_handler, outbox_service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task, key = task_id)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

#[outbox_handler(servce = Task)]
fn on_task_created<T>(_pool: &sqlx::SqlitePool, _event: &TaskCreated) {}

fn main() {}
