use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, HandlerContext, HandlerError, Sqlite,
};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_service]
pub struct Notification;

// Task did not make TaskCreated public: no other service may subscribe to it.
#[outbox_event(service = Task, key = task_id)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

#[outbox_handler(subscriber = Notification)]
async fn on_task_created(
    _ctx: &mut HandlerContext<Sqlite>,
    _event: TaskCreated,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
