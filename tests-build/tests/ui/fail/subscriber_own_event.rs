use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, HandlerContext, HandlerError, Sqlite,
};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_service]
pub struct Notification;

#[outbox_event(service = Task, key = task_id, public)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

// Task owns TaskCreated: it handles it through its own consumer, not a subscription.
#[outbox_handler(subscriber = Task)]
async fn on_task_created(
    _ctx: &mut HandlerContext<Sqlite>,
    _event: TaskCreated,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
